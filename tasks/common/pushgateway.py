"""Backup health in Prometheus: every run pushes its outcome to a Pushgateway.

Backup, recovery and drill runs are short-lived batch jobs, so Prometheus does not
scrape them: each run pushes (per job and grouping key) and the alert rules in
`monitoring/` compare `time()` with the last success. A failed push is a warning in
the run, never a failed backup. Pushes use POST (`pushadd`): a failed run replaces
only the status metrics it sends, so the last success timestamp of its group stays.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

from tasks.common.log import run_logger
from tasks.common.secrets import redact_urls

PUSH_TIMEOUT_SECONDS = 5.0
BACKUP_JOB = "proxilion_dr_backup"
RESTORE_JOB = "proxilion_dr_restore"
RECOVERY_JOB = "proxilion_dr_recovery"
DRILL_JOB = "proxilion_dr_drill"


def push(
    pushgateway_url: str,
    job: str,
    grouping: dict[str, str],
    values: dict[str, tuple[str, float | None]],
) -> bool:
    """Push gauges `{name: (help, value)}` (None values left out) to one group.

    Returns False, after a warning in the run's log, when the push failed: the
    outcome being reported stands either way."""
    if not pushgateway_url:
        return False
    registry = CollectorRegistry()
    for name, (description, value) in values.items():
        if value is not None:
            Gauge(name, description, registry=registry).set(value)
    try:
        pushadd_to_gateway(
            pushgateway_url,
            job=job,
            registry=registry,
            grouping_key=grouping,
            timeout=PUSH_TIMEOUT_SECONDS,
        )
    except Exception as error:  # noqa: BLE001 - any push failure is only a warning
        reason, _ = redact_urls(str(error))
        run_logger().warning(
            "could not push %s metrics to the Pushgateway at %s (%s): the run's outcome "
            "stands, but backup-health alerts will not see it; check pushgateway_url",
            job,
            redact_urls(pushgateway_url)[0],
            reason.splitlines()[0] if reason else type(error).__name__,
        )
        return False
    return True


def _outcome(prefix: str, ok: bool, now: float) -> dict[str, tuple[str, float | None]]:
    return {
        f"{prefix}_last_run_timestamp_seconds": ("When the last run ended (Unix time).", now),
        f"{prefix}_last_status": ("1 when the last run succeeded, 0 when it failed.", float(ok)),
    }


def push_backup(
    pushgateway_url: str,
    kind: str,
    ok: bool,
    *,
    source: str = "",
    size_bytes: int | None = None,
    previous_size_bytes: int | None = None,
    duration_seconds: float | None = None,
) -> bool:
    """A backup run's outcome; size, previous size and duration only on success."""
    now = time.time()
    values = _outcome("proxilion_dr_backup", ok, now)
    if ok:
        values |= {
            "proxilion_dr_backup_last_success_timestamp_seconds": (
                "When the last successful backup ended (Unix time).",
                now,
            ),
            "proxilion_dr_backup_size_bytes": ("Size of the newest backup as stored.", size_bytes),
            "proxilion_dr_backup_previous_size_bytes": (
                "Size of the backup before the newest one (same kind and source).",
                previous_size_bytes,
            ),
            "proxilion_dr_backup_duration_seconds": (
                "How long the last successful backup took.",
                duration_seconds,
            ),
        }
    return push(pushgateway_url, BACKUP_JOB, _group(kind=kind, source=source), values)


def push_restore(
    pushgateway_url: str, component: str, ok: bool, rto_seconds: float | None, job: str
) -> bool:
    """A verified restore of one component (by the drill, or by a recovery flow)."""
    now = time.time()
    prefix = "proxilion_dr_restore" if job == RESTORE_JOB else "proxilion_dr_recovery"
    values = _outcome(prefix, ok, now)
    if ok:
        values |= {
            f"{prefix}_last_verified_timestamp_seconds": (
                "When a restore of this component was last verified (Unix time).",
                now,
            ),
            f"{prefix}_rto_seconds": ("Measured time to restore and verify.", rto_seconds),
        }
    return push(pushgateway_url, job, _group(component=component), values)


def push_drill(pushgateway_url: str, ok: bool, duration_seconds: float) -> bool:
    """The monthly drill's overall outcome."""
    values = _outcome("proxilion_dr_drill", ok, time.time())
    values["proxilion_dr_drill_duration_seconds"] = ("How long the drill took.", duration_seconds)
    return push(pushgateway_url, DRILL_JOB, {}, values)


def _group(**labels: Any) -> dict[str, str]:
    return {name: str(value) for name, value in labels.items() if value}
