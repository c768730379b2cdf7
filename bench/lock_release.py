"""Benchmark: what a busy SQLite Prefect server costs a backup's lock, in one run.

A real `prefect server start` (SQLite, the default) and a bare `redis-server` of a few
thousand keys; backup-redis (`fetch="network"`, local only) runs `--runs` times, taking
turns between the project's lock client (tasks/common/busy_server.py: a 503 is asked
again after 20 ms) and Prefect's plain client (the peer: it waits 2 s first), one second
apart. Prints each side's median call time and how many times Prefect's client waited
to ask again (its "Another attempt will be made" log lines).

    .venv/bin/python -m bench.lock_release [--runs 10]
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import httpx  # noqa: E402
import redis  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

import tasks.common.locks as locks  # noqa: E402
from flows.backup_redis import backup_redis  # noqa: E402


class Waits(logging.Handler):
    """Counts Prefect client's waits before asking again."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Another attempt will be made" in record.getMessage()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    runs = parser.parse_args().runs
    root = Path(tempfile.mkdtemp(prefix="bench-lock-"))
    api = f"http://127.0.0.1:{free_port()}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = start(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
         "127.0.0.1", "--port", api.split(":")[2].split("/")[0], "--no-ui"],
        env, root / "server.log",
    )  # fmt: skip
    redis_port = free_port()
    redis_server = start(
        ["redis-server", "--port", str(redis_port), "--save", "", "--dir", str(root),
         "--repl-diskless-sync-delay", "0"],
        env, root / "redis.log",
    )  # fmt: skip
    waits = Waits()
    client_log = logging.getLogger("prefect.client")
    client_log.addHandler(waits)
    client_log.setLevel(logging.DEBUG)
    client_log.propagate = False  # counted here, not printed
    times: dict[str, list[float]] = {"lock client": [], "Prefect's client": []}
    counted = dict.fromkeys(times, 0)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(api + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        url = f"redis://127.0.0.1:{redis_port}"
        redis.Redis.from_url(url).mset({f"session:{i}": "x" * 100 for i in range(5000)})
        ours = locks.server_client
        with temporary_settings({PREFECT_API_URL: api}):
            for _round in range(runs):
                for side in times:
                    locks.server_client = (
                        ours if side == "lock client" else lambda: get_client(sync_client=True)
                    )
                    before, started = waits.count, time.monotonic()
                    backup_redis(
                        redis_url=url, container="", fetch="network",
                        backup_dir=str(root / "backups"), s3_bucket="",
                    )  # fmt: skip
                    times[side].append(time.monotonic() - started)
                    counted[side] += waits.count - before
                    time.sleep(1)
        locks.server_client = ours
    finally:
        server.terminate()
        redis_server.terminate()
    print(f"backup-redis, {runs} runs each, taking turns (SQLite Prefect server)")
    for side, seconds in times.items():
        print(
            f"  {side:17} median {statistics.median(seconds):5.2f} s, "
            f"max {max(seconds):5.2f} s; Prefect's client waited to ask again "
            f"{counted[side]} times"
        )
    peer = statistics.median(times["Prefect's client"])
    print(f"  ratio: {statistics.median(times['lock client']) / peer:.2f}x Prefect's client")


if __name__ == "__main__":
    main()
