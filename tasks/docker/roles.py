"""Which service of a compose project plays which part of the runbook's stack (gateway,
Redis, Prometheus, Grafana), told by what it really runs, not by its name.

A service runs its compose `entrypoint` and `command`, and where the compose file
gives neither, its image's own (an official `redis:7` runs `redis-server` by its
image's default command, and is often called `cache`). When several services run
the same program (a Redis and its replica), the one answering at the port of the
URL the flow was given is the one restored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import docker.errors

from tasks.docker.containers import docker_client
from tasks.docker.project import Service

# The runbook's services, in its priority order, and the programs each may run.
PROGRAMS: dict[str, tuple[str, ...]] = {
    "gateway": ("gateway", "proxilion-gateway"),
    "redis": ("redis-server",),
    "prometheus": ("prometheus",),
    "grafana": ("grafana-server", "grafana"),
}
DEFAULT_PORTS = {"redis": 6379, "prometheus": 9090, "gateway": 8787, "grafana": 3000}


class RoleNotFound(RuntimeError):
    """No service (or more than one) of the project plays a role the restore needs."""


@dataclass(frozen=True)
class Runs:
    """What a service's container runs and where it answers on this host."""

    argv: list[str]
    host_ports: set[int]
    image_known: bool  # False: the image is not on this host, its default command unknown
    workdir: str = "/"


def _image_config(image: str) -> dict[str, Any] | None:
    """The image's own config (ENTRYPOINT, CMD, WORKDIR…); None when it is not here."""
    try:
        return dict(docker_client().images.get(image).attrs.get("Config") or {})
    except docker.errors.ImageNotFound:
        return None


def runs(service: Service) -> Runs:
    """The argv the service's container runs (compose's entrypoint and command over the
    image's, as Docker combines them) and the host ports it answers on."""
    image = _image_config(service.image) if service.image else None
    entrypoint = list((image or {}).get("Entrypoint") or [])
    cmd = list((image or {}).get("Cmd") or [])
    if service.entrypoint is not None:  # compose's entrypoint drops the image's CMD too
        entrypoint, cmd = service.entrypoint, []
    argv = entrypoint + (service.command or cmd)
    if service.network_mode == "host":
        ports = {_listening_port(service, argv)}
    else:
        ports = {host for host, _inner in service.ports}
    workdir = service.working_dir or (image or {}).get("WorkingDir") or "/"
    return Runs(argv, ports, image is not None, workdir)


def _listening_port(service: Service, argv: list[str]) -> int:
    """The port a host-network service listens on: `--port N` / `--web.listen-address`
    in its argv, `port N` in a Redis config file it is given, else its program's
    default."""
    for i, arg in enumerate(argv):
        if arg == "--port" and i + 1 < len(argv) and argv[i + 1].isdigit():
            return int(argv[i + 1])
        if arg.startswith("--web.listen-address="):
            return int(arg.rsplit(":", 1)[1])
    for arg in argv:
        host = service.host_path(arg) if arg.endswith(".conf") else None
        if host is not None and host.is_file():
            for line in host.read_text(errors="replace").splitlines():
                words = line.split()
                if len(words) == 2 and words[0] == "port" and words[1].isdigit():
                    return int(words[1])
    return next((DEFAULT_PORTS[r] for r in PROGRAMS if plays(r, service.name, argv)), 0)


def plays(role: str, name: str, argv: list[str]) -> bool:
    """Does a service named `name` running `argv` play `role`? Its program (any word of
    its argv, a shell's `-c` string included), or, failing that, its name."""
    words = {PurePosixPath(word).name for arg in argv for word in arg.split()}
    if role == "redis" and "--sentinel" in words:
        return False  # redis-server --sentinel is a Sentinel, it holds no data
    if words & set(PROGRAMS[role]):
        return True
    runs_another = any(words & set(PROGRAMS[other]) for other in PROGRAMS if other != role)
    return name == role and not runs_another


def url_port(url: str) -> int:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}.get(parts.scheme, 0)
    return parts.port or default


def find_roles(services: dict[str, Service], urls: dict[str, str]) -> dict[str, Service]:
    """The service playing each role the project has: the one running the role's
    program (or named after it; or, failing both, answering at the port of the role's
    URL in `urls`). Where several run the program, the one at that port; RoleNotFound
    when that does not single one out."""
    seen = {name: runs(service) for name, service in services.items()}
    roles: dict[str, Service] = {}
    for role in PROGRAMS:
        candidates = [n for n, service in services.items() if plays(role, n, seen[n].argv)]
        taken = {s.name for s in roles.values()}
        if not candidates and role in urls:  # e.g. a gateway called `proxy`, on its port
            port = url_port(urls[role])
            candidates = [n for n in services if n not in taken and port in seen[n].host_ports]
        if len(candidates) > 1 and role in urls:
            at_port = [n for n in candidates if url_port(urls[role]) in seen[n].host_ports]
            candidates = at_port or candidates
        if len(candidates) > 1:
            raise RoleNotFound(
                f"services {', '.join(candidates)} all run {PROGRAMS[role][0]} and none alone "
                f"answers at port {url_port(urls.get(role, ''))}: set {role}_url to the one "
                "to restore"
            )
        if candidates:
            roles[role] = services[candidates[0]]
    return roles


def require_role(
    role: str, roles: dict[str, Service], services: dict[str, Service], compose_file: Path
) -> Service:
    """The service playing `role`, or RoleNotFound naming the services seen (and the
    images this host lacks, whose default command could not be read)."""
    if role in roles:
        return roles[role]
    unknown = sorted({s.image for s in services.values() if s.image and not runs(s).image_known})
    lacking = (
        f"; images not on this host (pull them first): {', '.join(unknown)}" if unknown else ""
    )
    raise RoleNotFound(
        f"no service of {compose_file.name} runs {PROGRAMS[role][0]} (services: "
        f"{', '.join(services) or 'none'}{lacking}): the {role} backup would not be restored; "
        "nothing was changed"
    )


def _flag(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def data_path(role: str, service: Service) -> str:
    """Where a Redis or Prometheus service keeps its data inside its container: its
    `--dir` (or a config file's `dir`) / `--storage.tsdb.path`, else the program's
    default, relative to its working dir."""
    seen = runs(service)
    if role == "prometheus":
        inner = _flag(seen.argv, "storage.tsdb.path") or "data/"
    else:
        inner = _flag(seen.argv, "dir") or "."
        for arg in seen.argv:
            host = service.host_path(arg) if arg.endswith(".conf") else None
            if host is not None and host.is_file():
                for line in host.read_text(errors="replace").splitlines():
                    words = line.split(None, 1)
                    if len(words) == 2 and words[0] == "dir":
                        inner = words[1].strip().strip("\"'")
    return str(PurePosixPath(seen.workdir) / inner)


def check_data_mounts(roles: dict[str, Service]) -> str:
    """The Redis and Prometheus services keep their data on a mount (a bind mount or a
    named volume) a restore can write into: RoleNotFound (naming the path) otherwise."""
    said = []
    for role in ("redis", "prometheus"):
        if role not in roles:
            continue
        service = roles[role]
        inner = data_path(role, service)
        mount = service.mount_of(inner)
        if mount is None:
            raise RoleNotFound(
                f"service {service.name!r} keeps its {role} data in {inner}, which is on no "
                "mount: it cannot be restored (and would be lost with its container); mount a "
                "volume there in the compose file; nothing was changed"
            )
        said.append(
            f"{role} data {inner} on {'volume ' + mount.volume if mount.volume else 'a bind mount'}"
        )
    return "; ".join(said)
