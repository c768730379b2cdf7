"""Backup health: what every backup, recovery and drill flow pushes to the Pushgateway.

Success is pushed at the end of the flow's body; failure and crash through Prefect
flow hooks (`on_failure`, `on_crashed`), which never raise: the run's own outcome
is what matters, a lost push is only a warning (tasks.common.pushgateway). The Pushgateway is
the setting PROXILION_DR_PUSHGATEWAY_URL; empty = nothing is pushed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect.logging.loggers import flow_run_logger

from flows.support.settings import settings
from tasks.common import pushgateway as metrics
from tasks.store.archive import Manifest
from tasks.store.local import list_local

Hook = Callable[[Any, Any, Any], None]


def pushgateway_url() -> str:
    return settings().pushgateway_url


def previous_size(backup_dir: Path, manifest: Manifest) -> int | None:
    """Size of the complete backup before `manifest` of the same kind and source."""
    older = [
        m
        for m in list_local(backup_dir, manifest.kind, manifest.source_id or None)
        if m.created_at < manifest.created_at
    ]
    return older[-1].size if older else None


def backup_succeeded(backup_dir: Path, manifest: Manifest, seconds: float) -> None:
    """Push a stored backup: size, the previous one's size, duration."""
    metrics.push_backup(
        pushgateway_url(),
        manifest.kind,
        True,
        source=manifest.source_id,
        size_bytes=manifest.size,
        previous_size_bytes=previous_size(backup_dir, manifest),
        duration_seconds=seconds,
    )


def backup_unchanged(kind: str, source_id: str) -> None:
    """A run that found nothing new to store still proves the backup is current."""
    metrics.push_backup(pushgateway_url(), kind, True, source=source_id)


def with_hooks(
    base: dict[str, Any], failed: Hook, states: tuple[str, ...] = ("on_failure", "on_crashed")
) -> dict[str, Any]:
    """`base` (flows.support.hooks' FLOW_HOOKS) with `failed` run first on `states`: the
    push is quick, and must not wait behind the notification check."""
    hooks = {name: list(value) for name, value in base.items()}
    for state in states:
        hooks[state] = [failed, *hooks.get(state, [])]
    return hooks


def _hook(push: Callable[[dict[str, Any]], None]) -> Hook:
    """A flow state hook calling `push(parameters)`; whatever goes wrong is a warning."""

    # The run log names a hook by its function: "Running hook 'push_outcome_metrics'".
    def push_outcome_metrics(flow: Any, flow_run: Any, state: Any) -> None:
        try:
            push(dict(flow_run.parameters or {}))
        except Exception as error:  # noqa: BLE001 - a hook must never raise
            flow_run_logger(flow_run, flow).warning(
                "could not report this run's outcome to the Pushgateway: %s",
                type(error).__name__,
            )

    return push_outcome_metrics


def backup_failed(kind: str, source_id: Callable[[dict[str, Any]], str]) -> Hook:
    """The on_failure/on_crashed hook of backup-<kind>: status 0 for its source
    (`source_id(parameters)`, from the run's parameters or their settings)."""

    def push(parameters: dict[str, Any]) -> None:
        try:
            source = source_id(parameters)
        except Exception:  # noqa: BLE001 - a bad parameter is why it failed: push without
            source = ""
        metrics.push_backup(pushgateway_url(), kind, False, source=source)

    return _hook(push)


def recovery_outcome(component: str, ok: bool, rto_seconds: float | None) -> None:
    """A recovery flow's outcome and measured RTO (job proxilion_dr_recovery)."""
    metrics.push_restore(pushgateway_url(), component, ok, rto_seconds, metrics.RECOVERY_JOB)


def recovered(component: str, result: dict[str, Any]) -> None:
    """Push a recovery flow's success and RTO (`Recovery.result()`); a dry run restores
    nothing, so it is not pushed."""
    if not result.get("dry_run"):
        recovery_outcome(component, True, result.get("rto_seconds"))


def recovery_failed(component: str) -> Hook:
    """The on_failure/on_crashed hook of recover-<component> (dry runs are not pushed)."""

    def push(parameters: dict[str, Any]) -> None:
        if not parameters.get("dry_run"):
            recovery_outcome(component, False, None)

    return _hook(push)


def drill_failed() -> Hook:
    """The on_crashed hook of verify-restore (its failures push from its body)."""
    return _hook(lambda _parameters: metrics.push_drill(pushgateway_url(), False, 0.0))
