"""The per-target lock: only waiting for it says "busy", and a killed holder frees it soon."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from redis_servers import free_port

from tasks.common.locks import LEASE_SECONDS, LockBusy, exclusive

REPO = Path(__file__).resolve().parent.parent
# The Prefect server frees an expired lease on its next reaper pass (15 s by default).
REAPER_SECONDS = 15
SERVER_START_SECONDS = 120


def unique_lock() -> str:
    return f"test-lock-{uuid.uuid4().hex[:10]}"


def test_a_timeout_inside_the_lock_is_that_timeout_not_a_busy_lock() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    name = unique_lock()
    try:
        with (
            pytest.raises(TimeoutError) as raised,
            exclusive(name),
            socket.create_connection(silent.getsockname(), timeout=0.2) as conn,
        ):
            conn.recv(1)  # a real timeout, as redis-check-rdb or a socket read gives
    finally:
        silent.close()
    assert type(raised.value) is TimeoutError and "another run holds" not in str(raised.value)
    with exclusive(name, wait_seconds=5):  # and the slot was given back
        pass


def test_waiting_for_a_held_lock_says_busy() -> None:
    name = unique_lock()
    with (
        exclusive(name),
        pytest.raises(LockBusy, match="another run holds"),
        exclusive(name, wait_seconds=1),
    ):
        pass


@pytest.fixture
def reaping_prefect_server(tmp_path: Path) -> Iterator[str]:
    """A full Prefect server (`prefect server start`), which reaps expired leases;
    the session's test server is an ephemeral one, which never does."""
    port = free_port()
    env = os.environ | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'p.db'}",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        + ["--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"prefect server did not start: {(tmp_path / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


HOLDER = """
import sys, time
from tasks.common.locks import exclusive
with exclusive(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(3600)
"""


def test_a_holder_killed_with_sigkill_frees_the_lock_within_the_short_lease(
    reaping_prefect_server: str,
) -> None:
    name = unique_lock()
    env = os.environ | {"PREFECT_API_URL": reaping_prefect_server}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name], cwd=REPO, env=env, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed_at = time.monotonic()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with temporary_settings({PREFECT_API_URL: reaping_prefect_server}):
        # the dead holder's slot is still taken
        with pytest.raises(LockBusy), exclusive(name, wait_seconds=1):
            pass
        # Prefect's default lease (300 s) would keep it for five minutes.
        with exclusive(name, wait_seconds=LEASE_SECONDS + REAPER_SECONDS + 15):
            freed_after = time.monotonic() - killed_at
    print(f"slot of the SIGKILLed holder taken over after {freed_after:.1f} s")
