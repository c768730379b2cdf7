"""The Prefect server's half of a component lock: the single slot of a global
concurrency limit, leased, renewed and given back by this process.

Prefect keeps the count of taken slots in its database and each slot's lease in its
lease storage: in the server's memory unless PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE
says otherwise. A restart then forgets every lease while the counts stay, and no
expiry, renewal or release frees those slots again. So a renewal here tells three
outcomes apart (`Slot.state`):

- held: the server renewed the lease;
- forgotten: the server answered that the lease is gone less than a lease's length
  after the last renewal, so it cannot have expired: the server lost it. The count is
  still this run's; the run keeps it and gives it back by name when it ends;
- lost: no renewal for a whole lease (server unreachable), or the lease gone after
  that: the server may have freed the slot for another run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import ConcurrencyLeaseHolder

# What the server answers for a lease it does not know (Prefect 3.9: 410 Gone).
LEASE_GONE = {404, 410}
SLOT_TAKEN = 423
IN_MEMORY = "prefect.server.concurrency.lease_storage.memory"
# The shortest lease the Prefect 3.9 server accepts (its API refuses less).
SHORTEST_LEASE_SECONDS = 60.0


@dataclass
class Slot:
    """The slot this process holds, and what it knows of its lease."""

    name: str
    lease_id: UUID
    lease_seconds: float
    # time.monotonic() when the last renewal the server accepted was sent: the
    # server's lease runs at least until renewed_at + lease_seconds.
    renewed_at: float = field(default_factory=time.monotonic)
    state: Literal["held", "forgotten", "lost"] = "held"
    taken_at: float = field(default_factory=time.monotonic)


def try_take(
    client: SyncPrefectClient, name: str, lease_seconds: float, flow_run_id: str
) -> Slot | None:
    """One attempt at the slot of limit `name`; None while another run holds it."""
    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run_id)) if flow_run_id else None
    sent = time.monotonic()
    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=lease_seconds, holder=holder
        )
    except httpx.HTTPStatusError as error:
        if error.response.status_code == SLOT_TAKEN:
            return None
        raise
    lease_id = UUID(response.json()["lease_id"])
    return Slot(name, lease_id, lease_seconds, renewed_at=sent, taken_at=sent)


def renew(client: SyncPrefectClient, slot: Slot) -> None:
    """Renew a held slot's lease; on failure move it to forgotten or lost (see above)."""
    if slot.state != "held":
        return
    sent = time.monotonic()
    try:
        client.renew_concurrency_lease(lease_id=slot.lease_id, lease_duration=slot.lease_seconds)
    except httpx.HTTPStatusError as error:
        if error.response.status_code in LEASE_GONE:
            slot.state = "forgotten" if lease_still_running(slot) else "lost"
        elif not lease_still_running(slot):
            slot.state = "lost"
        return
    except httpx.TransportError:  # the server is unreachable (restarting?)
        if not lease_still_running(slot):
            slot.state = "lost"
        return
    slot.renewed_at = sent


def lease_still_running(slot: Slot) -> bool:
    """True while the server cannot have let the lease expire."""
    return time.monotonic() < slot.renewed_at + slot.lease_seconds


def give_back(client: SyncPrefectClient, slot: Slot) -> None:
    """Free the slot (after a last `renew`, which tells a lease forgotten since): by
    its lease, or by name when the server forgot the lease (the count is this run's).
    A lost slot is only released by its lease, which does nothing once the lease is
    gone: the count may be another run's by now."""
    if slot.state == "forgotten":
        release_by_name(client, slot.name, time.monotonic() - slot.taken_at)
    else:
        client.release_concurrency_slots_with_lease(lease_id=slot.lease_id)


def release_by_name(client: SyncPrefectClient, name: str, occupied_seconds: float) -> None:
    client.release_concurrency_slots(
        names=[name], slots=1, occupancy_seconds=max(occupied_seconds, 0.001)
    )


def lease_known(client: SyncPrefectClient, lease_id: UUID) -> bool:
    """Whether the server still knows a lease (asked by renewing it: harmless for a
    lease about to be released)."""
    try:
        client.renew_concurrency_lease(lease_id=lease_id, lease_duration=SHORTEST_LEASE_SECONDS)
    except httpx.HTTPStatusError as error:
        if error.response.status_code in LEASE_GONE:
            return False
        raise
    return True


_STORAGE_BY_SERVER: dict[str, str] = {}


def lease_storage(client: SyncPrefectClient) -> str:
    """The server's PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE, read once per server from
    its settings endpoint (which masks secrets; only this one is read); "" when the
    server does not say."""
    url = str(client.api_url)
    if url not in _STORAGE_BY_SERVER:
        try:
            settings = client.request("GET", "/admin/settings").json()  # type: ignore[arg-type]
            _STORAGE_BY_SERVER[url] = str(settings["server"]["concurrency"]["lease_storage"])
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            _STORAGE_BY_SERVER[url] = ""
    return _STORAGE_BY_SERVER[url]


def leases_in_memory(client: SyncPrefectClient) -> bool:
    """True when the server says it keeps leases in memory (its restart forgets them)."""
    return lease_storage(client) == IN_MEMORY
