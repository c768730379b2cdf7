"""recover-gateway: runbook scenario 1, the gateway crashed or stopped answering.

Runbook steps: inspect the container (state, exit code, OOM kill, restarts) and keep
its last log lines, restart it, wait for `/health` to answer healthy; still unhealthy
→ recreate it (from its own configuration, or from the compose file) and verify
again; check `/metrics`. A healthy gateway is left alone. Recreating never loses the
original container: it waits aside until the new one is healthy, and is put back
when it is not.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from flows.support.failures import StepFailed, explains_failure, run_name
from flows.support.hooks import FLOW_HOOKS
from flows.support.parameters import dr_flow
from flows.support.pushes import recovered, recovery_failed, with_hooks
from flows.support.recovery import Recovery
from flows.support.settings import settings
from tasks.common import http_health as health
from tasks.common.errors import one_line
from tasks.common.locks import exclusive, lock_name
from tasks.docker.compose import find_service
from tasks.docker.containers import ContainerError
from tasks.docker.recovery import (
    SET_ASIDE_IMAGE,
    Inspection,
    RecreateError,
    Replacement,
    container_log_tail,
    current_state,
    inspect_container,
    inspect_lines,
    keep_replacement,
    plan_recreate,
    recreate_container,
    recreate_with_compose,
    restart_container,
    roll_back,
    wait_until_container_healthy,
)

FLOW = "recover-gateway"
LOG_LINES = 100


@dr_flow(
    name=FLOW,
    flow_run_name=run_name("gateway recovery"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, recovery_failed("gateway")),
)
@explains_failure
def recover_gateway(
    container: str = "",
    health_url: str = "",
    metrics_url: str = "",
    deadline_seconds: float = 60.0,
    recreate: bool = True,
    compose_file: str = "",
    dry_run: bool = False,
) -> dict[str, Any]:
    """Bring the gateway back (runbook scenario 1) and measure how long it was down.

    Inspects the container and keeps its last 100 log lines in the report, restarts
    it, waits for `/health` to answer `{"status": "healthy"}`; if it does not within
    the deadline, recreates the container and verifies again, then checks `/metrics`.
    A gateway that is already healthy is not touched. Returns the RTO (flow start →
    verified healthy) and every step; the report artifact `recover-gateway` holds the
    same, with the log tail.

    Args:
        container: The gateway's container. Empty: PROXILION_DR_GATEWAY_CONTAINER
            (default proxilion-gateway).
        health_url: The gateway's health endpoint. Empty: PROXILION_DR_GATEWAY_URL
            (default http://localhost:8787) + /health.
        metrics_url: The gateway's metrics endpoint. Empty: /metrics on the same server
            as health_url.
        deadline_seconds: Seconds to wait for /health after the restart, and again
            after recreating, before giving up.
        recreate: Allow recreating the container when a restart does not make it
            healthy (the original is kept aside until the new one is healthy).
        compose_file: The docker-compose.yml that defines the gateway. Given: recreate
            with `docker compose up --force-recreate` of its service (the only way when
            the container no longer exists); the original is kept aside all the same,
            as a stopped copy compose does not see. Empty: recreate from the container's
            own inspected configuration.
        dry_run: ON: inspect the container, keep its log tail and check the recreate
            path; nothing is restarted or recreated. OFF (the default): an unhealthy
            gateway is RESTARTED (its open sessions drop); still unhealthy and
            `recreate` on, the container is REPLACED by a new one: the original is
            stopped and kept aside as `<name>-replaced-<UTC>` (with compose_file, a
            copy with its filesystem and configuration), put back if the new one is
            not healthy, and removed once it is (its volumes are kept; its inspect
            data and last logs stay in the report). A healthy gateway is never
            touched.
    """
    current = settings()
    name = container or current.gateway_container
    url = health.health_url(health_url or current.gateway_url)
    metrics = metrics_url or health.derive_url(url, "/metrics")
    recovery = Recovery(FLOW, dry_run=dry_run)
    try:
        with ExitStack() as lock:
            if not dry_run:
                lock.enter_context(exclusive(lock_name(FLOW, name)))
            _recover(recovery, name, url, metrics, deadline_seconds, recreate, compose_file)
    except Exception as error:
        message = recovery.failure() if recovery.failed_step() else f"{FLOW}: {one_line(error)}"
        raise StepFailed(message) from error
    finally:
        _note_final_state(recovery, name)
        recovery.publish()
    result = recovery.result()
    recovered("gateway", result)
    return result


def _recover(
    recovery: Recovery,
    name: str,
    url: str,
    metrics_url: str,
    deadline: float,
    recreate: bool,
    compose_file: str | None,
) -> None:
    with recovery.step("inspect container") as step:
        found = inspect_container(name)
        step.detail = found.state.summary()
    if found.state.exists:
        lines = container_log_tail(name, found.secrets(), LOG_LINES)
        recovery.attach(f"last {len(lines)} log lines of {name} (before recovery)", lines)
    if found.state.status == "running":
        with recovery.step("check /health") as step:
            reason = health.probe(url, health.HEALTHY)
            step.detail = reason or "already healthy: nothing restarted"
            step.outcome = "unhealthy" if reason else "ok"
        if reason is None:
            recovery.healthy()
            _check_metrics(recovery, metrics_url)
            return
    if recovery.dry_run:
        _plan(recovery, found, name, deadline, recreate, compose_file)
        return
    if found.state.exists:
        with recovery.step("restart container") as step:
            try:
                step.detail = restart_container(name).summary()
            except ContainerError as error:  # e.g. a bind mount's source is gone
                step.outcome, step.detail = "refused", one_line(error)
        if step.outcome == "refused":
            still = f"docker refused to restart it ({step.detail})"
        else:
            with recovery.step("wait for /health after restart") as step:
                waited = wait_until_container_healthy(name, url, deadline)
                step.detail = waited.summary()
                if not waited.healthy:
                    step.outcome = "unhealthy"
            if waited.healthy:
                recovery.healthy()
                _check_metrics(recovery, metrics_url)
                return
            still = f"still unhealthy after the restart ({waited.reason})"
    else:
        recovery.skip("restart container", "the container does not exist")
        still = f"container {name!r} does not exist"
    how = "from compose file" if compose_file else "from its configuration"
    with recovery.step(f"recreate container {how}") as step:
        if not recreate:
            raise RecreateError(
                f"{still}; recreate is off, so it was left as it is: run again with recreate=true"
            )
        if found.state.exists:
            found = _record_original(recovery, name)
        replacement = _recreate(found, name, compose_file)
        step.detail = f"new container {replacement.name} started"
        if replacement.snapshot:
            step.detail += (
                f"; original kept aside as {replacement.aside} (a copy compose does not see, "
                f"its filesystem in image {SET_ASIDE_IMAGE}:{replacement.aside}) until verified"
            )
        elif replacement.aside:
            step.detail += f"; original kept aside as {replacement.aside} until verified"
        if replacement.note:
            step.detail += f"; {replacement.note}"
    with recovery.step("wait for /health after recreate") as step:
        waited = wait_until_container_healthy(replacement.name, url, deadline)
        if not waited.healthy:
            lines = container_log_tail(replacement.name, found.secrets(), LOG_LINES)
            recovery.attach(f"last {len(lines)} log lines of the recreated {name}", lines)
            now = roll_back(replacement) if replacement.aside else "the new container was kept"
            raise RecreateError(f"the recreated container is {waited.summary()}; {now}")
        step.detail = waited.summary()
        recovery.healthy()
        removed = keep_replacement(replacement)
        if removed:
            step.detail += (
                f"; original container {removed} removed (its inspect data and log tail are "
                "in this report)"
            )
    _check_metrics(recovery, metrics_url)


def _record_original(recovery: Recovery, name: str) -> Inspection:
    """The original as it is set aside, inspected again: its inspect data and last log
    lines go into the report (compose replaces it; the copy aside has no logs)."""
    found = inspect_container(name)
    recovery.attach(f"docker inspect of {name} (kept aside)", inspect_lines(found))
    lines = container_log_tail(name, found.secrets(), LOG_LINES)
    recovery.attach(f"last {len(lines)} log lines of {name} (kept aside)", lines)
    return found


def _recreate(found: Inspection, name: str, compose_file: str | None) -> Replacement:
    if compose_file:
        state = found.state
        target = find_service(compose_file, name, state.compose_project, state.compose_service)
        return recreate_with_compose(target, found)
    if not found.state.exists:
        raise RecreateError(
            f"container {name!r} does not exist, so there is no configuration to recreate "
            "it from: run again with compose_file=<path of the docker-compose.yml defining it>"
        )
    return recreate_container(found)


def _plan(
    recovery: Recovery,
    found: Inspection,
    name: str,
    deadline: float,
    recreate: bool,
    compose_file: str | None,
) -> None:
    """Dry run: what would be done, with the recreate path checked."""
    if found.state.exists:
        recovery.skip("restart container", f"would restart {name} and wait up to {deadline:g} s")
    else:
        recovery.skip("restart container", "the container does not exist")
    if not recreate:
        recovery.skip("recreate container", "recreate is off: would stop after the restart")
        return
    with recovery.step("check the recreate path") as step:
        if compose_file:
            state = found.state
            target = find_service(compose_file, name, state.compose_project, state.compose_service)
            step.detail = f"would run compose up --force-recreate of service {target.service}"
            step.detail += f" in {target.compose_file}"
            if found.state.exists:
                step.detail += f", {name} kept aside until the new one is healthy"
        elif not found.state.exists:
            raise RecreateError(
                f"container {name!r} does not exist: only a compose file can recreate it; "
                "run again with compose_file=<path of the docker-compose.yml defining it>"
            )
        else:
            step.detail = "would recreate it from its configuration: " + plan_recreate(found)
        step.outcome = "planned"


def _check_metrics(recovery: Recovery, url: str) -> None:
    with recovery.step("check /metrics") as step:
        step.detail = f"{health.check_metrics(url)} samples at {url}"


def _note_final_state(recovery: Recovery, name: str) -> None:
    try:
        state = current_state(name).summary()
    except ContainerError as error:
        state = f"unknown ({one_line(error)})"
    recovery.notes.append(f"container {name} now: {state}")


if __name__ == "__main__":
    recover_gateway()
