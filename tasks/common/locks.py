"""One run at a time per protected thing (a Redis, a Prometheus, a backup directory).

A lock has two halves (docs/locks.md says what an operator sees of each):
- this host's lock file (host_lock.py), taken first, always. The kernel frees it when
  its holder dies. Without a Prefect server (PREFECT_API_URL unset: Prefect starts a
  temporary one for the run, which frees nothing) it is the whole lock: one run per
  target and host;
- with a server, the single slot of a Prefect global concurrency limit named after
  the target (lock_slot.py), shared by every host, leased for LEASE_SECONDS and renewed
  every RENEW_SECONDS while the holder lives; the holder keeps a record of itself
  (lock_record.py) that outlives a server restart.
A run that waits says who holds the lock, and frees the slot of a holder that is
provably gone (lock_repair.py).
"""

from __future__ import annotations

import contextvars
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.settings import PREFECT_API_URL

from tasks.common.busy_server import server_client
from tasks.common.host_lock import HostLock
from tasks.common.lock_record import (
    Holder,
    describe,
    now_text,
    read_record,
    this_holder,
    write_record,
)
from tasks.common.lock_repair import free_slot_of, gone_because
from tasks.common.lock_slot import (
    SHORTEST_LEASE_SECONDS,
    Slot,
    give_back,
    leases_in_memory,
    renew,
    try_take,
)
from tasks.common.log import run_logger

WAIT_SECONDS = 900.0
LEASE_SECONDS = SHORTEST_LEASE_SECONDS
# Renewing every 10 s of a 60 s lease, a holder rides out a server restart of up to
# about 30 s (the client's retries back off 2, 4, 8, 16 s) without losing its lease.
RENEW_SECONDS = 10.0
POLL_SECONDS = 2.0  # between a waiting run's attempts at the server's slot
HOST_POLL_SECONDS = 0.5  # between its attempts at this host's lock file
FORGOTTEN_NOTE = (
    "the Prefect server forgot this run's lease (restarted, with leases in memory): "
    "the run keeps the slot and frees it when it ends"
)
_warned_servers: set[str] = set()


class LockBusy(TimeoutError):
    """Another run held the lock for longer than we were willing to wait."""


class LockLost(RuntimeError):
    """The run ended, but the server may have given its slot to another run midway."""


def lock_name(action: str, target: str) -> str:
    """A concurrency-limit name for `action` on `target` (letters, digits, dashes).

    Prefect keeps limit names for good and shows them in its UI: `target` must
    never hold a credential (give a parsed `host:port` or a path, never a URL)."""
    slug = re.sub(r"[^a-z0-9]+", "-", target.lower()).strip("-")
    return f"{action}-{slug}"[:120]


@contextmanager
def exclusive(
    name: str, wait_seconds: float = WAIT_SECONDS, lease_seconds: float = LEASE_SECONDS
) -> Iterator[None]:
    """Hold lock `name`; a second holder waits, then fails with LockBusy. Errors raised
    by the body pass through unchanged (a TimeoutError in the body is that timeout, not
    a busy lock). A body that ends well after the server may have given the slot to
    another run (no renewal for a whole lease) ends with LockLost."""
    deadline = time.monotonic() + wait_seconds
    host = HostLock(name)
    wait_for_host_lock(host, name, deadline, wait_seconds)
    try:
        me = this_holder()
        host.note(me.to_json())
        if not PREFECT_API_URL.value():
            yield
        else:
            with server_slot(name, me, deadline, wait_seconds, lease_seconds):
                yield
    finally:
        host.release()


def wait_for_host_lock(host: HostLock, name: str, deadline: float, wait_seconds: float) -> None:
    """Take this host's lock file of `name`, waiting until `deadline`."""
    announced: Holder | None = None
    while not host.take():
        holder = Holder.from_value(host.holder())
        who = f"on this host, {describe(holder)}" if holder else "a process on this host"
        if holder != announced:  # say so in the run's log: a run waiting here looks stuck
            run_logger().warning(waiting(name, who, wait_seconds))
            announced = holder
        if time.monotonic() >= deadline:
            raise LockBusy(
                f"another run holds {name!r} for more than {wait_seconds:.0f} s: {who}. Wait "
                "for it to finish (see the Prefect UI) and run again; the lock is freed when "
                "that process ends"
            )
        time.sleep(HOST_POLL_SECONDS)


def waiting(name: str, who: str, wait_seconds: float) -> str:
    return (
        f"waiting for {name!r}: another run holds it: {who}; this run starts when it "
        f"ends, or fails after {wait_seconds:.0f} s"
    )


def free_by_hand(name: str) -> str:
    return (
        "if that run is gone (its process killed, its host lost) and its slot stays taken, "
        f"free it: `prefect gcl update {name} --active-slots 0`"
    )


@contextmanager
def server_slot(
    name: str, me: Holder, deadline: float, wait_seconds: float, lease_seconds: float
) -> Iterator[None]:
    """Hold the server's slot of `name` (called while holding this host's lock file)."""
    with server_client() as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        warn_if_leases_in_memory(client)
        slot = wait_for_slot(client, name, me, deadline, wait_seconds, lease_seconds)
        try:
            me.lease_id, me.renewed = str(slot.lease_id), now_text()
            write_record(client, name, me)
            with kept(slot, name, me):
                yield
        finally:
            end_holding(client, slot, name, me)
    if slot.state == "lost":
        raise LockLost(
            f"lost {name!r} while running: no lease renewal for {slot.lease_seconds:.0f} s "
            "(the Prefect server was unreachable, or forgot the lease), so another run of "
            "the same target may have overlapped this one: check that target's runs, then "
            "run this one again"
        )


def warn_if_leases_in_memory(client: SyncPrefectClient) -> None:
    """Say once per server, in the run's log, that its restart would forget the leases."""
    url = str(client.api_url)
    if url not in _warned_servers and leases_in_memory(client):
        _warned_servers.add(url)
        run_logger().warning(
            "the Prefect server keeps concurrency leases in memory: a restart forgets them "
            "(locks then free a slot only when its holder is provably gone). Start it with "
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="
            "prefect.server.concurrency.lease_storage.filesystem (see docs/locks.md)"
        )


def wait_for_slot(
    client: SyncPrefectClient,
    name: str,
    me: Holder,
    deadline: float,
    wait_seconds: float,
    lease_seconds: float,
) -> Slot:
    """Take the slot, waiting until `deadline`; frees it from a holder proven gone."""
    announced = None
    while (slot := try_take(client, name, lease_seconds, me.flow_run_id)) is None:
        record = read_record(client, name)
        holder = record if record is not None and record.state == "holding" else None
        if holder is not None and free_if_gone(client, name, holder, me):
            continue
        who = describe(holder)
        if (holder.lease_id if holder else "") != announced:
            run_logger().warning(f"{waiting(name, who, wait_seconds)}; {free_by_hand(name)}")
            announced = holder.lease_id if holder else ""
        if time.monotonic() >= deadline:
            raise LockBusy(
                f"another run holds {name!r} for more than {wait_seconds:.0f} s: {who}. Wait "
                f"for it to finish (see the Prefect UI) and run again; {free_by_hand(name)}"
            )
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
    return slot


def free_if_gone(client: SyncPrefectClient, name: str, holder: Holder, me: Holder) -> bool:
    """Free the slot of `holder` when it is provably gone; True when this run did."""
    why = gone_because(client, holder, me)
    who = describe(holder)
    if not why or not free_slot_of(client, name, holder, me, why):
        return False
    run_logger().warning(f"freed {name!r}: its holder, {who}, is gone: {why}")
    return True


@contextmanager
def kept(slot: Slot, name: str, me: Holder) -> Iterator[None]:
    """Renew the lease and the record every RENEW_SECONDS while the body runs."""
    stop = threading.Event()
    context = contextvars.copy_context()  # this run's settings (API URL) and run logger
    thread = threading.Thread(
        target=context.run, args=(keep, slot, name, me, stop), name=f"lock {name}", daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()  # never writes the record after end_holding


def keep(slot: Slot, name: str, me: Holder, stop: threading.Event) -> None:
    with server_client() as client:
        while not stop.wait(RENEW_SECONDS):
            keep_once(client, slot, name, me)


def keep_once(client: SyncPrefectClient, slot: Slot, name: str, me: Holder) -> None:
    """One renewal; says in the run's log when the lease is forgotten or lost."""
    before, renewed_at = slot.state, slot.renewed_at
    renew(client, slot)
    if slot.state != before and slot.state == "forgotten":
        run_logger().warning(f"{name!r}: {FORGOTTEN_NOTE}")
        me.note = FORGOTTEN_NOTE
    elif slot.state != before:
        run_logger().error(
            f"lost {name!r}: no lease renewal for {slot.lease_seconds:.0f} s; the server may "
            "give the slot to another run. This run goes on, and fails at its end"
        )
    if slot.renewed_at != renewed_at or slot.state == "forgotten":
        me.renewed = now_text()
        with suppress(httpx.HTTPError):  # the next renewal writes it again
            write_record(client, name, me)


def end_holding(client: SyncPrefectClient, slot: Slot, name: str, me: Holder) -> None:
    """Give the slot back; its record says "released" first, so a run that waits never
    takes a newer holder's slot for this one's (lock_repair.py)."""
    renew(client, slot)  # tells a lease forgotten since the last renewal
    if slot.state != "lost":  # a lost slot's record may be another run's by now
        me.state, me.renewed = "released", now_text()
        with suppress(httpx.HTTPError):  # the slot goes back all the same
            write_record(client, name, me)
    try:
        give_back(client, slot)
    except httpx.HTTPError as error:
        run_logger().warning(
            f"could not give {name!r} back to the Prefect server ({type(error).__name__}): "
            "the server frees it when its lease expires, or the next run of this target "
            "does once this run has ended"
        )
