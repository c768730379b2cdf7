"""A component lock that no killed run and no Prefect server restart leaves taken.

Each test measures how soon the next run of the same target holds the lock after the
holder's death (or the server's return) and prints it; all must be within
NEXT_RUN_SECONDS. The holders are real flow runs in processes of their own
(tests/lock_holder.py), the servers real `prefect server start` processes, killed and
restarted for real. A holder "on another host" runs in a mount namespace of its own
with a fresh /run/lock (its lock files are not this host's); that needs root.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from lock_holder import HolderProcess, require_unshare, unique_lock
from prefect.settings import PREFECT_API_URL
from prefect_servers import (
    PrefectServer,
    api,
    migrated_database,
    prefect_env,
    restart,
    running_prefect_server,
)

from tasks.common.locks import LockBusy, exclusive
from tasks.common.log import OUTSIDE_A_RUN

NEXT_RUN_SECONDS = 90.0
IN_MEMORY = "prefect.server.concurrency.lease_storage.memory"  # Prefect's default
FILESYSTEM = "prefect.server.concurrency.lease_storage.filesystem"
STOP_SECONDS = 30.0


@contextmanager
def holder(
    name: str, env: dict[str, str], elsewhere: bool = False, gated: bool = False
) -> Iterator[HolderProcess]:
    process = HolderProcess(name, env, elsewhere, gated)
    try:
        yield process
    finally:
        process.close()


@contextmanager
def server(home: Path, lease_storage: str) -> Iterator[PrefectServer]:
    # The server looks for expired leases every second, not every 15 s: the lease's
    # 60 s, the shortest Prefect takes, is what the tests wait for, not its reaper.
    settings = {
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
    }
    if lease_storage != IN_MEMORY:
        settings["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] = lease_storage
    with running_prefect_server(home, **settings) as started:
        yield started


def quiet_env(env: dict[str, str], home: Path) -> dict[str, str]:
    return env | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def without_prefect(home: Path) -> dict[str, str]:
    """A shell without PREFECT_API_URL: Prefect starts a temporary server per run."""
    migrated_database(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # A temporary server may take longer than Prefect's 20 s to start on a busy machine.
    temporary = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    return quiet_env(env, home) | {"PREFECT_SERVER_EPHEMERAL_ENABLED": "true"} | temporary


def measured(what: str, seconds: float) -> None:
    print(f"{what}: the next run held the lock after {seconds:.1f} s")
    assert seconds < NEXT_RUN_SECONDS, f"{what}: {seconds:.1f} s"


def test_a_killed_holder_on_this_host_frees_the_lock_at_once(tmp_path: Path) -> None:
    name = unique_lock()
    env = quiet_env(prefect_env_of_session(), tmp_path)
    with holder(name, env) as first:
        run = first.run_name()
        with pytest.raises(LockBusy) as busy, exclusive(name, wait_seconds=2):
            pass
        assert f"run {run!r}" in str(busy.value) and "on this host" in str(busy.value)
        died = first.kill()
    with exclusive(name, wait_seconds=NEXT_RUN_SECONDS):
        measured("holder killed", time.monotonic() - died)


def prefect_env_of_session() -> dict[str, str]:
    """This session's Prefect server (the test harness's), for a holder process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture(scope="module", autouse=True)
def server_restarts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[None]]]:
    """Both server restarts (leases in memory, leases on disk), started as the module
    starts: each waits for its servers and holders (the one on disk a whole lease,
    60 s), and the module's other tests run meanwhile. The two tests named after them
    collect their outcomes (an assertion failing in one fails its test)."""
    with ThreadPoolExecutor(2, thread_name_prefix="server-restart") as pool:
        yield {
            storage: pool.submit(
                server_restarted_while_two_runs_hold_locks,
                tmp_path_factory.mktemp("server-restart"),
                storage,
            )
            for storage in (IN_MEMORY, FILESYSTEM)
        }


@contextmanager
def warnings_naming(text: str) -> Iterator[list[str]]:
    """The warnings this process logs outside a run (tasks.common.log) that contain
    `text` (a lock's unique name: not another test's, which run meanwhile)."""
    said: list[str] = []

    class Said(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if text in (message := record.getMessage()):
                said.append(message)

    logger, handler = logging.getLogger(OUTSIDE_A_RUN), Said(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield said
    finally:
        logger.removeHandler(handler)


def server_restarted_while_two_runs_hold_locks(tmp_path: Path, lease_storage: str) -> None:
    """The server restarts while two runs hold two locks: one killed just before, one
    alive (on another host). The next run of each lock takes it within NEXT_RUN_SECONDS;
    when this run proves the killed holder gone, it says it freed its slot."""
    require_unshare()
    dead_lock, live_lock = unique_lock(), unique_lock()
    dead_elsewhere = lease_storage == FILESYSTEM  # in memory, nothing could free it
    with server(tmp_path / "prefect", lease_storage) as prefect:
        env = prefect_env(prefect)
        with holder(dead_lock, env, dead_elsewhere) as dead, holder(live_lock, env, True) as live:
            run = live.run_name()
            dead.run_name()
            says_who_holds(prefect, live_lock, run)
            died = dead.kill()
            restart(prefect)
            back = time.monotonic()
            print(f"server back {back - died:.1f} s after the holder's death")
            live_holder_finishes(prefect, live, live_lock, lease_storage, back)
        with (
            api(prefect),
            warnings_naming(dead_lock) as said,
            exclusive(dead_lock, wait_seconds=NEXT_RUN_SECONDS),
        ):
            now = time.monotonic()
    measured(f"{lease_storage}: server restarted, holder dead", now - back)
    if not dead_elsewhere:  # on this host: provably gone, its slot freed by this run
        text = "\n".join(said)
        assert f"freed {dead_lock!r}" in text and "has ended" in text, said


def says_who_holds(prefect: PrefectServer, lock: str, run: str) -> None:
    """A run that waits for `lock` names its holder, its last renewal, how to free it."""
    with api(prefect), pytest.raises(LockBusy) as busy, exclusive(lock, wait_seconds=2):
        pass
    message = str(busy.value)
    assert f"run {run!r}" in message and "last renewal" in message, message
    assert f"prefect gcl update {lock} --active-slots 0" in message, message


def live_holder_finishes(
    prefect: PrefectServer, live: HolderProcess, lock: str, lease_storage: str, back: float
) -> None:
    """The live holder keeps its slot across the restart (another run still waits),
    ends normally, and the next run takes the slot at once."""
    forgot = "forgot this run's lease"
    if lease_storage == IN_MEMORY:
        live.expect(forgot)
    with api(prefect), pytest.raises(LockBusy), exclusive(lock, wait_seconds=2):
        pass
    live.finish()
    live.expect("finished")
    assert live.process.wait(STOP_SECONDS) == 0, live.tail()
    ended = time.monotonic()
    if lease_storage == FILESYSTEM:  # its lease outlived the restart: renewed, not forgotten
        assert forgot not in live.tail(), live.tail()
    with api(prefect), exclusive(lock, wait_seconds=NEXT_RUN_SECONDS):
        now = time.monotonic()
    print(f"{lease_storage}: the live holder ended {ended - back:.1f} s after the server's return")
    measured(f"{lease_storage}: server restarted, holder alive", now - back)


def test_without_a_server_a_killed_run_leaves_no_lock_and_no_server(tmp_path: Path) -> None:
    """PREFECT_API_URL unset: the host's lock file is the lock, and the killed run's
    temporary Prefect server is stopped by its watcher."""
    name = unique_lock()
    env = without_prefect(tmp_path / "prefect")
    # Both start at once, their temporary servers too (on the migrated copy
    # without_prefect made: neither migrates); the second asks for the lock once the
    # first holds it.
    with holder(name, env) as first, holder(name, env, gated=True) as second:
        run = first.run_name()
        servers = children(first.process.pid)
        assert servers, "the run without a server started no temporary Prefect server"
        second.expect("ready")
        second.take()
        second.expect(f"waiting for {name!r}: another run holds it: on this host, run {run!r}")
        died = first.kill()
        second.run_name()
        measured("no server, holder killed", time.monotonic() - died)
        servers += children(second.process.pid)
        second.finish()
        assert second.process.wait(STOP_SECONDS) == 0, second.tail()
    leftover = until_gone(servers, STOP_SECONDS)
    assert not leftover, f"temporary Prefect servers left running: {leftover}"


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def until_gone(pids: list[int], timeout: float) -> list[int]:
    """Waits until none of `pids` runs; those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


# The two server restarts end last: they ran beside the tests above.
def test_a_server_restart_leaves_no_slot_taken(server_restarts: dict[str, Future[None]]) -> None:
    """Leases in the server's memory (Prefect's default): the restart forgets both
    leases while the counts stay; the next run proves the killed holder gone (it ran on
    this host) and says it freed its slot, and the live one keeps its slot and frees it
    when it ends."""
    server_restarts[IN_MEMORY].result(timeout=STOP_SECONDS + 4 * NEXT_RUN_SECONDS)


def test_a_server_restart_with_leases_on_disk_leaves_no_slot_taken(
    server_restarts: dict[str, Future[None]],
) -> None:
    """Filesystem lease storage (as deploy/ and the demo run the server): both leases
    survive the restart, and the killed holder's (on another host) expires."""
    server_restarts[FILESYSTEM].result(timeout=STOP_SECONDS + 4 * NEXT_RUN_SECONDS)
