"""One run at a time per protected thing, through Prefect global concurrency limits."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

WAIT_SECONDS = 900.0


def lock_name(action: str, target: str) -> str:
    """A concurrency-limit name for `action` on `target` (letters, digits, dashes)."""
    slug = re.sub(r"[^a-z0-9]+", "-", target.lower()).strip("-")
    return f"{action}-{slug}"[:120]


@contextmanager
def exclusive(name: str, wait_seconds: float = WAIT_SECONDS) -> Iterator[None]:
    """Hold the single slot of limit `name`; a second holder waits, then fails clearly."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    try:
        with concurrency(name, occupy=1, timeout_seconds=wait_seconds, strict=True):
            yield
    except TimeoutError:
        raise TimeoutError(
            f"another run holds {name!r} for more than {wait_seconds:.0f} s: "
            "wait for it to finish (see the Prefect UI) and run again"
        ) from None
