"""A compose project restored from a config backup: what it needs and what it holds.

Reads the project as compose resolves it (`config`: relative paths made absolute,
`${NAME}` filled from `.env`), finds the variables a compose file needs, reads
`NAME=value` env files, and starts services one at a time. Values are never
logged or put in an error message: only names.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tasks.docker import containers
from tasks.docker.compose import (  # the one place that runs the compose CLI
    ComposeError,
    ComposeService,
    _base,
    _run,
    compose_container_id,
    compose_container_ids,
    is_compose_v2,
)

# `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?message}`, `$NAME`; `$$` escapes.
_REFERENCE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_]\w*)(?P<op>:?[-?+])?[^}]*\}|\$(?P<bare>[A-Za-z_]\w*)"
)
_ENV_LINE = re.compile(r"(?:export\s+)?(?P<name>[A-Za-z_]\w*)=(?P<value>.*)")


class EnvFileError(ValueError):
    """An env file cannot be read or has a line that is not NAME=value."""


def required_variables(compose_text: str) -> set[str]:
    """The variables a compose file needs from the environment or `.env`: every
    `${NAME}`, `${NAME:?…}` or `$NAME` reference (those with a default are optional)."""
    needed = set()
    for match in _REFERENCE.finditer(compose_text):
        name = match["braced"] or match["bare"]
        if name and (match["op"] or "").lstrip(":") not in ("-", "+"):
            needed.add(name)
    return needed


def parse_env_text(text: str, source: str) -> dict[str, str]:
    """`NAME=value` lines (blank lines and `#` comments skipped; quotes around a value
    removed) as a dict. A bad line is named by its number, never by its content."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(stripped)
        if match is None:
            raise EnvFileError(
                f"{source} line {number} is not NAME=value: write one variable per line"
            )
        value = match["value"]
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = re.sub(r'\\(["\\])', r"\1", value[1:-1])
        values[match["name"]] = value
    return values


def read_env_file(path: Path) -> dict[str, str]:
    """An env file of NAME=value lines (the operator's secrets file)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise EnvFileError(
            f"cannot read secrets_env_file {path}: {error.strerror or error}; give the path "
            "of a file with one NAME=value line per secret"
        ) from None
    return parse_env_text(text, f"secrets_env_file {path}")


# docker-compose 1.29 reads .env (and env_file files) with python-dotenv, which expands
# `${NAME}` and `${NAME:-default}` inside any quoting and has no escape for it; the
# default of a variable nobody sets is the one way to write a literal `${`.
_LITERAL_DOLLAR_BRACE = "${PROXILION_DR_NO_SUCH_VARIABLE:-$}{"


def dotenv_value(value: str) -> str:
    """A value as compose reads it back exactly from `.env` or an env_file: for
    docker-compose 1.29, double-quoted with `\\`, `"` and newlines escaped and every `${`
    kept from expansion; for compose v2, single-quoted (taken literally) when it holds
    no quote or newline. A plain word stays as it is."""
    if value and all(c.isalnum() or c in "._-/:@,+=" for c in value):
        return value
    if is_compose_v2() and "'" not in value and "\n" not in value:
        return f"'{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    if not is_compose_v2():
        escaped = escaped.replace("${", _LITERAL_DOLLAR_BRACE)
    else:
        escaped = escaped.replace("$", "\\$")  # compose v2's double quotes: not exercised here
    return f'"{escaped}"'


def env_file_text(values: dict[str, str]) -> str:
    """A `.env` compose reads back exactly (`dotenv_value`): secrets with `$`, quotes,
    `#` or spaces are never expanded or cut."""
    return "".join(f"{name}={dotenv_value(value)}\n" for name, value in values.items())


@dataclass(frozen=True)
class Volume:
    """A mount of a service's data: a bind mount (host path → container path), or a
    named volume (`volume`: its name in the compose file; no host path before compose
    creates it)."""

    source: Path | None
    target: PurePosixPath
    volume: str = ""


@dataclass
class Service:
    """One service of the project, as compose resolves it."""

    name: str
    container_name: str | None
    image: str
    command: list[str]
    volumes: list[Volume] = field(default_factory=list)
    entrypoint: list[str] | None = None  # None: the image's own
    network_mode: str = ""
    ports: list[tuple[int, int]] = field(default_factory=list)  # (host port, container port)
    working_dir: str = ""

    def mount_of(self, inner: str) -> Volume | None:
        """The mount holding `inner` (the deepest), or None: it lives in the container."""
        target = PurePosixPath(inner)
        mounts = [v for v in self.volumes if target.is_relative_to(v.target)]
        return max(mounts, key=lambda v: len(v.target.parts)) if mounts else None

    def host_path(self, inner: str) -> Path | None:
        """The host path behind `inner` when a bind mount holds it, else None."""
        mount = self.mount_of(inner)
        if mount is None or mount.source is None:
            return None
        return mount.source / PurePosixPath(inner).relative_to(mount.target)

    def flag(self, name: str) -> str | None:
        """The value of `--name=value` or `--name value` in the command."""
        for i, arg in enumerate(self.command):
            if arg.startswith(f"--{name}="):
                return arg.split("=", 1)[1]
            if arg == f"--{name}" and i + 1 < len(self.command):
                return self.command[i + 1]
        return None

    def mentions(self, word: str) -> bool:
        return word in self.name or word in self.image or any(word in a for a in self.command)


def _volume(item: Any, project_dir: Path) -> Volume | None:
    if isinstance(item, dict):
        source, target = item.get("source"), item.get("target")
        kind = item.get("type", "bind")
        if kind == "volume" and source and target:
            return Volume(None, PurePosixPath(target), str(source))
        if kind != "bind" or not source or not target:
            return None
    else:
        parts = str(item).split(":")
        if len(parts) < 2:
            return None
        source, target = parts[0], parts[1]
    path = Path(source)
    if not path.is_absolute():
        if not str(source).startswith((".", "~")):
            return Volume(None, PurePosixPath(target), str(source))  # a named volume
        path = (project_dir / path).resolve()
    return Volume(path, PurePosixPath(target))


def _argv(value: Any) -> list[str]:
    """A compose `command` or `entrypoint`: a list, or a string split as a shell would."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def _ports(item: Any) -> list[tuple[int, int]]:
    """(host port, container port) pairs of a published port in either form compose
    prints: `127.0.0.1:16380:6379/tcp`, `127.0.0.1:18801-18802:8787/tcp` (a range, one
    port per replica) or `{published: 16380, target: 6379}`."""
    try:
        if isinstance(item, dict):
            return [(int(item["published"]), int(item["target"]))]
        parts = str(item).split("/")[0].split(":")
        if len(parts) < 2:
            return []
        low, _, high = parts[-2].partition("-")
        return [(port, int(parts[-1])) for port in range(int(low), int(high or low) + 1)]
    except (KeyError, ValueError, TypeError):
        return []  # an unpublished or container-side range: no fixed host port


def read_services(compose_files: list[Path], project: str | None) -> dict[str, Service]:
    """The project's services as `docker compose config` resolves its files (the primary
    and its override; needs the project's `.env` when they reference variables)."""
    config = yaml.safe_load(_run([*_base(compose_files, project), "config"], 60.0)) or {}
    services: dict[str, Service] = {}
    for name, spec in (config.get("services") or {}).items():
        spec = spec or {}
        volumes = [_volume(v, compose_files[0].parent) for v in spec.get("volumes") or []]
        ports = [pair for item in spec.get("ports") or [] for pair in _ports(item)]
        services[name] = Service(
            name,
            spec.get("container_name"),
            str(spec.get("image") or ""),
            _argv(spec.get("command")),
            [v for v in volumes if v is not None],
            _argv(spec["entrypoint"]) if "entrypoint" in spec else None,
            str(spec.get("network_mode") or ""),
            ports,
            str(spec.get("working_dir") or ""),
        )
    return services


def compose_up(
    compose_files: list[Path], project: str | None, services: list[str], *, start: bool = True
) -> str:
    """`up -d --no-deps SERVICE…` (or `up --no-start`: create the containers only).
    No service named: every service. Returns the CLI's last output line."""
    args = [*_base(compose_files, project), "up"]
    args += ["-d", "--no-deps"] if start and services else (["-d"] if start else ["--no-start"])
    output = _run([*args, *services], 600.0)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "done"


@dataclass
class Project:
    """The restored compose project and its services by role."""

    compose_files: list[Path]
    name: str | None
    services: dict[str, Service]
    roles: dict[str, Service]

    def container(self, service: Service) -> str:
        if service.container_name:
            return service.container_name
        target = ComposeService(self.compose_files, self.name, service.name, None)
        return compose_container_id(target)

    def containers(self, service: Service) -> list[str]:
        """Every container compose runs for the service (its replicas)."""
        target = ComposeService(self.compose_files, self.name, service.name, None)
        found = compose_container_ids(target)
        if not found:
            raise ComposeError(f"compose reports no container for service {service.name!r}")
        return found

    def up(self, *services: Service) -> str:
        return compose_up(self.compose_files, self.name, [s.name for s in services])


def data_dir(container: str, service: Service, inner: str) -> Path:
    """The host folder the created (not yet started) `container` of `service` keeps
    `inner` in: its bind mount, or the named volume compose created with it. Missing or
    empty (Docker creates a missing bind source as root), it is given the owner the
    image's user needs (`container_user`): a Prometheus running as nobody can write it."""
    path = containers.host_path(container, inner)
    if path is None:
        raise FileNotFoundError(
            f"service {service.name!r} keeps its data in {inner}, which is on no mount: its "
            "data cannot be restored (and would be lost with its container); mount a volume "
            "there in the compose file"
        )
    path.mkdir(parents=True, exist_ok=True)
    owner = containers.container_user(container)
    if owner is not None and not any(path.iterdir()):  # new or empty: nothing to lose
        os.chown(path, *owner)
    return path
