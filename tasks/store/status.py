"""The at-a-glance view: per kind and source, the newest complete backup here and in
S3, its age against its schedule (fresh / late / missing), its size and trend, and
the last verified restore. Pure functions over manifests, plus the Prefect lookup of
verified restores."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort

from tasks.common.clock import age_text, parse_time
from tasks.store.archive import Manifest
from tasks.store.kinds import KINDS, source_of
from tasks.store.local import FUTURE_TOLERANCE
from tasks.store.report import human_size

FRESH = "fresh"
LATE = "LATE"
MISSING = "MISSING"
NEVER = "never"
# Flows whose completed (not dry) run proves a restore of a kind worked.
RESTORE_FLOWS: dict[str, tuple[str, ...]] = {
    "redis": ("verify-restore", "recover-redis", "recover-host"),
    "prometheus": ("verify-restore", "recover-prometheus", "recover-host"),
    "config": ("verify-restore", "recover-host"),
    "logs": ("verify-restore",),
    "redis-aof": ("verify-restore", "recover-redis"),
}
# A run of these restores the kind only with these parameters set (recover-redis
# restores an RDB backup unless it is given a point in time).
RESTORE_PARAMETERS: dict[str, dict[str, tuple[str, ...]]] = {
    "redis-aof": {"recover-redis": ("target_time", "undo_flushall")},
    "redis": {"recover-redis": ()},
}


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
    verified: dict[str, str],
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
                    "last verified restore": verified.get(kind, NEVER),
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


def last_verified_restores(now: datetime) -> dict[str, str]:
    """Per kind, the newest completed run (not a dry run) of a flow that restores and
    verifies it (`RESTORE_FLOWS`): its end time and flow; kinds without one are absent."""
    names = sorted({name for flows in RESTORE_FLOWS.values() for name in flows})
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(flow_filter=_named(names))}
        runs = client.read_flow_runs(
            flow_filter=_named(names),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))
            ),
            sort=FlowRunSort.END_TIME_DESC,
            limit=200,
        )
    verified: dict[str, str] = {}
    for run in runs:
        if run.parameters.get("dry_run") or run.end_time is None:
            continue
        flow = flows.get(run.flow_id, "?")
        ended = run.end_time
        text = (
            f"{ended:%Y-%m-%d %H:%M} UTC by {flow} ({age_text((now - ended).total_seconds())} ago)"
        )
        for kind, restoring in RESTORE_FLOWS.items():
            if flow in restoring and _restores(kind, flow, run.parameters):
                verified.setdefault(kind, text)
    return verified


def _restores(kind: str, flow: str, parameters: dict[str, Any]) -> bool:
    """Did this run restore `kind` (see RESTORE_PARAMETERS)?"""
    needed = RESTORE_PARAMETERS.get(kind, {}).get(flow)
    if needed is None:
        return True
    point_in_time = any(parameters.get(name) for name in ("target_time", "undo_flushall"))
    return point_in_time if needed else not point_in_time


def _named(names: list[str]) -> FlowFilter:
    return FlowFilter(name=FlowFilterName(any_=names))
