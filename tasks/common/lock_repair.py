"""Freeing, without a person, the Prefect slot of a lock holder that is provably gone.

Provably gone (`gone_because`), checked by a run that waits while it holds this
host's lock file:
- the holder ran on this host with the same lock directory in this boot: it held the
  lock file while it held the slot, and this run now holds that file, so the holder's
  process has ended;
- the holder ran on this machine in an earlier boot: the machine has restarted since;
- the holder's flow run has ended (Completed, Failed, Crashed, Cancelled): its
  process may have been killed before it gave the slot back, or the server forgot
  the lease.
A holder on another host, killed without its run being marked ended, is not provably
gone: the server's lease reaper frees its slot once its lease expires, if the server
still knows the lease (filesystem lease storage survives a restart).
"""

from __future__ import annotations

import time
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import VariableCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.common.lock_record import Holder, now_text, read_record, write_record
from tasks.common.lock_slot import (
    lease_known,
    leases_in_memory,
    release_by_name,
)

# A run that takes a slot writes its record right after: a run about to free a slot by
# name waits this long first, and then frees it only if the record has not changed.
SETTLE_SECONDS = 5.0
CLAIM_PREFIX = "lock-freed-"


def gone_because(client: SyncPrefectClient, holder: Holder, me: Holder) -> str:
    """Why `holder` is provably gone, or "" when it is not (see the module's doc).
    Only valid while `me` holds this host's lock file of the same lock."""
    if holder.domain and holder.domain == me.domain:
        return f"its process (pid {holder.pid} on this host) has ended"
    if holder.machine and holder.machine == me.machine and holder.boot != me.boot:
        return f"its host {holder.host} has restarted since"
    if holder.flow_run_id:
        try:
            run = client.read_flow_run(UUID(holder.flow_run_id))
        except ObjectNotFound:
            return ""
        if run.state is not None and run.state.is_final():
            return f"its flow run has ended ({run.state.name})"
    return ""


def free_slot_of(
    client: SyncPrefectClient, lock: str, holder: Holder, me: Holder, why: str
) -> bool:
    """Free the slot that `holder`, proven gone, left taken; True when this run did.

    By the holder's lease when the server still knows it: atomic, and a second run
    doing the same frees nothing more. Otherwise only if the server may have forgotten
    the lease (kept in its memory), by name and once per lease: the run that creates
    the variable lock-freed-<lease> does it, after SETTLE_SECONDS, if the record still
    names that lease (else a new holder has taken the slot meanwhile). A server that
    does not say where it keeps leases is taken to keep them: nothing is freed by name."""
    if not holder.lease_id:
        return False
    lease = UUID(holder.lease_id)
    if lease_known(client, lease):
        mark_freed(client, lock, holder, me, why)
        client.release_concurrency_slots_with_lease(lease_id=lease)
        return True
    if not leases_in_memory(client) or not claim(client, lock, holder, me, why):
        return False
    time.sleep(SETTLE_SECONDS)
    again = read_record(client, lock)
    if again is None or again.lease_id != holder.lease_id or again.state != "holding":
        return False
    mark_freed(client, lock, holder, me, why)
    release_by_name(client, lock, occupied_seconds=0.0)
    return True


def claim(client: SyncPrefectClient, lock: str, holder: Holder, me: Holder, why: str) -> bool:
    """Create lock-freed-<lease>: True for the one run that does (a record of who freed
    what, kept in Prefect's Variables)."""
    value = {"lock": lock, "holder": holder.run or holder.flow_run_id, "why": why}
    value |= {"freed_by": me.run or f"pid {me.pid} on {me.host}", "at": now_text()}
    try:
        client.create_variable(VariableCreate(name=CLAIM_PREFIX + holder.lease_id, value=value))
    except ObjectAlreadyExists:
        return False
    return True


def mark_freed(client: SyncPrefectClient, lock: str, holder: Holder, me: Holder, why: str) -> None:
    """Record, before freeing the slot, that the holder's slot was freed and by whom."""
    holder.state = "freed"
    holder.note = f"freed at {now_text()} by {me.run or f'pid {me.pid} on {me.host}'}: {why}"
    write_record(client, lock, holder)
