"""verify-restore: the monthly restore drill; proves every kind of backup restores.

Runbook steps ("Monthly restore test"): remove what a killed drill left behind, then
for each component — find the backup (newest complete one, or the one named; here,
else S3) and verify its checksum, restore it into a scratch environment beside the
live stack (`drill-redis`, `drill-gateway`, `drill-prometheus`: the live containers'
images, free ports, their own data folders, the `proxilion-dr.drill` label) and prove
it (the config backup's compose project is brought up too, isolated under its own
project name: tasks/drill/compose.py); tear the scratch environment down whatever
happened; publish one report (per
component: backup used, its age = RPO, restore time = RTO, each check with its
evidence), push the outcome to the Pushgateway, and fail naming every failed check.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Literal

from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.support.drills import DRILLS, Drill
from flows.support.failures import run_name
from flows.support.hooks import FLOW_HOOKS
from flows.support.parameter_docs import shared_args
from flows.support.parameters import dr_flow
from flows.support.pushes import drill_failed, pushgateway_url, with_hooks
from flows.support.recovery import BackupSource, Recovery, Step, publish_proofs
from flows.support.settings import SETTING, resolve
from tasks.common import pushgateway as metrics
from tasks.common.clock import age_text
from tasks.common.errors import one_line
from tasks.common.locks import exclusive, lock_name
from tasks.drill.scratch import (
    Scratch,
    new_scratch,
    one_drill_per_host,
    remove_leftovers,
    tear_down,
)
from tasks.store.report import escape_markdown

Component = Literal["redis", "redis-aof", "prometheus", "config", "logs"]
COMPONENTS: tuple[Component, ...] = ("redis", "redis-aof", "prometheus", "config", "logs")
FLOW = "verify-restore"


class DrillFailed(RuntimeError):
    """One or more checks of the drill failed; the message names each."""


@dr_flow(
    name=FLOW,
    flow_run_name=run_name("restore drill"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, drill_failed(), states=("on_crashed",)),
)
@shared_args
def verify_restore(
    components: list[Component] | None = None,
    redis_backup: str = "latest",
    prometheus_backup: str = "latest",
    config_backup: str = "latest",
    logs_backup: str = "latest",
    redis_container: str = SETTING,
    gateway_container: str = SETTING,
    prometheus_container: str = SETTING,
    redis_image: str = "",
    gateway_image: str = "",
    prometheus_image: str = "",
    scratch_dir: str = "",
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
    age_identity_file: str = "",
    start_timeout_seconds: float = 300.0,
) -> dict[str, Any]:
    """Restore backups into scratch containers beside the live stack and prove them.

    Nothing live is touched: the live containers are only inspected for their image,
    programs and settings. Fails when any check fails, naming each failed check.
    Returns per component: backup used, RPO, RTO and every check with its evidence.

    Args:
        components: What to drill: redis (with a gateway against it), redis-aof
            (the newest AOF shipped, restored to a time: marker keys written before
            it present, after it absent; skipped when none was shipped), prometheus,
            config, logs. Empty: all five.
        redis_backup: `latest` (newest complete Redis backup of any server) or a name
            as listed, e.g. `redis/dump_20260101_000000_1a2b3c4d.rdb.gz`.
        prometheus_backup: `latest` or a Prometheus backup's name.
        config_backup: `latest` or a config backup's name.
        logs_backup: `latest` or a log backup's name.
        redis_container: Live Redis container whose image the drill's Redis runs.
            `setting`: PROXILION_DR_REDIS_CONTAINER (default proxilion-redis).
        gateway_container: Live gateway container whose image, command and settings the
            drill's gateway uses (REDIS_HOST, REDIS_PORT, REDIS_URL, GATEWAY_HOST and
            GATEWAY_PORT always set to the drill's).
            `setting`: PROXILION_DR_GATEWAY_CONTAINER (default proxilion-gateway).
        prometheus_container: Live Prometheus container whose image the drill uses.
            `setting`: PROXILION_DR_PROMETHEUS_CONTAINER (default prometheus).
        redis_image: Run the drill's Redis from this image instead (e.g. a newer Redis);
            empty = the live container's image.
        gateway_image: Run the drill's gateway from this image instead; empty = live's.
        prometheus_image: Run the drill's Prometheus from this image instead; empty =
            the live container's image.
        scratch_dir: Host folder for the drill's data (a `drill-<run>` folder inside,
            removed afterwards). Empty: PROXILION_DR_DRILL_SCRATCH_DIR
            (default /var/tmp/proxilion-dr-drill).
        {backup_source}
        start_timeout_seconds: Seconds each scratch service may take to start and load.
    """
    given = {name: value for name, value in locals().items() if name != "components"}
    p = resolve(given, scratch_dir="drill_scratch_dir")
    chosen = list(dict.fromkeys(components or COMPONENTS))
    drill = Drill(
        source=BackupSource.of(p),
        backups={
            "redis": redis_backup,
            "prometheus": prometheus_backup,
            "config": config_backup,
            "logs": logs_backup,
            "redis-aof": "latest",
        },
        redis_container=p["redis_container"],
        gateway_container=p["gateway_container"],
        prometheus_container=p["prometheus_container"],
        redis_image=redis_image or None,
        gateway_image=gateway_image or None,
        prometheus_image=prometheus_image or None,
        timeout=start_timeout_seconds,
    )
    scratch_root = Path(p["scratch_dir"])
    started = time.perf_counter()
    records: list[Recovery] = []
    notes: list[str] = []
    try:
        with exclusive(lock_name(FLOW, str(scratch_root))), one_drill_per_host():
            removed = remove_leftovers(scratch_root)
            if removed:
                notes.append(f"removed leftovers of an earlier drill: {', '.join(removed)}")
                print(f"Removed leftovers of an earlier drill: {', '.join(removed)}")
            run = str(flow_run.get_id() or time.time_ns())
            scratch = new_scratch(scratch_root, run)
            try:
                for component in chosen:
                    records.append(drill_one(component, drill, scratch))
            finally:
                left = tear_down(scratch)
                if left:
                    notes.append(f"could not remove: {', '.join(left)} (the next drill will)")
    except Exception:  # the drill could not even run (Docker down, lock busy): say so
        metrics.push_drill(pushgateway_url(), False, time.perf_counter() - started)
        raise
    return _finish(records, notes, time.perf_counter() - started)


def drill_one(component: Component, drill: Drill, scratch: Scratch) -> Recovery:
    """One component's drill, recorded; a failure stops that component only."""
    r = Recovery(component)
    try:
        DRILLS[component](r, drill, scratch)
        r.healthy()
    except Exception as error:  # noqa: BLE001 - recorded; the drill goes on
        if r.failed_step() is None:
            r.steps.append(Step("drill", "failed", 0.0, one_line(error)))
    finally:
        r.discard_temporary()
    return r


# ------------------------------------------------------------------------ report


def _finish(records: list[Recovery], notes: list[str], seconds: float) -> dict[str, Any]:
    """Publish the report, push the outcome, fail naming every failed check."""
    failed = [r for r in records if r.failed_step()]
    gateway = pushgateway_url()
    for r in records:
        metrics.push_restore(
            gateway, r.flow, r.failed_step() is None, r.healthy_seconds, metrics.RESTORE_JOB
        )
    metrics.push_drill(gateway, not failed, seconds)
    proven = [proof for r in records for proof in r.proven]
    if proven:
        publish_proofs(proven, FLOW)
    message = "; ".join(r.failure() for r in failed)
    create_markdown_artifact(
        markdown=report(records, notes, seconds, message),
        key=FLOW,
        description="restore drill report",
    )
    if failed:
        raise DrillFailed(f"{FLOW} failed: {message}")
    return {
        "ok": True,
        "seconds": round(seconds, 3),
        "components": {r.flow: r.result() for r in records},
        "notes": notes,
    }


def report(records: list[Recovery], notes: list[str], seconds: float, failure: str) -> str:
    """The drill's markdown: a summary row per component, then each one's checks."""
    lines = [f"# {FLOW}: {'FAILED' if failure else 'OK'} ({seconds:.1f} s)", ""]
    if failure:
        lines += [f"**{escape_markdown(failure)}**", ""]
    lines += ["| component | backup | age (RPO) | restore time (RTO) | result |"]
    lines += ["|---|---|---|---|---|"]
    for r in records:
        b = r.backup or {}
        rpo = age_text(b["rpo_seconds"]) if b else "—"
        rto = f"{r.healthy_seconds:.1f} s" if r.healthy_seconds is not None else "—"
        outcome = "failed" if r.failed_step() else "ok"
        lines.append(f"| {r.flow} | `{b.get('name', '—')}` | {rpo} | {rto} | {outcome} |")
    lines += [""] + [f"- {escape_markdown(note)}" for note in notes]
    for r in records:
        lines += ["", re.sub(r"^# ", "## ", r.markdown(), count=1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    verify_restore()
