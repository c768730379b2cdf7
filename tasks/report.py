"""Run reports: one Prefect table artifact per run, readable at 3 a.m."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.archive import Manifest
from tasks.storage import RetentionPlan


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def retention_summary(plan: RetentionPlan | None) -> str:
    if plan is None:
        return "not run"
    text = f"kept {len(plan.keep)}, deleted {len(plan.delete)}"
    if plan.delete:
        text += " (" + ", ".join(m.name for m in plan.delete) + ")"
    if plan.other_sources:
        text += f"; left {plan.other_sources} of other sources alone"
    if plan.locked:
        text += f"; {len(plan.locked)} still under Object Lock: " + ", ".join(plan.locked)
    if plan.freed_bytes:
        text += f"; freed {human_size(plan.freed_bytes)}"
    if plan.future:
        text += f"; ignored {len(plan.future)} dated in the future: " + ", ".join(
            m.name for m in plan.future
        )
    return text


@task(cache_policy=NO_CACHE)
def publish_backup_report(
    manifest: Manifest,
    stored_at: str,
    remote: str | None,
    retention_local: RetentionPlan | None,
    retention_remote: RetentionPlan | None,
    details: dict[str, Any],
) -> None:
    """A table artifact (key `backup-<kind>`) describing the backup just made."""
    ratio = manifest.size / manifest.raw_size if manifest.raw_size else 0.0
    rows: list[dict[str, Any]] = [
        {"field": "backup", "value": manifest.name},
        {"field": "created at (UTC)", "value": manifest.created_at},
        {"field": "size", "value": f"{human_size(manifest.size)} ({manifest.size} bytes)"},
        {"field": "original size", "value": human_size(manifest.raw_size)},
        {"field": "ratio", "value": f"{ratio:.3f} ({manifest.compression})"},
        {"field": "sha256", "value": manifest.sha256},
        {"field": "source", "value": manifest.source_id},
        {"field": "stored locally", "value": stored_at},
        {"field": "uploaded", "value": remote or "no (no s3_bucket configured)"},
        {"field": "local retention", "value": retention_summary(retention_local)},
        {"field": "remote retention", "value": retention_summary(retention_remote)},
        {"field": "total duration", "value": f"{manifest.duration_seconds:.2f} s"},
    ]
    rows += [{"field": key, "value": str(value)} for key, value in details.items()]
    rows += [
        {"field": f"step: {step}", "value": f"{seconds:.3f} s"}
        for step, seconds in manifest.steps.items()
    ]
    create_table_artifact(
        table=rows,
        key=f"backup-{manifest.kind}",
        description=f"{manifest.kind} backup {manifest.name}",
    )
