"""One run at a time per protected thing, through Prefect global concurrency limits.

The slot is taken with a lease of LEASE_SECONDS that Prefect renews in the
background while the holder lives. A holder killed outright (SIGKILL, OOM) stops
renewing; the Prefect server's lease reaper then frees the slot once the lease
has expired: within LEASE_SECONDS plus one reaper pass (the server setting
PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS, 15 s by default), instead of
Prefect's default 300 s.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from tasks.common.log import run_logger

WAIT_SECONDS = 900.0
# The shortest lease the Prefect 3.9 server accepts (its API refuses < 60 s);
# renewed every 45 s (Prefect renews at 75 % of the lease).
LEASE_SECONDS = 60.0


class LockBusy(TimeoutError):
    """Another run held the lock for longer than we were willing to wait."""


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
    """Hold the single slot of limit `name`; a second holder waits, then fails with
    LockBusy. Errors raised by the body pass through unchanged (a TimeoutError in
    the body is that timeout, not a busy lock)."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        busy = client.read_global_concurrency_limit_by_name(name).active_slots > 0
    if busy:  # say so in the run's log: a run waiting here otherwise looks stuck
        run_logger().warning(
            "waiting for %r: another run holds it (a backup or recovery of the same "
            "target); this run starts when it ends, or fails after %.0f s",
            name,
            wait_seconds,
        )
    with ExitStack() as held:
        try:
            held.enter_context(
                concurrency(
                    name,
                    occupy=1,
                    timeout_seconds=wait_seconds,
                    lease_duration=lease_seconds,
                    strict=True,
                )
            )
        except TimeoutError:
            raise LockBusy(
                f"another run holds {name!r} for more than {wait_seconds:.0f} s: "
                "wait for it to finish (see the Prefect UI) and run again"
            ) from None
        yield
