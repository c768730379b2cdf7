"""Compose projects through the compose CLI (no library drives compose files):
`docker compose` (v2 plugin) where it exists, else Debian's `docker-compose` 1.29.

Values of the compose file (environment, secrets from `.env`) are never logged:
only service names, container names and the CLI's own error lines.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.common.secrets import redact_urls

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
CONFIG_FILES_LABEL = "com.docker.compose.project.config_files"
UP_TIMEOUT = 300.0


class ComposeError(RuntimeError):
    """The compose CLI is missing, the file is wrong, or `up` failed; says what to do."""


@functools.cache
def compose_command() -> tuple[str, ...]:
    """`docker compose` when the v2 plugin answers, else `docker-compose`."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return (docker, "compose")
    legacy = shutil.which("docker-compose")
    if legacy:
        return (legacy,)
    raise ComposeError(
        "neither `docker compose` nor `docker-compose` is installed: "
        "install Debian's docker-compose (apt-get install docker-compose, see scripts/setup.sh)"
    )


def is_compose_v2() -> bool:
    """Whether the compose CLI here is the v2 plugin (its .env syntax differs)."""
    return compose_command()[-1] == "compose"


def _run(args: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run the compose CLI; its stdout, or ComposeError with the last lines of its output."""
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        raise ComposeError(f"{' '.join(args[:4])}… did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip().splitlines()[-5:]
        text = redact_urls(" / ".join(output))[0]
        raise ComposeError(f"`{' '.join(args)}` failed (exit {done.returncode}): {text}")
    return done.stdout


@dataclass(frozen=True)
class ComposeService:
    """A service of a compose file, and the container name compose gives it (if fixed)."""

    compose_file: Path | list[Path]  # the primary file, or it and its override
    project: str | None
    service: str
    container_name: str | None


# The files compose reads in a project folder when none is named: the first primary
# file found, and the override beside it.
PRIMARY_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
OVERRIDE_FILES = ("compose.override.yaml", "compose.override.yml", "docker-compose.override.yml",
                  "docker-compose.override.yaml")  # fmt: skip


def project_files(folder: Path) -> list[str]:
    """The files compose itself would read in `folder`: the first default file and its
    override. Empty when there is none."""
    primary = next((n for n in PRIMARY_FILES if (folder / n).is_file()), None)
    if primary is None:
        return []
    override = next((n for n in OVERRIDE_FILES if (folder / n).is_file()), None)
    return [primary] + ([override] if override else [])


@dataclass(frozen=True)
class ComposeFiles:
    """Which files make the project: the ones named (by the operator, or COMPOSE_FILE
    in the project's environment), else compose's own choice in the folder."""

    named: tuple[str, ...] = ()

    @classmethod
    def of(cls, given: str, env: dict[str, str]) -> ComposeFiles:
        """`given` (comma-separated), else COMPOSE_FILE (split on COMPOSE_PATH_SEPARATOR,
        `:` by default, as compose does), else none named."""
        if given.strip():
            return cls(tuple(n.strip() for n in given.split(",") if n.strip()))
        separator = env.get("COMPOSE_PATH_SEPARATOR") or ":"
        return cls(tuple(n for n in env.get("COMPOSE_FILE", "").split(separator) if n))

    def paths(self, folder: Path) -> list[Path]:
        """The files in `folder`; ComposeError naming any that is missing (or the
        default names, when none is named and none is there)."""
        names = list(self.named) or project_files(folder)
        if not names:
            raise ComposeError(
                f"no {' / '.join(PRIMARY_FILES)} in {folder}: name the project's files in "
                "compose_files"
            )
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ComposeError(
                f"compose file {', '.join(missing)} is not in the restored project: fix "
                "compose_files (or COMPOSE_FILE in the backed-up environment)"
            )
        return [folder / n for n in names]


def _base(compose_files: Path | list[Path], project: str | None) -> list[str]:
    files = compose_files if isinstance(compose_files, list) else [compose_files]
    args = [*compose_command()]
    for path in files:
        args += ["-f", str(path)]
    return args + (["-p", project] if project else [])


def find_service(
    compose_file: str | Path,
    container: str,
    project: str | None = None,
    service: str | None = None,
) -> ComposeService:
    """The service of `compose_file` that runs `container`: `service` when known (from
    the container's compose labels), else the one whose `container_name` is `container`,
    else the one named `container`. Raises ComposeError listing the services."""
    path = Path(compose_file).resolve()
    if not path.is_file():
        raise ComposeError(f"compose file {path} does not exist: fix the compose_file parameter")
    config = yaml.safe_load(_run([*_base(path, project), "config"], 60.0)) or {}
    services: dict[str, Any] = config.get("services") or {}
    if service is None:
        named = [s for s, c in services.items() if (c or {}).get("container_name") == container]
        service = named[0] if named else (container if container in services else None)
    if service not in services:
        raise ComposeError(
            f"no service of {path} runs container {container!r} (services: "
            f"{', '.join(sorted(services)) or 'none'}): give it `container_name: {container}` "
            "or fix the container parameter"
        )
    return ComposeService(path, project, service, (services[service] or {}).get("container_name"))


def compose_recreate(target: ComposeService, timeout: float = UP_TIMEOUT) -> str:
    """`up -d --no-deps --force-recreate SERVICE`: a new container for that one service
    (its dependencies are left as they are). Returns the CLI's last output line."""
    args = [*_base(target.compose_file, target.project), "up", "-d", "--no-deps"]
    output = _run([*args, "--force-recreate", target.service], timeout)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "done"


def compose_container_ids(target: ComposeService) -> list[str]:
    """The ids of every container compose runs for the service, stopped ones too
    (`ps -q SERVICE`; the v2 plugin lists stopped ones only with `-a`, which in
    docker-compose 1.x would add one-off `run` containers)."""
    every = ["-a"] if compose_command()[-1] == "compose" else []
    args = [*_base(target.compose_file, target.project), "ps", "-q", *every, target.service]
    return _run(args, 60.0).split()


def compose_container_id(target: ComposeService) -> str:
    """The id of the container compose runs for the service (`ps -q SERVICE`)."""
    found = compose_container_ids(target)
    if not found:
        raise ComposeError(f"compose reports no container for service {target.service!r}")
    return found[0]


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)|\$([A-Za-z_][A-Za-z0-9_]*)")
DUMMY_VALUE = "dummy-for-validation"


@dataclass(frozen=True)
class ComposeCheck:
    """A compose file `config` accepted: its services, and the variables given dummies."""

    services: list[str]
    dummies: list[str]


def validate_compose(compose_files: list[Path], env: dict[str, str]) -> ComposeCheck:
    """`config` of a compose project (its files as a restored backup holds them: the
    primary and its override, read together as compose reads them), with only `env`
    (the backup's env.txt, or the restored .env) set and every other variable it uses
    given a dummy value, for validation only: withheld secrets (`${NAME:?…}`) must not
    make it fail; an `env_file` the backup does not hold (`.env` keeps secrets) is
    created empty. Raises ComposeError with the CLI's reason when it is not a valid
    compose project."""
    text = "\n".join(Path(f).read_text(errors="replace") for f in compose_files)
    used = sorted({a or b for a, b in _VARIABLE.findall(text.replace("$$", ""))})
    dummies = [name for name in used if name not in env]
    for path in compose_files:
        dummies += _absent_env_files(Path(path), Path(path).read_text(errors="replace"))
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        **env,
        **dict.fromkeys(dummies, DUMMY_VALUE),
    }
    project = f"drill-{Path(compose_files[0]).parent.name}".lower()
    output = _run([*_base([Path(f) for f in compose_files], project), "config"], 60.0, environment)
    services = sorted((yaml.safe_load(output) or {}).get("services") or {})
    return ComposeCheck(services, dummies)


def _absent_env_files(compose_file: Path, text: str) -> list[str]:
    """Create, empty, each `env_file` of the compose file that is not beside it; their
    names (as `env_file <name>`)."""
    try:
        services = (yaml.safe_load(text) or {}).get("services") or {}
    except yaml.YAMLError:
        return []  # compose itself says what is wrong
    created = []
    for service in services.values():
        files = (service or {}).get("env_file") or []
        for name in [files] if isinstance(files, str) else files:
            path = compose_file.parent / str(name)
            if (
                isinstance(name, str)
                and path.resolve().is_relative_to(compose_file.parent.resolve())
                and not path.exists()
            ):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                created.append(f"env_file {name}")
    return created
