"""Owner-only backups on disk: folders 0700 and files 0600 whatever the process umask
(0750/0640 when the group may read), and a warning for an existing folder that lets
others read what it holds.

The backups hold the gateway's session state, logs and configuration; a file's mode
is set on its descriptor right after it is created (`fchmod`), so a permissive umask
never exposes it, not even for a moment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

CHUNK = 1 << 20  # the read and write size of every streamed copy


@dataclass(frozen=True)
class Modes:
    """The modes of the backup folders and files we create."""

    directory: int
    file: int

    @classmethod
    def for_group_read(cls, group_read: bool) -> Modes:
        """Owner-only (0700/0600), or group-readable (0750/0640) for shops that back up
        as one user and restore as another of the same group."""
        return cls(0o750, 0o640) if group_read else cls(0o700, 0o600)


OWNER_ONLY = Modes.for_group_read(False)


def create_file(path: Path, mode: int = OWNER_ONLY.file) -> BinaryIO:
    """Open `path` for writing (created or truncated) with exactly `mode`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def discard_file(file: IO[bytes], path: Path) -> None:
    """Close and remove a partial output. A close that cannot flush (the disk is full)
    is no error here: the file is dropped anyway."""
    with contextlib.suppress(OSError):
        file.close()
    path.unlink(missing_ok=True)


def mode_like(path: Path, default: int = OWNER_ONLY.file) -> int:
    """The permission bits of `path`, or `default` when it does not exist: a restored
    file keeps the mode of the one it replaces."""
    try:
        return stat.S_IMODE(Path(path).stat().st_mode)
    except FileNotFoundError:
        return default


def folder_mode(file_mode: int) -> int:
    """The folder mode matching a file mode: search (x) wherever read is allowed."""
    return file_mode | 0o700 | ((file_mode & 0o044) >> 2)


def make_dirs(path: Path, mode: int = OWNER_ONLY.directory) -> None:
    """Create `path` and its missing parents with exactly `mode`; folders that exist are
    left as they are (see `exposure_warnings`)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode)
        except FileExistsError:
            continue  # created by a concurrent run; its mode is its creator's
        os.chmod(folder, mode)


def exposure_warnings(folders: list[Path], modes: Modes) -> list[str]:
    """One warning, with the fix, for each existing folder that lets more users in than
    `modes` allow (other users always; the group unless group read is on)."""
    allowed = stat.S_IMODE(modes.directory)
    warnings = []
    for folder in folders:
        try:
            mode = stat.S_IMODE(Path(folder).stat().st_mode)
        except FileNotFoundError:
            continue
        extra = mode & 0o077 & ~allowed
        if extra:
            who = "other users" if extra & 0o007 else "its group"
            strip = "o-rwx,g-w" if allowed & 0o070 else "go-rwx"
            warnings.append(
                f"backup folder {folder} is open to {who} (mode {mode:04o}) and holds "
                f"session state, logs and configuration: run `chmod -R {strip} {folder}`"
            )
    return warnings


class InsufficientSpace(OSError):
    """The disk cannot take the restore; nothing was changed."""


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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = OWNER_ONLY.file) -> None:
    """Write a small file atomically (temp file with `mode`, fsync, rename, fsync the
    folder)."""
    temp = path.with_name(f".{path.name}.tmp")
    with create_file(temp, mode) as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def chown_like(path: Path, owner: os.stat_result) -> None:
    """Give restored files the data dir's owner (services often run as their own user)."""
    if os.geteuid() != 0:
        return
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, owner.st_uid, owner.st_gid, follow_symlinks=False)
