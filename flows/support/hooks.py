"""State hooks every proxilion-dr flow carries (`@flow(..., **FLOW_HOOKS)`).

Who tells a person: the Prefect automation `proxilion-dr: run failed or crashed`
(deployments/notifications.py), server-side, so a run whose process died is
reported too and one failure is one message. The failure and crash hooks make sure
somebody would hear of it: when the Prefect server has no such automation enabled,
the run's log says, as a warning, that nobody is notified and how to fix it.

backup-status is refreshed after each backup by an automation, not by a hook: nothing
runs in a backup's run once its data is safe but its report and Pushgateway push.
"""

from __future__ import annotations

from typing import Any

from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.logging import get_logger
from prefect.states import State

from deployments.notifications import FAILURE_AUTOMATION
from tasks.common.log import run_logger


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


FLOW_HOOKS: dict[str, Any] = {
    "on_failure": [check_failure_notified],
    "on_crashed": [check_failure_notified],
}
