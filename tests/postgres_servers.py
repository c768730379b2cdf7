"""A throwaway PostgreSQL cluster (Debian's `postgresql`) for tests: `initdb` into a
fresh folder, `postgres` on a free 127.0.0.1 port (retried on a collision), trust
authentication, one database; stopped and deleted on exit.

PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres`
user (its folder is made outside pytest's root-only temp dir so that user can
reach it); as anyone else it runs as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect_servers import stop_group
from redis_servers import free_port

START_TIMEOUT = 60.0
PORT_ATTEMPTS = 5


@dataclass
class PostgresServer:
    port: int
    database: str
    dir: Path

    @property
    def prefect_url(self) -> str:
        """The database URL for PREFECT_SERVER_DATABASE_CONNECTION_URL (asyncpg)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin folder, or fail saying what to install."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: p.split("/")[4])
    if not found:
        pytest.fail(
            "PostgreSQL is not installed: `apt-get install postgresql` (scripts/setup.sh does it)",
            pytrace=False,
        )
    return Path(found[-1]).parent


def as_owner(command: list[str]) -> list[str]:
    """`command` run as the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@contextmanager
def running_postgres(database: str = "prefect") -> Iterator[PostgresServer]:
    """A fresh cluster with `database`, answering on a free port (another one when that
    port was taken before PostgreSQL bound it)."""
    bin_dir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="proxilion-dr-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data = root / "data"
    process = None
    try:
        subprocess.run(
            as_owner(
                [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]
                + ["--no-sync", "-E", "UTF8", "--locale", "C.UTF-8"]
            ),
            check=True,
            capture_output=True,
        )
        for _attempt in range(PORT_ATTEMPTS):
            port = free_port()
            process = start(bin_dir, data, port, root / f"postgres-{port}.log")
            if process is not None:
                break
        else:
            pytest.fail(f"PostgreSQL found no free port in {PORT_ATTEMPTS} tries", pytrace=False)
        subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port)]
            + ["-U", "postgres", database],
            check=True,
            capture_output=True,
        )
        yield PostgresServer(port=port, database=database, dir=root)
    finally:
        if process is not None:
            stop_group(process)
        shutil.rmtree(root, ignore_errors=True)


def start(bin_dir: Path, data: Path, port: int, log_path: Path) -> subprocess.Popen[bytes] | None:
    """`postgres` on `port`, once it accepts connections; None if the port was taken."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            as_owner(
                [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
                + ["-k", str(data.parent), "-c", "listen_addresses=127.0.0.1"]
                + ["-c", "fsync=off", "-c", "max_connections=200"]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and process.poll() is None:
        ready = subprocess.run(
            [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
            capture_output=True,
        )
        if ready.returncode == 0:
            return process
        time.sleep(0.3)
    text = log_path.read_text(errors="replace")
    if process.poll() is not None and "Address already in use" in text:
        return None
    stop_group(process)
    pytest.fail(
        f"PostgreSQL did not accept connections on 127.0.0.1:{port}; its log:\n{text[-2000:]}",
        pytrace=False,
    )
