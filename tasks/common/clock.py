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


def age_text(seconds: float) -> str:
    """An age for a report, in the unit an operator reads at a glance (every report
    and table uses this one, so one backup never reads "17 s" and "0.0 h")."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
