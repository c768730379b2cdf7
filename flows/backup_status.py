"""backup-status: the first thing an operator opens.

Publishes the table artifact `backup-status`: per kind and source, the newest
complete backup here and in S3, its age against its schedule (fresh / LATE /
MISSING; late = older than 2 × the schedule interval in deployments/catalog.py),
its size and the trend against the previous one, and the last verified restore.
Runs hourly, by hand, and after every backup run: the automation
`proxilion-dr: backup-status after each backup` (deployments/notifications.py) starts
its deployment when a backup ends, so the backup run never waits for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_table_artifact

from deployments.catalog import backup_intervals
from flows.support.failures import run_name
from flows.support.hooks import FLOW_HOOKS
from flows.support.parameters import dr_flow
from flows.support.settings import resolve
from tasks.common.clock import utc_now
from tasks.store.kinds import KINDS
from tasks.store.local import list_local
from tasks.store.pieces import newest_local, newest_remote
from tasks.store.s3 import S3Error, list_remote
from tasks.store.status import Copies, last_verified_restores, status_rows

ARTIFACT_KEY = "backup-status"


def find_copies(
    backup_dir: Path, s3_bucket: str, s3_prefix: str, s3_endpoint_url: str | None
) -> dict[str, Copies]:
    """Every kind's complete backups, locally and in S3 (an unreachable S3 is shown,
    not a failure: the local half of the view still matters)."""
    copies: dict[str, Copies] = {}
    for kind, spec in KINDS.items():
        # a chained kind (AOF pieces): only the newest piece per source, as read fast
        local = newest_local(backup_dir, kind) if spec.chained else list_local(backup_dir, kind)
        if not s3_bucket:
            copies[kind] = Copies(local, None, "not configured (no s3_bucket)")
            continue
        lister = newest_remote if spec.chained else list_remote
        try:
            copies[kind] = Copies(local, lister(s3_bucket, s3_prefix, kind, s3_endpoint_url))
        except S3Error as error:
            copies[kind] = Copies(local, None, f"unreadable: {error}")
    return copies


def publish_status(
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
) -> list[dict[str, Any]]:
    """Build the status table and publish it under the key `backup-status` (in the
    current run); empty arguments take their PROXILION_DR_* setting."""
    p = resolve(locals())
    now = utc_now()
    copies = find_copies(
        Path(p["backup_dir"]), p["s3_bucket"], p["s3_prefix"], p["s3_endpoint_url"] or None
    )
    rows = status_rows(copies, backup_intervals(), last_verified_restores(now), now)
    late = [f"{r['kind']} ({r['source']})" for r in rows if "LATE" in (r["local"], r["S3"])]
    missing = [f"{r['kind']} ({r['source']})" for r in rows if "MISSING" in (r["local"], r["S3"])]
    summary = "; ".join(
        part
        for part in (
            f"late: {', '.join(late)}" if late else "",
            f"missing: {', '.join(missing)}" if missing else "",
        )
        if part
    )
    create_table_artifact(
        table=rows,
        key=ARTIFACT_KEY,
        description=f"Backups at {now:%Y-%m-%d %H:%M} UTC: " + (summary or "all fresh"),
    )
    return rows


@dr_flow(name="backup-status", flow_run_name=run_name("status"), log_prints=True, **FLOW_HOOKS)
def backup_status(
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
) -> list[dict[str, Any]]:
    """Show every kind's newest backup here and in S3, fresh / LATE / MISSING against
    its schedule, with size, trend and the last verified restore (artifact
    `backup-status`).

    Args:
        backup_dir: Local folder of all backups. Empty: PROXILION_DR_BACKUP_DIR
            (default /backups).
        s3_bucket: S3 bucket of the off-site copies. Empty: PROXILION_DR_S3_BUCKET
            (default: none, S3 not shown).
        s3_prefix: Folder (key prefix) in the bucket. Empty: PROXILION_DR_S3_PREFIX
            (default proxilion).
        s3_endpoint_url: S3-compatible endpoint. Empty: PROXILION_DR_S3_ENDPOINT_URL
            (default: AWS S3).
    """
    rows = publish_status(backup_dir, s3_bucket, s3_prefix, s3_endpoint_url)
    for row in rows:
        print(f"{row['kind']} {row['source']}: local {row['local']}, S3 {row['S3']}")
    return rows


if __name__ == "__main__":
    backup_status()
