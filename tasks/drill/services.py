"""The restore drill's check that a restored compose project came up: per service.

A service is up when its container runs, has run for SETTLE_SECONDS without a
restart, and (when it has a healthcheck) Docker reports it healthy; a one-shot service
(another waits for it to complete) when it has exited 0. Any other that exits
fails its check, named, with its last log lines (secret-looking values redacted).
Evidence: the container's state and the TCP ports its processes listen on (read from
/proc; "unknown" where the Docker engine is on another host).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from docker.errors import APIError, DockerException, NotFound

from tasks.docker.compose import PROJECT_LABEL, SERVICE_LABEL
from tasks.docker.containers import docker_client
from tasks.docker.recovery import Inspection, clean_lines, state_of
from tasks.drill.compose import DrillProject

SETTLE_SECONDS = 3.0
LOG_LINES = 30


@dataclass
class ServiceUp:
    """One service of the drill project after the wait: up or not, and the evidence."""

    service: str
    up: bool
    evidence: str
    seconds: float = 0.0
    log_lines: list[str] = field(default_factory=list)


def _containers(project: str) -> dict[str, Any]:
    listed = docker_client().containers.list(
        all=True, filters={"label": f"{PROJECT_LABEL}={project}"}
    )
    return {(c.labels or {}).get(SERVICE_LABEL, c.name): c for c in listed}


def _verdict(attrs: dict[str, Any], settle: float, one_shot: bool) -> tuple[bool | None, str]:
    """(True up / False failed / None not yet, what its state says). A one-shot
    service is up once it has exited 0; any other that exits has failed."""
    state = state_of(attrs)
    health = state.health
    if one_shot and state.status == "exited" and state.exit_code == 0:
        return True, "completed: exited 0 (a one-shot service another waits for)"
    if state.status in {"exited", "dead"} or state.restart_count:
        return (
            False,
            f"{state.status} (exit code {state.exit_code}, restarts {state.restart_count})",
        )
    if state.status != "running":
        return None, state.status
    started = (attrs.get("State") or {}).get("StartedAt", "")
    ran = time.time() - _epoch(started)
    if health == "unhealthy":
        return None, "running, docker health unhealthy"
    if ran < settle or health not in ("", "healthy"):
        return None, f"running {ran:.0f} s" + (f", docker health {health}" if health else "")
    check = f"docker health {health}" if health else "no healthcheck"
    return True, f"running {ran:.0f} s without a restart, {check}"


def _epoch(rfc3339: str) -> float:
    """Docker's `2026-11-28T11:30:12.123456789Z` as seconds since the epoch."""
    try:
        return datetime.strptime(rfc3339[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return time.time()


def wait_until_up(
    project: DrillProject, deadline_seconds: float, settle_seconds: float = SETTLE_SECONDS
) -> list[ServiceUp]:
    """Poll each service's container until every one is up or failed, or the deadline;
    per service: up or not, with evidence (and its last log lines when it failed)."""
    began = time.monotonic()
    pending = [*project.services, *([project.holder] if project.holder else [])]
    decided: dict[str, ServiceUp] = {}
    while True:
        found = _containers(project.name)
        for service in [s for s in pending if s not in decided]:
            container = found.get(service)
            if container is None:  # `up -d` created every container before the wait
                gone = "no container: removed while the drill waited, or never created"
                decided[service] = _record(service, None, False, gone, began)
                continue
            verdict, state = _verdict(container.attrs, settle_seconds, service in project.one_shot)
            if verdict is not None:
                decided[service] = _record(service, container, verdict, state, began)
        if len(decided) == len(pending) or time.monotonic() - began > deadline_seconds:
            break
        time.sleep(0.5)
    for service in [s for s in pending if s not in decided]:
        container = found[service]
        state = _verdict(container.attrs, settle_seconds, service in project.one_shot)[1]
        decided[service] = _record(
            service, container, False, f"not up within {deadline_seconds:.0f} s ({state})", began
        )
    return [decided[s] for s in pending]


def _record(service: str, container: Any, up: bool, state: str, began: float) -> ServiceUp:
    seconds = round(time.monotonic() - began, 3)
    if container is None:
        return ServiceUp(service, up, state, seconds)
    name = container.name
    evidence = f"{state}; container {name} ({container.short_id})"
    if up and container.status != "running":  # a one-shot job that completed
        return ServiceUp(service, True, evidence, seconds)
    if up:
        ports = listening(container)
        evidence += f"; listening on {', '.join(ports) if ports else 'no TCP port'}"
        if ports == ["unknown"]:
            evidence = evidence.replace("listening on unknown", "listening ports unknown")
        return ServiceUp(service, True, evidence, seconds)
    raw = b""
    with contextlib.suppress(DockerException):
        raw = container.logs(tail=LOG_LINES, stdout=True, stderr=True, timestamps=True)
    lines = clean_lines(raw, Inspection(state_of(container.attrs), container.attrs).secrets())
    return ServiceUp(service, False, evidence, seconds, lines)


# --------------------------------------------------------------- listening evidence


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip: Any = ipaddress.IPv4Address(raw[::-1])
        return f"{ip}:{int(port, 16)}"
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"[{ipaddress.IPv6Address(words).compressed}]:{int(port, 16)}"


def listening(container: Any) -> list[str]:
    """The TCP addresses the container's processes listen on (their sockets matched
    in /proc), or ["unknown"] when /proc cannot tell (Docker on another host)."""
    try:
        titles_and_rows = container.top()
        column = titles_and_rows["Titles"].index("PID")
        pids = [row[column] for row in titles_and_rows["Processes"] or []]
        inodes = set()
        for pid in pids:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        found = []
        for table in ("tcp", "tcp6"):
            lines = Path(f"/proc/{pids[0]}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.append(_address(fields[1]))
        return sorted(set(found))
    except (OSError, IndexError, KeyError, ValueError, APIError, NotFound):
        return ["unknown"]
