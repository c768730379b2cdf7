"""Moving live data out of a restore's way: renamed beside itself, never deleted and
never over anything (the one helper every restore uses).

A name is reserved before anything moves (a new empty file or folder, created with
O_EXCL or mkdir, so two restores never pick the same one), then the data is renamed
onto that placeholder. Two restores in the same second get `…-2`, `…-3`.
"""

from __future__ import annotations

import contextlib
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


def reserve_aside(path: Path, stamp: str | None = None, directory: bool = False) -> Path:
    """Create and return a new, empty `<name>.before-restore-<stamp>[-n]` beside `path`
    (a folder when `directory`): a name no one else has or can take."""
    base = f"{path.name}.before-restore-{stamp or _stamp()}"
    for n in range(1, MAX_TRIES + 1):
        candidate = path.with_name(base if n == 1 else f"{base}-{n}")
        try:
            if directory:
                candidate.mkdir()
            else:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(
        f"{MAX_TRIES} folders or files named {base}… exist beside {path}: remove old "
        "moved-aside copies you no longer need, then restore again"
    )


def move_aside(path: Path, stamp: str | None = None) -> Path | None:
    """Rename `path` (a file, folder or link) to a new name beside it and return that
    name; None when there is nothing at `path`. Never overwrites, never deletes."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    is_dir = path.is_dir() and not path.is_symlink()
    aside = reserve_aside(path, stamp, directory=is_dir)
    try:
        os.rename(path, aside)  # onto our own empty placeholder of the same type
    except BaseException:
        with contextlib.suppress(OSError):
            aside.rmdir() if is_dir else aside.unlink()
        raise
    return aside


def move_contents_aside(folder: Path, stamp: str | None = None) -> Path | None:
    """Move everything inside `folder` into a new sibling folder and return it (None
    when `folder` is missing or empty). `folder` itself stays: it may be a mount point."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    aside = reserve_aside(folder, stamp, directory=True)
    for entry in sorted(folder.iterdir()):
        shutil.move(entry, aside / entry.name)
    return aside


def unique_folder(beside: Path, label: str) -> Path:
    """A new, unique folder name for `label` inside `beside` (UTC stamp + random)."""
    stamp = utc_now().strftime("%Y%m%d_%H%M%S")
    return beside / f"{label}-{stamp}-{secrets.token_hex(3)}"


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


def _entries(data_dir: Path, names: list[str] | None, skip: Path) -> list[str]:
    return sorted(
        e.name for e in data_dir.iterdir() if (names is None or e.name in names) and e != skip
    )


def move_into_aside(data_dir: Path, names: list[str] | None, beside: Path) -> MovedAside:
    """Move `names` (every entry when None) from `data_dir` into a new folder
    `<beside>.before-restore-<UTC>[-n]` (reserved by `tasks.common.aside`, the naming every
    restore shares). Absent names are skipped; nothing is deleted."""
    folder = reserve_aside(beside, directory=True)
    present = _entries(data_dir, names, folder)
    _move(present, data_dir, folder)
    return MovedAside(data_dir, folder, present)


def put_back(moved: MovedAside, failed_folder: Path, names: list[str] | None) -> Path | None:
    """Undo `move_into_aside`: what the failed restore left under `names` (every entry when
    None) goes into `failed_folder` (kept for a look, never deleted), then the old
    entries return. Returns `failed_folder` when something was kept there."""
    leftovers = _entries(moved.data_dir, names, moved.folder)
    if leftovers:
        failed_folder.mkdir(parents=False, exist_ok=False)
        _move(leftovers, moved.data_dir, failed_folder)
    _move(moved.names, moved.folder, moved.data_dir)
    moved.folder.rmdir()
    return failed_folder if leftovers else None
