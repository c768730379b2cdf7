"""What every restore does to a live data directory, whatever the service: find it on
this host, make sure the disk can take the restore, move the current data aside
(never delete it) and put it back when the restore fails.

Moving is renaming inside one filesystem: it costs no space and no time, and the
old data stays byte for byte what it was.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks import containers
from tasks.aside import reserve_aside
from tasks.storage import utc_now


class DataDirNotFound(FileNotFoundError):
    """The service's data directory cannot be found on this host."""


class ServiceDidNotStart(RuntimeError):
    """The container exited while the restored service was starting."""


class InsufficientSpace(OSError):
    """The disk cannot take the restore; nothing was changed."""


def find_data_dir(container: str | None, inner_dir: str | None, override: str | None) -> Path:
    """The host folder holding a service's data: `override` when given, else the host
    side of the container's mount holding `inner_dir` (the service's own setting)."""
    if override:
        path = Path(override)
        if not path.is_dir():
            raise DataDirNotFound(
                f"data_dir {path} does not exist on this host: give the host folder that "
                "the container mounts as its data directory"
            )
        return path
    if not container or not inner_dir:
        raise DataDirNotFound(
            "the data directory is unknown (no container to inspect, or the service did not "
            "say where it keeps its data): set data_dir to the host folder holding it"
        )
    path = containers.host_path(container, inner_dir)
    if path is None:
        raise DataDirNotFound(
            f"{inner_dir} in container {container!r} is not on a mount (it lives inside the "
            "container): mount it from the host, or set data_dir"
        )
    if not path.is_dir():
        raise DataDirNotFound(
            f"container {container!r} mounts {inner_dir} from {path}, which is not a folder on "
            "this host (Docker on another machine?): run the flow there or set data_dir"
        )
    return path


def require_free_space(folder: Path, needed: int, what: str) -> int:
    """Refuse when `folder`'s filesystem has less than `needed` bytes free; returns free."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InsufficientSpace(
            errno.ENOSPC,
            f"not enough disk for {what}: {folder} has {free / 1e6:.1f} MB free, "
            f"{needed / 1e6:.1f} MB needed; free space there and run again (nothing was changed)",
        )
    return free


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
    `<beside>.before-restore-<UTC>[-n]` (reserved by `tasks.aside`, the naming every
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


def chown_like(path: Path, owner: os.stat_result) -> None:
    """Give restored files the data dir's owner (services often run as their own user)."""
    if os.geteuid() != 0:
        return
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, owner.st_uid, owner.st_gid, follow_symlinks=False)


def wait_started(
    probe: Callable[[], str | None], container: str, timeout_seconds: float, what: str
) -> None:
    """Poll `probe` (None when ready, else why not) until the restored service is
    ready; fail at once when its container exits, else at the deadline."""
    deadline = time.monotonic() + timeout_seconds
    last: str | None = "not probed"
    while time.monotonic() < deadline:
        last = probe()
        if last is None:
            return
        reason = containers.exit_reason(container)
        if reason:
            raise ServiceDidNotStart(f"{what} did not start: {reason}")
        time.sleep(0.1)
    raise TimeoutError(
        f"{what} not ready within {timeout_seconds:.0f} s ({last}): raise "
        "start_timeout_seconds or check its log"
    )
