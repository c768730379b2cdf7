"""The per-target lock: only waiting for it says "busy", and a holder that is provably gone
(an earlier boot, an ended run) does not keep it."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from uuid import UUID

import pytest
from lock_holder import HolderProcess, require_unshare, unique_lock
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Crashed
from prefect_servers import busy_relay

from tasks.common.lock_record import read_record, this_holder, write_record
from tasks.common.lock_slot import try_take
from tasks.common.locks import LEASE_SECONDS, LockBusy, exclusive


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


def test_a_busy_servers_503_is_asked_again_at_once() -> None:
    """Most runs end while a SQLite server stores their events, and its answer to the
    lock record's update is then 503: Prefect's client would wait 2 s to ask again."""
    name = unique_lock()

    def record_update(method: str, path: str) -> bool:
        return method == "PATCH" and path.endswith("/variables/name/lock-holder-" + name)

    with (
        busy_relay(PREFECT_API_URL.value(), record_update) as relay,
        temporary_settings({PREFECT_API_URL: relay.url}),
        exclusive(name),
    ):
        pass
    assert len(relay.answered_busy) == 1  # asked again: the record says "released"
    with get_client(sync_client=True) as client:
        record = read_record(client, name)
    assert record is not None and record.state == "released"
    waited = relay.longest_wait()
    assert waited < 1.0, f"waited {waited:.1f} s on a busy server"


def test_waiting_for_a_held_lock_says_busy() -> None:
    name = unique_lock()
    with (
        exclusive(name),
        pytest.raises(LockBusy, match="another run holds"),
        exclusive(name, wait_seconds=1),
    ):
        pass


def test_a_holder_from_an_earlier_boot_of_this_host_is_freed_at_once() -> None:
    """A fake holder record: a test cannot restart the host. The slot itself is real,
    taken and left behind here as a run killed by the host's restart leaves it."""
    name = unique_lock()
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        slot = try_take(client, name, LEASE_SECONDS, flow_run_id="")
        assert slot is not None
        before = this_holder()
        before.boot, before.domain, before.lease_id = "an-earlier-boot", "", str(slot.lease_id)
        write_record(client, name, before)
    start = time.monotonic()
    with exclusive(name, wait_seconds=30):
        freed_after = time.monotonic() - start
    print(f"slot of a holder from an earlier boot taken over after {freed_after:.1f} s")
    with get_client(sync_client=True) as client:
        record = read_record(client, name)
    assert record is not None and record.state == "released", record


def test_a_holder_elsewhere_whose_run_has_ended_is_freed_at_once(tmp_path: Path) -> None:
    """A holder on another host, killed; its worker marks its run Crashed (as Prefect's
    runner and workers do when a flow's process dies). The next run frees the slot at
    once instead of waiting for the lease to expire."""
    require_unshare()
    name = unique_lock()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path)}
    holder = HolderProcess(name, env, elsewhere=True)
    try:
        holder.run_name()
        died = holder.kill()
    finally:
        holder.close()
    with get_client(sync_client=True) as client:
        record = read_record(client, name)
        assert record is not None
        client.set_flow_run_state(UUID(record.flow_run_id), Crashed(), force=True)
    with exclusive(name, wait_seconds=LEASE_SECONDS):
        freed_after = time.monotonic() - died
    print(f"slot of a crashed run elsewhere taken over {freed_after:.1f} s after its death")
    assert freed_after < LEASE_SECONDS / 2
