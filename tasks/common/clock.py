"""UTC time as every backup name, manifest and report uses it."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_time(stamp: str) -> datetime:
    """An ISO time from a manifest; a naive one is UTC."""
    value = datetime.fromisoformat(stamp)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def elapsed(start: float) -> float:
    """Seconds since `start` (a `time.perf_counter()` value), rounded for reports."""
    return round(time.perf_counter() - start, 3)
