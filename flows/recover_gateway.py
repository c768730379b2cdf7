"""recover-gateway: runbook scenario 1, the gateway crashed or stopped answering.

Runbook steps: inspect the container (state, exit code, OOM kill, restarts) and keep
its last log lines, restart it, wait for `/health` to answer healthy; still unhealthy
→ recreate it (from its own configuration, or from the compose file) and verify
again; check `/metrics`. A healthy gateway is left alone. Recreating never loses the
original container: it waits aside until the new one is healthy, and is put back
when it is not. Several replicas (a compose service scaled behind a load balancer):
the same for each replica in turn, on its own address.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
from tasks.docker.containers import ContainerError
from tasks.docker.recovery import (
    SET_ASIDE_IMAGE,
    Inspection,
    RecreateError,
    Replacement,
    compose_target,
    container_log_tail,
    current_state,
    inspect_container,
    inspect_lines,
    keep_replacement,
    no_address,
    plan_recreate,
    published_url,
    recreate_container,
    recreate_with_compose,
    restart_container,
    roll_back,
    service_replicas,
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
    service: str = "",
    dry_run: bool = False,
) -> dict[str, Any]:
    """Bring the gateway back (runbook scenario 1) and measure how long it was down.

    Inspects the container and keeps its last 100 log lines in the report, restarts
    it, waits for `/health` to answer `{"status": "healthy"}`; if it does not within
    the deadline, recreates the container and verifies again, then checks `/metrics`.
    A gateway that is already healthy is not touched. Returns the RTO (flow start →
    verified healthy) and every step; the report artifact `recover-gateway` holds the
    same, with the log tail. With `service`, every replica of that compose service in
    turn: only the unhealthy ones are touched, each is checked, the report lists each.

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
            own inspected configuration. Refused for one container of a service that
            runs several (compose would recreate them all): use service.
        service: The compose service (of compose_file) running the gateway as several
            replicas behind a load balancer. Given: each replica in turn, container
            ignored; health_url's port is the one inside a replica, reached where the
            replica publishes it (else at its own address); a replica is recreated from
            its own configuration. Empty: one container.
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
    url = health.health_url(health_url or current.gateway_url)
    metrics = metrics_url or health.derive_url(url, "/metrics")
    recovery = Recovery(FLOW, dry_run=dry_run)
    names = [] if service else [container or current.gateway_container]
    replicas: dict[str, str] = {}
    try:
        if service:
            replicas = _recover_replicas(
                recovery, compose_file, service, url, metrics, deadline_seconds, recreate
            )
            names = list(replicas)
            failed = [name for name, how in replicas.items() if how.startswith("FAILED")]
            if failed:
                raise RecreateError(f"replicas not recovered: {', '.join(failed)}")
        else:
            with _exclusive(names[0], dry_run):
                gateway = Gateway(names[0], url, metrics)
                _recover(recovery, gateway, deadline_seconds, recreate, compose_file)
    except Exception as error:
        message = recovery.failure() if recovery.failed_step() else f"{FLOW}: {one_line(error)}"
        raise StepFailed(message) from error
    finally:
        for name in names:
            _note_final_state(recovery, name)
        recovery.publish()
    result = recovery.result() | ({"replicas": replicas} if service else {})
    recovered("gateway", result)
    return result


@dataclass(frozen=True)
class Gateway:
    """A gateway container and where it answers: at the URLs given, or, for a replica,
    where it publishes their port (looked up at each check: see `published_url`)."""

    name: str
    health_url: str
    metrics_url: str
    replica: bool = False

    def where(self, url: str) -> str | None:
        return published_url(self.name, url) if self.replica else url


@contextmanager
def _exclusive(name: str, dry_run: bool) -> Iterator[None]:
    """Only one recover-gateway per container at a time (a dry run changes nothing)."""
    if dry_run:
        yield
        return
    with exclusive(lock_name(FLOW, name)):
        yield


def _recover_replicas(
    recovery: Recovery,
    compose_file: str,
    service: str,
    url: str,
    metrics_url: str,
    deadline: float,
    recreate: bool,
) -> dict[str, str]:
    """Each replica of the compose service in turn, as one gateway; one that cannot be
    recovered does not stop the others. Returns how each replica went."""
    with recovery.step("find the replicas") as step:
        if not compose_file:
            raise RecreateError(f"service {service} given without compose_file: give both")
        names = service_replicas(compose_file, service)
        step.detail = f"{len(names)} containers of service {service}: {', '.join(names)}"
    outcomes = {}
    for name in names:
        try:
            with recovery.scope(name), _exclusive(name, recovery.dry_run):
                gateway = Gateway(name, url, metrics_url, replica=True)
                outcomes[name] = _recover(recovery, gateway, deadline, recreate, None)
        except Exception as error:  # noqa: BLE001 - recorded in its step; the next replica
            outcomes[name] = f"FAILED: {one_line(error)}"
    recovery.notes.extend(f"replica {name}: {how}" for name, how in outcomes.items())
    return outcomes


def _recover(
    recovery: Recovery,
    gateway: Gateway,
    deadline: float,
    recreate: bool,
    compose_file: str | None,
) -> str:
    """The runbook's steps for one gateway container; how it went, in a few words."""
    name = gateway.name
    with recovery.step("inspect container") as step:
        found = inspect_container(name)
        step.detail = found.state.summary()
    if found.state.exists:
        lines = container_log_tail(name, found.secrets(), LOG_LINES)
        recovery.attach(f"last {len(lines)} log lines of {name} (before recovery)", lines)
    if found.state.status == "running":
        with recovery.step("check /health") as step:
            url = gateway.where(gateway.health_url)
            reason = health.probe(url, health.HEALTHY) if url else no_address(name, "/health")
            step.detail = reason or "already healthy: nothing restarted"
            step.outcome = "unhealthy" if reason else "ok"
        if reason is None:
            recovery.healthy()
            _check_metrics(recovery, gateway)
            return "healthy, untouched"
    if recovery.dry_run:
        _plan(recovery, found, name, deadline, recreate, compose_file)
        return "unhealthy (dry run: nothing changed)"
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
                waited = _wait(gateway, deadline)
                step.detail = waited.summary()
                if not waited.healthy:
                    step.outcome = "unhealthy"
            if waited.healthy:
                recovery.healthy()
                _check_metrics(recovery, gateway)
                return "restarted, healthy"
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
        waited = _wait(Gateway(replacement.name, gateway.health_url, "", gateway.replica), deadline)
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
    _check_metrics(recovery, gateway)
    return f"recreated {how}, healthy"


def _wait(gateway: Gateway, deadline: float) -> health.HealthWait:
    return wait_until_container_healthy(
        gateway.name, gateway.health_url, deadline, published=gateway.replica
    )


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
        return recreate_with_compose(compose_target(compose_file, found.state), found)
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
            target = compose_target(compose_file, found.state)
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


def _check_metrics(recovery: Recovery, gateway: Gateway) -> None:
    with recovery.step("check /metrics") as step:
        url = gateway.where(gateway.metrics_url)
        if url is None:
            raise ContainerError(no_address(gateway.name, gateway.metrics_url))
        step.detail = f"{health.check_metrics(url)} samples at {url}"


def _note_final_state(recovery: Recovery, name: str) -> None:
    try:
        state = current_state(name).summary()
    except ContainerError as error:
        state = f"unknown ({one_line(error)})"
    recovery.notes.append(f"container {name} now: {state}")


if __name__ == "__main__":
    recover_gateway()
