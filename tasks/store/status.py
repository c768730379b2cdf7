"""The at-a-glance view: per kind and source, the newest complete backup here and in
S3, its age against its schedule (fresh / late / missing), its size and trend, and
the last verified restore. Pure functions over manifests, plus the Prefect lookup of
verified restores."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort

from tasks.common.clock import age_text, parse_time
from tasks.store.archive import Manifest
from tasks.store.kinds import KINDS, source_of
from tasks.store.local import FUTURE_TOLERANCE
from tasks.store.report import human_size

FRESH = "fresh"
LATE = "LATE"
MISSING = "MISSING"
NEVER = "never"
# The table artifact every recovery and the drill publish with the restores they
# proved (kind, source, backup): what "last verified restore" counts, per source.
PROOF_KEY = "restore-proof"
PROOFS_READ = 500
# The most a Prefect server returns per request unless told otherwise
# (PREFECT_SERVER_API_DEFAULT_LIMIT): a larger limit is refused with 422.
SERVER_PAGE = 200


@dataclass(frozen=True)
class Copies:
    """Where a kind's backups were looked for: manifests per place, or why a place
    could not be read (S3 unreachable) or is not used (no bucket)."""

    local: list[Manifest]
    remote: list[Manifest] | None  # None: not read (see `remote_note`)
    remote_note: str = ""


def freshness(newest: Manifest | None, interval: timedelta | None, now: datetime) -> str:
    """fresh, LATE (older than 2 × the schedule interval) or MISSING (no backup)."""
    if newest is None:
        return MISSING
    if interval is None:
        return FRESH
    return LATE if now - parse_time(newest.created_at) > 2 * interval else FRESH


def _current(backups: Iterable[Manifest], now: datetime) -> list[Manifest]:
    """Oldest first, without backups dated in the future (a wrong clock)."""
    return sorted(
        (m for m in backups if parse_time(m.created_at) <= now + FUTURE_TOLERANCE),
        key=lambda m: m.created_at,
    )


def _place(backups: list[Manifest], interval: timedelta | None, now: datetime) -> tuple[str, str]:
    """(newest backup with its age, its freshness) of one place."""
    newest = backups[-1] if backups else None
    state = freshness(newest, interval, now)
    if newest is None:
        return "none", state
    age = age_text((now - parse_time(newest.created_at)).total_seconds())
    return f"{newest.name.rsplit('/', 1)[-1]} ({age} old)", state


def trend(backups: list[Manifest]) -> str:
    """Size change of the newest backup against the one before it."""
    if not backups:
        return "—"
    if len(backups) == 1:
        return "first backup"
    previous, newest = backups[-2].size, backups[-1].size
    if previous == 0:
        return f"from 0 B to {human_size(newest)}"
    change = (newest - previous) / previous * 100
    return f"{change:+.1f}% (from {human_size(previous)})"


def status_rows(
    copies: dict[str, Copies],
    intervals: dict[str, timedelta],
    verified: dict[tuple[str, str], str],
    now: datetime,
) -> list[dict[str, Any]]:
    """One row per kind and source; a kind with no backup anywhere gets a MISSING row."""
    rows: list[dict[str, Any]] = []
    for kind, found in copies.items():
        interval = intervals.get(kind)
        local = _current(found.local, now)
        remote = _current(found.remote or [], now)
        sources = sorted({source_of(m) for m in local} | {source_of(m) for m in remote})
        for source in sources or ["—"]:
            here = [m for m in local if source_of(m) == source]
            there = [m for m in remote if source_of(m) == source]
            newest_local, local_state = _place(here, interval, now)
            if found.remote is None:
                newest_remote, remote_state = found.remote_note, "—"
            else:
                newest_remote, remote_state = _place(there, interval, now)
            history = here if here else there
            chained = KINDS[kind].chained if kind in KINDS else False
            rows.append(
                {
                    "kind": kind,
                    "source": source or "(not recorded)",
                    "schedule": _schedule(interval),
                    "newest local": newest_local,
                    "local": local_state,
                    "newest in S3": newest_remote,
                    "S3": remote_state,
                    "size": human_size(history[-1].size) if history else "—",
                    "trend": "AOF pieces" if chained else trend(history),
                    "last verified restore": verified.get((kind, source), NEVER),
                }
            )
    return rows


def _schedule(interval: timedelta | None) -> str:
    if interval is None:
        return "none (late never)"
    return f"every {_whole(interval)} (late after {_whole(2 * interval)})"


def _whole(span: timedelta) -> str:
    """A schedule interval in its largest whole unit: `6 h`, `1 day`, `14 days`."""
    seconds = int(span.total_seconds())
    if seconds % 86400 == 0:
        days = seconds // 86400
        return f"{days} day" if days == 1 else f"{days} days"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min"


def proof_rows(proven: list[tuple[str, str, str]], flow: str) -> list[dict[str, str]]:
    """The rows of a `restore-proof` artifact: (kind, source, backup) proven by `flow`."""
    return [
        {"kind": kind, "source": source, "backup": backup, "flow": flow}
        for kind, source, backup in proven
    ]


def last_verified_restores(now: datetime) -> dict[tuple[str, str], str]:
    """Per kind and source, the newest restore a recovery or the drill proved (its
    `restore-proof` artifact: only the components and sources it checked against their
    manifests): when and by which flow. Kinds and sources without one are absent."""
    artifacts = []
    with get_client(sync_client=True) as client:
        while len(artifacts) < PROOFS_READ:
            page = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROOF_KEY])),
                sort=ArtifactSort.CREATED_DESC,
                limit=min(SERVER_PAGE, PROOFS_READ - len(artifacts)),
                offset=len(artifacts),
            )
            artifacts += page
            if len(page) < SERVER_PAGE:
                break
    verified: dict[tuple[str, str], str] = {}
    for artifact in artifacts:
        data = artifact.data
        rows = json.loads(data) if isinstance(data, str) else data or []
        when = artifact.created
        for row in rows:
            ago = age_text((now - when).total_seconds()) if when else "?"
            text = f"{when:%Y-%m-%d %H:%M} UTC by {row.get('flow', '?')} ({ago} ago)"
            verified.setdefault((row["kind"], row["source"]), text)
    return verified
