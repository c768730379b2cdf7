"""Run something until it fell within one wall-clock second (real clock, no fake)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

R = TypeVar("R")


def within_one_second(run: Callable[[int], R], tries: int = 20) -> R:
    """Call `run(attempt)` until one call starts and ends in the same second (each
    attempt should use fresh data); return that call's result."""
    for attempt in range(tries):
        started = int(time.time())
        result = run(attempt)
        if int(time.time()) == started:
            return result
    pytest.fail(f"{tries} tries and never within one second: is the machine too slow?")
