"""How a backup-redis-aof run ends, in the runbook's order: store each piece (manifest
last) and upload it, in chain order; upload what an earlier run left local only;
prune the generations the RDB backups no longer reach back to; report.

AOF pieces are kept as long as the RDB backups they extend: a generation goes once
the next one started before the oldest RDB backup of the same server that its age
rules keep (`retention_days`, `keep_min`; copies kept only by a GFS rule do not
count: point-in-time recovery reaches back as far as the plain RDB window). A server
without RDB backups keeps `retention_days` of AOF. Locally every run; in S3 (two
listings) when a generation starts and at the first run of each UTC hour.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from flows.support.keeping import Destination, store_copy, upload_stored
from tasks.common.clock import parse_time, utc_now
from tasks.common.errors import one_line
from tasks.redis.ship import KIND, Shipped, ShipRun
from tasks.store.archive import Manifest
from tasks.store.pieces import (
    GenerationPlan,
    generations_local,
    pieces_local,
    pieces_remote,
    prune_generations_local,
    prune_generations_remote,
    read_local,
    remote_has,
    snapshot_cutoff,
    snapshot_names_local,
    snapshot_names_remote,
)
from tasks.store.report import NOT_UPLOADED, human_size, publish_table

SNAPSHOT_KIND = "redis"  # the RDB backups the AOF pieces extend


@dataclass
class KeptPieces:
    """What happened to a run's pieces, and to older ones."""

    stored: list[str] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)
    caught_up: list[str] = field(default_factory=list)
    local: GenerationPlan | None = None
    remote: GenerationPlan | None = None


def aof_cutoff(names: list[str], source_id: str, to: Destination, now: datetime) -> datetime:
    """From when on the AOF must stay restorable: the oldest RDB backup of the server
    kept by age (see the module docstring), else `retention_days` back."""
    days, keep_min = to.retention.days, to.retention.keep_min
    reach = snapshot_cutoff(names, source_id, now, days, keep_min)
    return reach if reach is not None else now - timedelta(days=days)


def keep_pieces(
    run: ShipRun, shipped: Shipped | None, to: Destination, source_id: str
) -> KeptPieces:
    """Store and upload the run's pieces in order; when a piece an earlier run stored
    is missing in S3, upload every one it lacks; prune here and there. An upload
    failure leaves the pieces stored locally (the next run uploads them) and fails."""
    kept = KeptPieces()
    try:
        for staged in run.pieces:
            _stored, remote, _lock = store_copy(staged.file, staged.manifest, to)
            kept.stored.append(staged.manifest.name)
            if remote:
                kept.uploaded.append(staged.manifest.name)
    finally:
        for staged in run.pieces[len(kept.stored) :]:
            staged.discard()  # not stored: the next run ships those bytes again
    now = utc_now()
    local = snapshot_names_local(to.backup_dir, SNAPSHOT_KIND)
    kept.local = prune_generations_local(
        to.backup_dir, KIND, source_id, aof_cutoff(local, source_id, to, now)
    )
    if to.s3_bucket:
        if shipped is not None and not all(
            remote_has(to.s3_bucket, to.s3_prefix, name, to.s3_endpoint_url)
            for name in shipped.newest
        ):
            kept.caught_up = catch_up_pieces(to, source_id)
        if not remote_prune_due(run, shipped, now):
            return kept
        names = snapshot_names_remote(to.s3_bucket, to.s3_prefix, SNAPSHOT_KIND, to.s3_endpoint_url)
        kept.remote = prune_generations_remote(
            to.s3_bucket,
            to.s3_prefix,
            KIND,
            source_id,
            to.s3_endpoint_url,
            aof_cutoff(names, source_id, to, now),
        )
    return kept


ROUND_WINDOW = 60.0  # seconds one run's rounds spread over (the deployment: every minute)


def wait_for_round(started: float, round_: int, rounds: int) -> None:
    """Wait until round `round_` of `rounds` is due (`started`: time.monotonic() at the
    run's start); a round that is late starts at once."""
    due = started + ROUND_WINDOW * round_ / max(rounds, 1)
    time.sleep(max(0.0, due - time.monotonic()))


def remote_prune_due(run: ShipRun, shipped: Shipped | None, now: datetime) -> bool:
    """Retention in S3 (two listings) runs when a generation starts and at the first run
    of each UTC hour, not every minute; locally it runs every time (a folder listing)."""
    if shipped is None or run.new_generation or not shipped.newest_at:
        return True
    return parse_time(shipped.newest_at).strftime("%Y%m%d%H") != now.strftime("%Y%m%d%H")


def catch_up_pieces(to: Destination, source_id: str) -> list[str]:
    """Upload, in chain order, every local piece of the source that S3 lacks."""
    uploaded = []
    for generation in generations_local(to.backup_dir, KIND, source_id):
        local = pieces_local(to.backup_dir, KIND, source_id, generation)
        remote = {
            p.name
            for p in pieces_remote(
                to.s3_bucket, to.s3_prefix, KIND, source_id, generation, to.s3_endpoint_url
            )
        }
        for piece in local:
            if piece.name not in remote:
                upload_stored(to, read_local(to.backup_dir, piece.name))
                uploaded.append(piece.name)
    return uploaded


def publish_aof_report(
    run: ShipRun | None,
    kept: KeptPieces | None,
    facts: dict[str, Any],
    failure: Exception | None = None,
) -> None:
    """The table artifact `backup-redis-aof`: the pieces shipped, whether point-in-time
    recovery is available, the marker that proves the route, where they went,
    retention, notes."""
    table = dict(facts)
    if run is not None:
        table["generation"] = run.generation + (" (new)" if run.new_generation else "")
        table["pieces"] = "; ".join(_piece(s.manifest) for s in run.pieces) or "none (nothing new)"
        table["marker in piece"] = run.marker_piece or "—"
    if failure is not None:
        table["uploaded"] = f"{NOT_UPLOADED} ({one_line(failure)})"
    if kept is not None:
        table["uploaded"] = ", ".join(kept.uploaded) or "no (no s3_bucket)"
        table["earlier pieces uploaded now (S3 lacked them)"] = ", ".join(kept.caught_up) or "none"
        table["local retention"] = kept.local.summary() if kept.local else "not run"
        table["remote retention"] = (
            kept.remote.summary() if kept.remote else "not due (each hour, and at a new generation)"
        )
    rows = [{"field": k, "value": v} for k, v in table.items()]
    rows += [{"field": "note", "value": note} for note in (run.notes if run else [])]
    publish_table(rows, "backup-redis-aof", "Redis AOF shipped for point-in-time recovery")


def _piece(m: Manifest) -> str:
    s = m.source
    return (
        f"{s['file']} bytes {s['start']}-{s['end']} ({human_size(m.size)} {m.compression}, "
        f"sha256 {m.sha256[:16]}…, {s['check']})"
    )
