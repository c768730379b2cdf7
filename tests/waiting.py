"""Waiting on a condition with a deadline: what tests do instead of sleeping."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

_STAMP = re.compile(r"_(\d{8}_\d{6})_")


def wait_until(
    condition: Callable[[], object],
    what: str,
    timeout: float = 30.0,
    explain: Callable[[], str] = lambda: "",
) -> None:
    """Poll `condition` until it is true; fail naming `what` (and `explain()`) after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f} s{explain()}")
        time.sleep(0.05)


def past_the_second_of(name: str) -> None:
    """Backup names have a one-second resolution: return once the clock has left the
    second `name` is stamped with, so that the next backup of its source is named apart."""
    stamp = _STAMP.search(name)
    assert stamp, f"{name} holds no _YYYYmmdd_HHMMSS_ stamp"
    second = datetime.strptime(stamp.group(1), "%Y%m%d_%H%M%S").replace(tzinfo=UTC).timestamp()
    wait_until(lambda: time.time() >= second + 1, f"the clock past {stamp.group(1)}", 5.0)
