"""The restore drill runs a restored compose project beside the live one, isolated.

The config backup holds the operator's compose project; the drill proves it runnable
by bringing the restored copy up under its own project name
(`proxilion-dr-drill-<run>`) and checking each service comes up. The copy must never
touch the live stack, which runs on this host at the same time with the same fixed
ports and container names, so the drill runs a derived compose file, written in the
scratch copy, with these changes (each one listed in the drill's report):

- `container_name` dropped: compose names the containers `<drill project>_<service>_1`.
- Labels replaced by the drill's (`proxilion-dr.drill`, `proxilion-dr.drill-dir`):
  `remove_leftovers` finds a killed drill's containers, networks and volumes by them,
  and nothing that discovers services by label (our sandbox label, Traefik, Prometheus
  docker_sd) takes a drill container for a live one. `restart: "no"`.
- Host networking becomes one private network namespace shared by the project's
  host-mode services (`network_mode: service:<holder>`, the holder a `sleep` container
  from the first such service's image, on the drill project's own bridge network).
  Why not the project's bridge network with 127.0.0.1 rewritten to service names:
  host-mode services reach each other and bind by 127.0.0.1 in places no rewrite
  can find with certainty (redis.conf `bind`, `--web.listen-address=127.0.0.1:9090`,
  scrape targets in prometheus.yml); a service bound to its own loopback is then
  unreachable, and a rewritten project is not the one that was backed up. Why not
  host networking with remapped ports: every program's port flags would have to be
  known, and one missed collides with the live stack. A shared private namespace
  keeps exactly what host networking promised the project (one loopback, the same
  fixed ports) while nothing in it can reach or bind the host's loopback.
  Settings that conflict with a shared namespace (`ports`, `expose`, `hostname`,
  `dns*`, `extra_hosts`, `mac_address`, `networks`, `links`) are dropped for them.
- Published ports of the other services become `127.0.0.1::<container port>`:
  ephemeral host ports on loopback only, never the live ones.
- Every network of the drill project is `internal`: its services reach each other
  and nothing else, so a restored Prometheus cannot page the live Alertmanager and a
  service cannot write to a live database it names by host name. (A service that
  needs the internet to start fails the drill, named, with its log lines.)
- Bind mounts: relative paths already resolve inside the scratch copy; a read-only
  absolute host path (programs, /usr, /etc, a script) is kept, since it cannot be
  written; a read-WRITE absolute host path is REDIRECTED into the scratch copy
  (`.drill-mounts/<host path>`: a copy when it is a file, else an empty folder):
  the drill runs, as a restored project would, without the live data. An `env_file`
  outside the project is not read (it is left out like the withheld secrets).
  Named volumes and networks are the drill project's own; external ones are made the
  project's own too (never attached to live ones).
- Refused (the drill fails saying so): joining a live container's network, PID or
  IPC namespace, or its volumes (`container:<name>`), which no rewrite can isolate.

Variables: the backup's env.txt, plus a placeholder per withheld secret and per
other variable the files need (written to the copy's `.env`, 0600); the compose CLI
runs with only PATH, HOME and Docker's own settings, never this process's
environment (which may hold the real secrets). Values are never logged. Whether each
service then came up is tasks/drill/services.py's.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.docker.compose import PRIMARY_FILES, ComposeError, _run, compose_command, project_files
from tasks.docker.project import env_file_text, required_variables
from tasks.drill.scratch import DRILL_DIR_LABEL, DRILL_LABEL

PROJECT_PREFIX = "proxilion-dr-"
DERIVED_FILE = "proxilion-dr-drill.yml"
MOUNTS_DIR = ".drill-mounts"
HOLDER = "drill-netns"
HOLDER_SECONDS = "2147483647"  # `sleep` this long: the holder lives until torn down
# Compose's default files, in the order it reads them.
# Docker refuses these with `network_mode: service:…` (the namespace is shared).
NAMESPACE_CONFLICTS = (
    "ports",
    "expose",
    "hostname",
    "domainname",
    "dns",
    "dns_search",
    "dns_opt",
    "extra_hosts",
    "mac_address",
    "networks",
    "links",
)
_DOCKER_SETTINGS = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONFIG")


class DrillComposeError(ComposeError):
    """The restored project cannot be isolated or brought up; one line saying why."""


@dataclass
class DrillProject:
    """A restored compose project prepared to run isolated under its own name."""

    name: str
    folder: Path
    compose_file: Path
    services: list[str]
    changes: list[str] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    holder: str | None = None
    one_shot: list[str] = field(default_factory=list)


def project_name(scratch_folder: Path) -> str:
    """`proxilion-dr-drill-<run>`, as compose normalises it (lower case, [a-z0-9_-])."""
    return re.sub(r"[^a-z0-9_-]", "", f"{PROJECT_PREFIX}{scratch_folder.name}".lower())[:63]


def _cli_environment(values: dict[str, str]) -> dict[str, str]:
    """Only PATH, HOME and Docker's connection settings of this process, plus `values`."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    base |= {k: os.environ[k] for k in _DOCKER_SETTINGS if k in os.environ}
    return base | values


def _args(folder: Path, files: list[str], project: str) -> list[str]:
    args = [*compose_command(), "--project-directory", str(folder), "-p", project]
    for name in files:
        args += ["-f", str(folder / name)]
    return args


def placeholder_value() -> str:
    """The one random value a drill gives every secret the backup withheld (so a
    restored Redis password and the gateway's copy of it still agree)."""
    return f"drill-placeholder-{secrets.token_hex(8)}"


def placeholders(
    folder: Path, files: list[str], env: dict[str, str], withheld: list[str], fill: str
) -> dict[str, str]:
    """`fill` for each withheld secret and each other variable the compose files need
    that env.txt does not give."""
    needed = set(withheld)
    for name in files:
        needed |= required_variables((folder / name).read_text(errors="replace"))
    return {name: fill for name in sorted(needed) if name not in env}


def _outside_env_files(folder: Path, files: list[str]) -> list[str]:
    """Drop `env_file` entries outside the project from the scratch copies (compose
    would read a live file's values into the drill); what was dropped."""
    dropped = []
    for name in files:
        path = folder / name
        document = yaml.safe_load(path.read_text(errors="replace")) or {}
        services = document.get("services") if isinstance(document, dict) else None
        changed = False
        for service, spec in (services or {}).items():
            entries = (spec or {}).get("env_file")
            if not entries:
                continue
            listed = [entries] if isinstance(entries, str) else list(entries)
            kept = [e for e in listed if _inside(folder, folder / str(e))]
            if len(kept) != len(listed):
                dropped += [f"{service}: env_file {e}" for e in listed if e not in kept]
                spec["env_file"] = kept
                changed = True
        if changed:
            path.write_text(yaml.safe_dump(document, sort_keys=False))
    return dropped


def _inside(folder: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def prepare(
    folder: Path,
    scratch_folder: Path,
    env: dict[str, str],
    withheld: list[str],
    fill: str | None = None,
) -> DrillProject:
    """Resolve the restored project in `folder` (`config`, with env.txt's values and
    placeholders), derive its isolated copy and write it beside it. Raises
    DrillComposeError when it holds no compose file or cannot be isolated."""
    files = project_files(folder)
    if not files:
        raise DrillComposeError(f"no {' / '.join(PRIMARY_FILES)} in the restored project")
    name = project_name(scratch_folder)
    filled = placeholders(folder, files, env, withheld, fill or placeholder_value())
    dropped = _outside_env_files(folder, files)
    dotenv = folder / ".env"  # compose reads it; so do services naming it as env_file
    dotenv.write_text(env_file_text({**env, **filled}) if env or filled else "")
    dotenv.chmod(0o600)
    try:
        resolved = _run([*_args(folder, files, name), "config"], 60.0, _cli_environment({}))
    except ComposeError as error:
        raise DrillComposeError(str(error)) from None
    derived, changes, holder = isolate(
        yaml.safe_load(resolved) or {}, folder, name, str(scratch_folder)
    )
    changes += [f"not read (outside the project): {d}" for d in dropped]
    path = folder / DERIVED_FILE
    path.write_text(yaml.safe_dump(derived, sort_keys=False))
    services = sorted(s for s in derived["services"] if s != holder)
    one_shot = one_shot_services(derived["services"])
    return DrillProject(name, folder, path, services, changes, sorted(filled), holder, one_shot)


def one_shot_services(services: dict[str, Any]) -> list[str]:
    """The services another one waits for to complete (`depends_on` with `condition:
    service_completed_successfully`): compose's own mark of a one-shot job (a
    migration, an init step), which has done its work when it exits 0."""
    waited_for = set()
    for spec in services.values():
        depends_on = spec.get("depends_on")
        if isinstance(depends_on, dict):  # the long form, as `config` resolves it
            waited_for |= {
                name
                for name, how in depends_on.items()
                if (how or {}).get("condition") == "service_completed_successfully"
            }
    return sorted(waited_for)


# ------------------------------------------------------------------- the derivation


def isolate(
    config: dict[str, Any], folder: Path, project: str, drill_dir: str
) -> tuple[dict[str, Any], list[str], str | None]:
    """The resolved compose `config` (`docker-compose config` output) made safe to run
    beside the live project (see the module docstring), the changes made, and the name
    of the namespace holder service (None when no service used host networking)."""
    labels = {DRILL_LABEL: project, DRILL_DIR_LABEL: drill_dir}
    services: dict[str, Any] = {n: dict(s or {}) for n, s in (config.get("services") or {}).items()}
    changes: list[str] = []
    host_mode = sorted(n for n, s in services.items() if s.get("network_mode") == "host")
    holder = _holder_name(services) if host_mode else None
    for name, spec in services.items():
        _refuse_live_namespaces(name, spec)
        if spec.pop("container_name", None):
            changes.append(f"{name}: container_name dropped")
        spec["labels"] = dict(labels)
        spec["restart"] = "no"
        if name in host_mode:
            spec["network_mode"] = f"service:{holder}"
            gone = [key for key in NAMESPACE_CONFLICTS if spec.pop(key, None) is not None]
            changes.append(
                f"{name}: host networking → the drill's private namespace"
                + (f" ({', '.join(gone)} dropped)" if gone else "")
            )
        elif str(spec.get("network_mode")).removeprefix("service:") in host_mode:
            spec["network_mode"] = f"service:{holder}"  # it shared a host-mode service's
        if spec.get("network_mode") == "bridge":  # Docker's own bridge reaches out
            del spec["network_mode"]
            changes.append(f"{name}: Docker's bridge → the drill project's network")
        if spec.get("ports") and not str(spec.get("network_mode")).startswith("service:"):
            spec["ports"] = [_loopback_port(p) for p in spec["ports"]]
            changes.append(f"{name}: published ports → ephemeral on 127.0.0.1")
        spec["volumes"] = [
            _isolated_volume(name, v, folder, changes) for v in spec.get("volumes") or []
        ]
    changes.append("every service: labels replaced by the drill's, restart 'no'")
    if holder:
        services[holder] = _holder(services[host_mode[0]], labels, host_mode[0])
    derived: dict[str, Any] = {"version": str(config.get("version") or "2.4"), "services": services}
    networks = {n: dict(c or {}) for n, c in (config.get("networks") or {}).items()}
    networks.setdefault("default", {})
    derived["networks"] = {n: _own(n, c, labels, "network", changes) for n, c in networks.items()}
    for spec in derived["networks"].values():
        spec["internal"] = True  # nothing beyond the project: no live database, no alerts
    changes.append("networks internal: the project reaches nothing beyond itself")
    volumes = {n: dict(c or {}) for n, c in (config.get("volumes") or {}).items()}
    if volumes:
        derived["volumes"] = {n: _own(n, c, labels, "volume", changes) for n, c in volumes.items()}
    for key in ("secrets", "configs"):
        if config.get(key):
            derived[key] = config[key]
    return derived, changes, holder


def _refuse_live_namespaces(name: str, spec: dict[str, Any]) -> None:
    for key in ("network_mode", "pid", "ipc"):
        value = str(spec.get(key) or "")
        if value.startswith("container:"):
            raise DrillComposeError(
                f"service {name} has `{key}: {value}`: it joins a live container, which the "
                "drill cannot isolate; use `service:<name>` within the project"
            )
    for item in spec.get("volumes_from") or []:
        if str(item).startswith("container:"):
            raise DrillComposeError(
                f"service {name} takes the volumes of live container {str(item)[10:]} "
                "(volumes_from): the drill cannot isolate it; use a service of the project"
            )


def _holder_name(services: dict[str, Any]) -> str:
    name = HOLDER
    while name in services:
        name += "-x"
    return name


def _holder(like: dict[str, Any], labels: dict[str, str], service: str) -> dict[str, Any]:
    """The container that holds the private namespace: `sleep`, from `service`'s image
    with its read-only mounts (an image borrowing the host's /usr needs them)."""
    read_only = [v for v in like.get("volumes") or [] if _read_only(v)]
    return {
        "image": like.get("image"),
        "entrypoint": ["sleep", HOLDER_SECONDS],
        "command": [],
        "volumes": read_only,
        "labels": {**labels, "proxilion-dr.drill-role": f"network namespace (as {service})"},
        "restart": "no",
        "stop_signal": "SIGKILL",  # sleep as PID 1 ignores SIGTERM
    }


def _own(name: str, spec: dict[str, Any], labels: dict[str, str], kind: str, changes: list[str]):
    """A network or volume made the drill project's own, labelled."""
    if spec.pop("external", False):
        spec.pop("name", None)
        changes.append(f"external {kind} {name} → the drill project's own")
    spec.pop("name", None)  # a fixed name would be shared with the live project's
    spec["labels"] = {**(spec.get("labels") or {}), **labels}
    return spec


def _loopback_port(port: Any) -> str:
    """A published port as `127.0.0.1::<container port>/<protocol>` (ephemeral)."""
    if isinstance(port, dict):
        target, protocol = str(port.get("target")), str(port.get("protocol") or "tcp")
    else:
        text, _, protocol = str(port).partition("/")
        target, protocol = text.rsplit(":", 1)[-1], protocol or "tcp"
    return f"127.0.0.1::{target}/{protocol}"


def _parts(volume: Any) -> tuple[str, str, str, bool]:
    """(source, target, mode, is a bind mount) of a short or long volume entry."""
    if isinstance(volume, dict):
        mode = "ro" if volume.get("read_only") else "rw"
        source = str(volume.get("source") or "")
        return source, str(volume.get("target")), mode, volume.get("type", "volume") == "bind"
    parts = str(volume).split(":")
    source = parts[0] if len(parts) > 1 else ""
    target = parts[1] if len(parts) > 1 else parts[0]
    mode = parts[2] if len(parts) > 2 else "rw"
    return source, target, mode, source.startswith("/")


def _read_only(volume: Any) -> bool:
    source, _, mode, bind = _parts(volume)
    return bind and "ro" in mode.split(",")


def _isolated_volume(service: str, volume: Any, folder: Path, changes: list[str]) -> Any:
    """Keep a mount inside the copy, a read-only one, or a named volume; redirect a
    read-write host path outside the copy into `.drill-mounts/`."""
    source, target, mode, bind = _parts(volume)
    if not bind or _read_only(volume) or _inside(folder, Path(source)):
        return volume
    redirected = folder / MOUNTS_DIR / source.lstrip("/")
    if Path(source).is_file():
        redirected.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, redirected)  # read only; the live file is never written
    else:
        redirected.mkdir(parents=True, exist_ok=True)
    changes.append(f"{service}: read-write {source} → {redirected.relative_to(folder)} (scratch)")
    if isinstance(volume, dict):
        return {**volume, "source": str(redirected)}
    return ":".join([str(redirected), target, mode])


# ------------------------------------------------------------------------ up, down


def up(project: DrillProject, timeout: float) -> str:
    """`up -d --no-build` of the derived file (images must be present, as on the live
    host); the CLI's last line, or DrillComposeError with its reason."""
    args = [*compose_command(), "-p", project.name, "-f", str(project.compose_file)]
    args += ["--project-directory", str(project.folder), "up", "-d", "--no-build"]
    try:
        output = _run(args, timeout, _cli_environment({}))
    except ComposeError as error:  # `<the whole command line>` failed (exit 1): <why>
        why = re.sub(r"^`.*?` failed ", "", str(error))
        raise DrillComposeError(
            f"`up` of the restored project {project.name} failed {why}"
        ) from None
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "done"


def down(project: DrillProject) -> str | None:
    """`down -v --remove-orphans` and remove the copy; never raises: what is left (the
    next drill's `remove_leftovers` finds it by its label), or None."""
    args = [*compose_command(), "-p", project.name, "-f", str(project.compose_file)]
    args += ["--project-directory", str(project.folder), "down", "-v", "--remove-orphans"]
    left = None
    try:
        _run([*args, "-t", "5"], 120.0, _cli_environment({}))
    except ComposeError as error:
        left = f"compose project {project.name} ({error})"
    shutil.rmtree(project.folder, ignore_errors=True)
    return left


def summary(changes: list[str]) -> str:
    """`gateway: container_name dropped`, `redis: container_name dropped` → one
    `container_name dropped (gateway, redis)`: what the derivation changed, short."""
    grouped: dict[str, list[str]] = {}
    for change in changes:
        service, _, what = change.partition(": ")
        if not what:
            service, what = "", change
        grouped.setdefault(what, []).append(service)
    parts = [f"{what} ({', '.join(s for s in names if s)})" for what, names in grouped.items()]
    return "; ".join(p.replace(" ()", "") for p in parts) or "none"
