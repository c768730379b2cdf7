"""prune-backups: apply retention to one kind's backups now, here and in S3, or (dry
run) list what would go and which rule keeps the rest.

Every backup run already prunes its own source's backups after it stored one; this
is for checking new rules before they act (`dry_run`), and for sources no longer
backed up. The same plan (tasks/store/local.py `plan_retention`; AOF generations:
flows/support/shipping.py) as the backups apply.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.artifacts import create_table_artifact

from flows.support.failures import run_name
from flows.support.hooks import FLOW_HOOKS
from flows.support.keeping import Destination
from flows.support.parameter_docs import shared_args
from flows.support.parameters import dr_flow
from flows.support.settings import resolve, settings
from flows.support.shipping import aof_cutoff
from tasks.common.clock import utc_now
from tasks.store.archive import Manifest
from tasks.store.kinds import KINDS, source_of
from tasks.store.local import RetentionPlan, list_local, prune_local
from tasks.store.pieces import (
    GenerationPlan,
    prune_generations_local,
    prune_generations_remote,
    snapshot_names_local,
    snapshot_names_remote,
)
from tasks.store.report import escape_markdown
from tasks.store.s3 import list_remote, prune_remote

Kind = Literal["redis", "prometheus", "config", "logs", "redis-aof"]


@dr_flow(name="prune-backups", flow_run_name=run_name("prune"), log_prints=True, **FLOW_HOOKS)
@shared_args
def prune_backups(
    kind: Kind = "redis",
    source: str = "",
    dry_run: bool = False,
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
    retention_days: float | None = None,
    keep_min: int | None = None,
    keep_hourly: int | None = None,
    keep_daily: int | None = None,
    keep_weekly: int | None = None,
    keep_monthly: int | None = None,
    keep_yearly: int | None = None,
) -> dict[str, Any]:
    """Apply retention to the `kind` backups of every source (or of `source`) in the
    backup dir and in S3; the report lists each backup, kept or deleted, and the
    rules that keep it. AOF pieces (redis-aof) go by generation, as far back as the
    Redis RDB backups of the same server reach.

    Args:
        kind: Which backups: redis, prometheus, config, logs, or redis-aof (the
            AOF pieces of backup-redis-aof).
        source: Only the backups of this source, as the reports name it
            (`redis.internal:6379`, `/opt/proxilion`). Empty: every source found.
        dry_run: ON: list what would be deleted and which rule keeps each backup
            that stays; nothing is deleted. OFF (the default): backups no rule keeps
            are DELETED here and in S3 (nothing is REPLACED; the newest backup of a
            source and the newest keep_min always stay).
        {backup_place}
        retention_days: Days a backup is kept. None (empty): the kind's
            PROXILION_DR_<KIND>_RETENTION_DAYS (7 for redis and redis-aof, 30 for
            prometheus and logs, 90 for config).
        {gfs_rules:KIND}
    """
    rules_kind = "redis" if kind == "redis-aof" else kind
    given = dict(locals())
    if retention_days is None:
        given["retention_days"] = getattr(settings(), f"{rules_kind}_retention_days")
    p = resolve(given)
    to = Destination.from_parameters(p, rules_kind)
    rows: list[dict[str, Any]] = []
    if KINDS[kind].chained:
        for place, plan in prune_chains(to, kind, source, dry_run):
            rows += generation_rows(place, plan, dry_run)
    else:
        for place, plan in prune_snapshots(to, kind, source, dry_run):
            rows += backup_rows(place, plan, dry_run)
    title = f"{kind}: {to.retention.describe()}" + (
        " (DRY RUN: nothing deleted)" if dry_run else ""
    )
    create_table_artifact(
        table=[{k: escape_markdown(v) for k, v in row.items()} for row in rows],
        key="prune-backups",
        description=escape_markdown(title),
    )
    gone = [r["backup"] for r in rows if r["verdict"] != "keep"]
    print(
        f"{title}: {len(rows) - len(gone)} kept, {len(gone)} {'would go' if dry_run else 'deleted'}"
    )
    return {"kind": kind, "dry_run": dry_run, "rules": to.retention.describe(), "rows": rows}


def _sources(manifests: list[Manifest], source: str) -> list[str]:
    return [source] if source else sorted({source_of(m) for m in manifests} - {""})


def prune_snapshots(
    to: Destination, kind: str, source: str, dry_run: bool
) -> list[tuple[str, RetentionPlan]]:
    """Each source's plan (and pruning) here, then in S3."""
    plans = []
    for s in _sources(list_local(to.backup_dir, kind), source):
        plans.append(("local", prune_local(to.backup_dir, kind, s, to.retention, dry_run)))
    if to.s3_bucket:
        remote = list_remote(to.s3_bucket, to.s3_prefix, kind, to.s3_endpoint_url)
        for s in _sources(remote, source):
            plan = prune_remote(
                to.s3_bucket, to.s3_prefix, kind, s, to.s3_endpoint_url, to.retention, dry_run,
                lock_mode=to.object_lock,
            )  # fmt: skip
            plans.append(("S3", plan))
    return plans


def prune_chains(
    to: Destination, kind: str, source: str, dry_run: bool
) -> list[tuple[str, GenerationPlan]]:
    """The AOF generations of `source` (required: a generation folder names only its
    source's tag) here and in S3."""
    if not source:
        raise ValueError("redis-aof: give source (`host:port` of the Redis) to prune its AOF")
    now = utc_now()
    names = snapshot_names_local(to.backup_dir, "redis")
    plans = [("local", prune_generations_local(
        to.backup_dir, kind, source, aof_cutoff(names, source, to, now), dry_run
    ))]  # fmt: skip
    if to.s3_bucket:
        names = snapshot_names_remote(to.s3_bucket, to.s3_prefix, "redis", to.s3_endpoint_url)
        plans.append(("S3", prune_generations_remote(
            to.s3_bucket, to.s3_prefix, kind, source, to.s3_endpoint_url,
            aof_cutoff(names, source, to, now), dry_run,
        )))  # fmt: skip
    return plans


def backup_rows(place: str, plan: RetentionPlan, dry_run: bool) -> list[dict[str, Any]]:
    gone = "would delete" if dry_run else "DELETED"
    rows = [
        {
            "where": place,
            "backup": m.name,
            "created (UTC)": m.created_at[:19].replace("T", " "),
            "verdict": "keep",
            "kept by": ", ".join(plan.reasons.get(m.name, [])),
        }
        for m in plan.keep
    ]
    rows += [
        {
            "where": place,
            "backup": m.name,
            "created (UTC)": m.created_at[:19].replace("T", " "),
            "verdict": gone,
            "kept by": "no rule",
        }
        for m in plan.delete
    ]
    rows += [{"where": place, "backup": n, "created (UTC)": "", "verdict": "keep",
              "kept by": "still under Object Lock"} for n in plan.locked]  # fmt: skip
    return sorted(rows, key=lambda r: r["created (UTC)"], reverse=True)


def generation_rows(place: str, plan: GenerationPlan, dry_run: bool) -> list[dict[str, Any]]:
    since = f"{plan.cutoff:%Y-%m-%d %H:%M:%S} UTC" if plan.cutoff else "?"
    rows = [
        {"where": place, "backup": g, "created (UTC)": g[:15], "verdict": "keep",
         "kept by": f"covers times since {since} (the RDB backups' reach)"}
        for g in plan.keep
    ]  # fmt: skip
    rows += [
        {"where": place, "backup": g, "created (UTC)": g[:15],
         "verdict": "would delete" if dry_run else "DELETED", "kept by": "no rule"}
        for g in plan.delete
    ]  # fmt: skip
    return rows
