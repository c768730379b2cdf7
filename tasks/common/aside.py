"""Moving live data out of a restore's way, and back: never deleted, never over
anything. The one mover every restore uses.

A name is reserved before anything moves (a new empty folder, created with mkdir, so
two restores never pick the same one: the second of a second gets `…-2`), then the
data is renamed into it. The folder is on the data's own filesystem (`aside_base`:
beside the data dir, or inside it when the data dir is a mount point), so moving is a
rename that costs no space; where an entry still sits on another filesystem, the free
space is checked before it is copied. A move that fails half-way puts back what it
moved before it raises; `put_back` undoes a whole move when a restore fails.
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


class MoveAsideFailed(RuntimeError):
    """Data could not be moved out of the way; what had moved was put back (but
    `stuck`, named in the message, when even that failed)."""

    stuck: list[str]


def aside_base(data_dir: Path) -> Path:
    """The path whose `<name>.before-restore-<UTC>` holds a data dir's moved-aside
    contents: beside the data dir when its parent is on the same filesystem, else (a
    mount point) inside it, so the move is a rename either way."""
    if data_dir.stat().st_dev == data_dir.parent.stat().st_dev:
        return data_dir
    return data_dir / data_dir.name


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _move_one(source: Path, target: Path) -> None:
    """Rename; across filesystems (an entry that is a mount of its own) copy, then
    delete, after checking the target's filesystem has room for it."""
    try:
        os.replace(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    needed, free = _size(source), shutil.disk_usage(target.parent).free
    if needed > free:
        raise OSError(
            errno.ENOSPC,
            f"{source} is on another filesystem than {target.parent}, which has "
            f"{free / 1e6:.1f} MB free for its {needed / 1e6:.1f} MB",
        )
    try:
        shutil.move(source, target)
    except BaseException:
        if source.exists() and os.path.lexists(target):  # a partial copy: drop it
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        raise


def _move(names: list[str], source: Path, target: Path) -> None:
    """Move `names` from `source` into `target`; when one fails, those already moved go
    back to `source` before the error is raised (MoveAsideFailed names them when even
    that fails)."""
    moved: list[str] = []
    try:
        for name in names:
            _move_one(source / name, target / name)
            moved.append(name)
    except OSError as error:
        stuck: list[str] = []
        for name in reversed(moved):
            try:
                os.replace(target / name, source / name)
            except OSError:
                stuck.append(name)
        where = f"{', '.join(stuck)} are still in {target}" if stuck else "what had moved is back"
        reason = error.strerror or str(error)
        failed = MoveAsideFailed(
            f"could not move {source / names[len(moved)]} to {target} ({reason}); {where}"
        )
        failed.stuck = stuck
        raise failed from error


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
    try:
        _move(present, data_dir, folder)
    except MoveAsideFailed as error:
        if not error.stuck:
            folder.rmdir()
        raise
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
