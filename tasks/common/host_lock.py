"""This host's half of a component lock: a lock file per lock name, taken with flock(2).

The kernel drops a flock when the process holding it ends, however it ends (SIGKILL,
OOM kill): a killed run never leaves it taken. Without a Prefect server it is the
whole lock. With one, every run takes it before the server's slot, so the runs of one
host queue here, and a run holding it knows that a holder recorded on this host (same
boot, same lock directory: `flock_domain`) has ended.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import IO

# /run/lock is the host's place for lock files (Debian: world-writable and sticky, and
# shared with systemd services, unlike a PrivateTmp /tmp); else the temporary directory.
LOCK_BASES = (Path("/run/lock"), Path(tempfile.gettempdir()))
LOCK_SUBDIR = "proxilion-dr"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
MACHINE_ID = Path("/etc/machine-id")


def lock_dir() -> Path:
    """The directory of the lock files: the first of LOCK_BASES where this process can
    create and write `proxilion-dr/`."""
    for base in LOCK_BASES:
        path = base / LOCK_SUBDIR
        try:
            path.mkdir(exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK | os.X_OK):
            return path
    raise PermissionError(
        f"cannot write a lock directory ({' or '.join(str(b / LOCK_SUBDIR) for b in LOCK_BASES)})"
    )


def boot_id() -> str:
    """This boot of this kernel (a new one after every restart of the host)."""
    return BOOT_ID.read_text().strip()


def machine() -> str:
    """This machine across its restarts: host name and systemd machine id; "" without
    a machine id (a container's image may carry one shared by every host, but not
    its host name)."""
    try:
        machine_id = MACHINE_ID.read_text().strip()
    except OSError:
        return ""
    return f"{socket.gethostname()}/{machine_id}" if machine_id else ""


def flock_domain() -> str:
    """What shares this process's lock files: this boot of this kernel and this lock
    directory (a container with its own /run/lock is another domain)."""
    info = lock_dir().stat()
    return f"{boot_id()}:{info.st_dev}:{info.st_ino}"


class HostLock:
    """The lock file of one lock name. `take` never blocks."""

    def __init__(self, name: str) -> None:
        self.path = lock_dir() / f"{name}.lock"
        self._file: IO[str] | None = None

    def take(self) -> bool:
        """Take the lock if no other process (or other HostLock) holds it."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            file = os.fdopen(os.open(self.path, flags, 0o644), "r+")
        except PermissionError:
            raise PermissionError(
                f"cannot open the lock file {self.path}: another user made it; run the "
                "backups of this host as one user (docs/locks.md)"
            ) from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        self._file = file
        return True

    def note(self, text: str) -> None:
        """Write who holds it (the file's whole content), for the runs that wait."""
        if self._file is None:
            raise RuntimeError(f"{self.path} is not held by this process")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text)
        self._file.flush()

    def holder(self) -> str:
        """What the holder wrote; "" when there is nothing to read."""
        try:
            return self.path.read_text()
        except OSError:
            return ""

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
