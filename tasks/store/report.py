"""Run reports: one Prefect table artifact per run, readable at 3 a.m.

Reports are created in the flow run itself (plain functions, not tasks), so the
artifacts tab links them to the run. Table cells are markdown in the UI: every
value is escaped, or text such as `<timestamp>` renders as an empty HTML tag.
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_table_artifact

from tasks.store.archive import Manifest
from tasks.store.local import RetentionPlan

NOT_UPLOADED = "stored locally, NOT uploaded"


def escape_markdown(text: object) -> str:
    """Markdown-safe table text: no pipes, angle brackets or newlines breaking the row."""
    return (
        str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")
    )


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def retention_summary(plan: RetentionPlan | None) -> str:
    if plan is None:
        return "not run"
    text = f"kept {len(plan.keep)}"
    kept_by = kept_by_rule(plan)
    if kept_by:
        text += " (" + ", ".join(f"{rule}: {n}" for rule, n in kept_by.items()) + ")"
    text += f", deleted {len(plan.delete)}"
    if plan.delete:
        text += " (" + ", ".join(m.name for m in plan.delete) + ")"
    if plan.other_sources:
        text += f"; left {plan.other_sources} of other sources alone"
    if plan.locked:
        text += f"; {len(plan.locked)} still under Object Lock: " + ", ".join(plan.locked)
    if plan.extended:
        text += "; Object Lock extended for the rule keeping it: " + ", ".join(plan.extended)
    if plan.freed_bytes:
        text += f"; freed {human_size(plan.freed_bytes)}"
    if plan.future:
        text += f"; ignored {len(plan.future)} dated in the future: " + ", ".join(
            m.name for m in plan.future
        )
    return text


def kept_by_rule(plan: RetentionPlan) -> dict[str, int]:
    """How many kept backups each rule keeps (`within 7 days`, `newest 3`, `daily`…);
    a backup kept by several rules counts for each."""
    counts: dict[str, int] = {}
    for reasons in plan.reasons.values():
        for reason in reasons:
            rule = reason if reason.startswith(("newest", "within")) else reason.split(" ")[0]
            counts[rule] = counts.get(rule, 0) + 1
    return counts


def publish_backup_report(
    manifest: Manifest,
    stored_at: str,
    remote: str | None,
    retention_local: RetentionPlan | None,
    retention_remote: RetentionPlan | None,
    details: dict[str, Any],
) -> None:
    """A table artifact (key `backup-<kind>`) describing the backup just made, in the
    current flow run: the stored file, where it went, retention, then `details` (the
    kind's own facts first: its package's `describe`). `remote` is the verified S3
    URL, `None` without a bucket, or the `NOT_UPLOADED` text with the reason when the
    upload failed."""
    ratio = manifest.size / manifest.raw_size if manifest.raw_size else 0.0
    if remote and remote.startswith(NOT_UPLOADED):
        uploaded = remote
    elif remote:
        uploaded = f"{remote} (size and ETag verified)"
    else:
        uploaded = "no (no s3_bucket configured)"
    rows: list[dict[str, Any]] = [
        {"field": "backup", "value": manifest.name},
        {"field": "created at (UTC)", "value": manifest.created_at},
        {"field": "size", "value": f"{human_size(manifest.size)} ({manifest.size} bytes)"},
        {"field": "original size", "value": human_size(manifest.raw_size)},
        {"field": "ratio", "value": f"{ratio:.3f} ({manifest.compression})"},
        {"field": "sha256 (of the stored file, written with it)", "value": manifest.sha256},
        {"field": "source", "value": manifest.source_id},
        {"field": "stored locally", "value": stored_at},
        {"field": "uploaded", "value": uploaded},
        {"field": "local retention", "value": retention_summary(retention_local)},
        {"field": "remote retention", "value": retention_summary(retention_remote)},
        {"field": "total duration", "value": f"{manifest.duration_seconds:.2f} s"},
    ]
    if manifest.encryption:
        copies = (
            "the local file and the S3 copy" if manifest.encryption.get("local") else "the S3 copy"
        )
        rows.append(
            {
                "field": "age-encrypted",
                "value": f"{copies}, to {', '.join(manifest.encryption['recipients'])}; "
                f"sha256 of the encrypted file {manifest.encryption['sha256']}",
            }
        )
    rows += [{"field": key, "value": value} for key, value in details.items()]
    rows += [
        {"field": f"step: {step}", "value": f"{seconds:.3f} s"}
        for step, seconds in manifest.steps.items()
    ]
    publish_table(rows, f"backup-{manifest.kind}", f"{manifest.kind} backup {manifest.name}")


def publish_table(rows: list[dict[str, Any]], key: str, description: str) -> None:
    """A field/value table artifact with every cell escaped for markdown."""
    create_table_artifact(
        table=[{k: escape_markdown(v) for k, v in row.items()} for row in rows],
        key=key,
        description=escape_markdown(description),
    )
