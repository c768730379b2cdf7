"""State hooks every proxilion-dr flow carries (`@flow(..., **BACKUP_HOOKS)` or
`**FLOW_HOOKS`).

Who tells a person: the Prefect automation `proxilion-dr: run failed or crashed`
(deployments/notifications.py), server-side, so a run whose process died is
reported too and one failure is one message. The failure and crash hooks make sure
somebody would hear of it: when the Prefect server has no such automation enabled,
the run's log says, as a warning, that nobody is notified and how to fix it.

Backups also run `backup-status` when they end, completed or failed.
"""

from __future__ import annotations

from typing import Any

from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.logging import get_logger
from prefect.states import State

from deployments.notifications import FAILURE_AUTOMATION
from tasks.common.log import run_logger

STATUS_PARAMETERS = ("backup_dir", "s3_bucket", "s3_prefix", "s3_endpoint_url")


def check_failure_notified(flow: Any, flow_run: FlowRun, state: State[Any]) -> None:
    """On Failed or Crashed: say in the run's log who is told, or that nobody is."""
    try:
        with get_client(sync_client=True) as client:
            automations = client.read_automations_by_name(FAILURE_AUTOMATION)
    except Exception as error:  # noqa: BLE001 - a hook must not hide the run's failure
        get_logger("proxilion_dr").warning("could not read the automations: %s", error)
        return
    if any(a.enabled for a in automations):
        run_logger().info(
            "%s %s: the automation %r notifies the on-call webhook",
            flow.name,
            state.name,
            FAILURE_AUTOMATION,
        )
        return
    run_logger().warning(
        "%s %s and NOBODY IS NOTIFIED: this Prefect server has no enabled automation %r. "
        "Set PROXILION_DR_NOTIFY_WEBHOOK_URL and run `python -m deployments apply` "
        "(`serve` does it at start).",
        flow.name,
        state.name,
        FAILURE_AUTOMATION,
    )


def refresh_backup_status(flow: Any, flow_run: FlowRun, state: State[Any]) -> None:
    """At the end of a backup run: run `backup-status` (a subflow, so its table is its
    own artifact, not one more in the backup's run) for the same backup dir and S3
    location. Its failure is logged here and notified as its own run's failure; the
    backup's outcome stands."""
    from flows.backup_status import backup_status  # here: backup-status carries FLOW_HOOKS

    given = {name: flow_run.parameters.get(name) or "" for name in STATUS_PARAMETERS}
    status = backup_status(**given, return_state=True)
    if not status.is_completed():
        run_logger().warning("could not refresh the backup-status table: %s", status.message)


FLOW_HOOKS: dict[str, Any] = {
    "on_failure": [check_failure_notified],
    "on_crashed": [check_failure_notified],
}
BACKUP_HOOKS: dict[str, Any] = {
    "on_completion": [refresh_backup_status],
    "on_failure": [refresh_backup_status, check_failure_notified],
    "on_crashed": [check_failure_notified],
}
