"""Moving live data out of a restore's way, and back: never deleted, never over
anything. The one mover every restore uses.

A name is reserved before anything moves (a new empty folder, created with mkdir, so
two restores never pick the same one: the second of a second gets `…-2`), then the
data is renamed into it. `put_back` undoes the move when a restore fails.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.common.clock import utc_now

MAX_TRIES = 1000


def _stamp() -> str:
    return utc_now().strftime("%Y%m%d_%H%M%S")


def reserve_aside(path: Path, stamp: str | None = None) -> Path:
    """Create and return a new, empty folder `<name>.before-restore-<stamp>[-n]` beside
    `path`: a name no one else has or can take."""
    base = f"{path.name}.before-restore-{stamp or _stamp()}"
    for n in range(1, MAX_TRIES + 1):
        candidate = path.with_name(base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(
        f"{MAX_TRIES} folders or files named {base}… exist beside {path}: remove old "
        "moved-aside copies you no longer need, then restore again"
    )


def unique_folder(beside: Path, label: str) -> Path:
    """A new, unique folder name for `label` inside `beside` (UTC stamp + random)."""
    return beside / f"{label}-{_stamp()}-{secrets.token_hex(3)}"


def _move(names: list[str], source: Path, target: Path) -> None:
    for name in names:
        try:
            os.replace(source / name, target / name)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            shutil.move(source / name, target / name)  # another filesystem: copy, then delete


@dataclass
class MovedAside:
    """Entries of `data_dir` moved into `folder` (absent ones are not listed)."""

    data_dir: Path
    folder: Path
    names: list[str]


def _entries(data_dir: Path, names: list[str] | None, skip: tuple[Path, ...]) -> list[str]:
    return sorted(
        e.name for e in data_dir.iterdir() if (names is None or e.name in names) and e not in skip
    )


def move_into_aside(
    data_dir: Path,
    names: list[str] | None,
    beside: Path,
    stamp: str | None = None,
    keep: tuple[Path, ...] = (),
) -> MovedAside:
    """Move `names` (every entry but those in `keep` when None) from `data_dir` into a
    new folder `<beside>.before-restore-<UTC>[-n]`. `data_dir` itself stays (it may be
    a mount point). Absent names are skipped; nothing is deleted."""
    folder = reserve_aside(beside, stamp)
    present = _entries(data_dir, names, (folder, *keep))
    _move(present, data_dir, folder)
    return MovedAside(data_dir, folder, present)


def put_back(
    moved: MovedAside,
    failed_folder: Path,
    names: list[str] | None,
    keep: tuple[Path, ...] = (),
) -> Path | None:
    """Undo `move_into_aside`: what the failed restore left under `names` (every entry but
    `keep` when None) goes into `failed_folder` (kept for a look, never deleted), then
    the old entries return. Returns `failed_folder` when something was kept there."""
    leftovers = _entries(moved.data_dir, names, (moved.folder, *keep))
    if leftovers:
        failed_folder.mkdir(parents=False, exist_ok=False)
        _move(leftovers, moved.data_dir, failed_folder)
    _move(moved.names, moved.folder, moved.data_dir)
    moved.folder.rmdir()
    return failed_folder if leftovers else None
