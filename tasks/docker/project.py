"""A compose project restored from a config backup: what it needs and what it holds.

Reads the project as compose resolves it (`config`: relative paths made absolute,
`${NAME}` filled from `.env`), finds the variables a compose file needs, reads
`NAME=value` env files, and starts services one at a time. Values are never
logged or put in an error message: only names.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tasks.docker.compose import (  # the one place that runs the compose CLI
    ComposeService,
    _base,
    _run,
    compose_container_id,
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


def env_file_text(values: dict[str, str]) -> str:
    """A `.env` compose reads back exactly: a value with spaces, `#` or quotes is
    double-quoted, its `"` and `\\` escaped."""
    lines = []
    for name, value in values.items():
        if value != value.strip() or any(c in value for c in "#'\"\\ \t"):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            value = f'"{escaped}"'
        lines.append(f"{name}={value}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Volume:
    """A bind mount of a service: host path → container path."""

    source: Path
    target: PurePosixPath


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

    def host_path(self, inner: str) -> Path | None:
        """The host path behind `inner` (its deepest bind mount), or None."""
        target = PurePosixPath(inner)
        mounts = [v for v in self.volumes if target.is_relative_to(v.target)]
        if not mounts:
            return None
        best = max(mounts, key=lambda v: len(v.target.parts))
        return best.source / target.relative_to(best.target)

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
        if item.get("type", "bind") != "bind" or not source or not target:
            return None
    else:
        parts = str(item).split(":")
        if len(parts) < 2:
            return None
        source, target = parts[0], parts[1]
    path = Path(source)
    if not path.is_absolute():
        if not str(source).startswith((".", "~")):
            return None  # a named volume
        path = (project_dir / path).resolve()
    return Volume(path, PurePosixPath(target))


def _argv(value: Any) -> list[str]:
    """A compose `command` or `entrypoint`: a list, or a string split as a shell would."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def _port(item: Any) -> tuple[int, int] | None:
    """(host port, container port) of a published port in either form compose prints:
    `127.0.0.1:16380:6379/tcp` or `{published: 16380, target: 6379}`."""
    try:
        if isinstance(item, dict):
            return int(item["published"]), int(item["target"])
        parts = str(item).split("/")[0].split(":")
        return (int(parts[-2]), int(parts[-1])) if len(parts) >= 2 else None
    except (KeyError, ValueError, TypeError):
        return None  # a range or an unpublished port: not reachable at a fixed host port


def read_services(compose_files: list[Path], project: str | None) -> dict[str, Service]:
    """The project's services as `docker compose config` resolves its files (the primary
    and its override; needs the project's `.env` when they reference variables)."""
    config = yaml.safe_load(_run([*_base(compose_files, project), "config"], 60.0)) or {}
    services: dict[str, Service] = {}
    for name, spec in (config.get("services") or {}).items():
        spec = spec or {}
        volumes = [_volume(v, compose_files[0].parent) for v in spec.get("volumes") or []]
        ports = [_port(p) for p in spec.get("ports") or []]
        services[name] = Service(
            name,
            spec.get("container_name"),
            str(spec.get("image") or ""),
            _argv(spec.get("command")),
            [v for v in volumes if v is not None],
            _argv(spec["entrypoint"]) if "entrypoint" in spec else None,
            str(spec.get("network_mode") or ""),
            [p for p in ports if p is not None],
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

    def up(self, *services: Service) -> str:
        return compose_up(self.compose_files, self.name, [s.name for s in services])


def data_dir(service: Service, inner: str) -> Path:
    """The host folder a service keeps `inner` in (created when missing)."""
    path = service.host_path(inner)
    if path is None:
        raise FileNotFoundError(
            f"service {service.name!r} keeps its data in {inner}, which is not a bind mount: "
            "its data cannot be restored from the host; mount it in the compose file"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path
