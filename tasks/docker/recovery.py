"""Bring a crashed container back: inspect it, restart it, or recreate it from its own
inspected configuration (Docker SDK) without ever losing the original.

Recreating moves the original aside first (stopped, renamed `<name>-replaced-<UTC>`),
creates and starts the new container under the original name, and only removes the
original once the caller has verified the new one (`keep_replacement`); any failure
puts the original back under its name, running again if it was (`roll_back`).

Compose finds a service's containers by their labels, which a container keeps for life:
`up --force-recreate` would recreate (remove) a renamed original too. A container
compose manages is therefore kept as a copy compose does not see (`copy_aside`): its
filesystem committed to an image, a container of that image with its configuration
but compose's labels emptied; putting it back creates it again from that image, labels and
all, so compose manages it as before.

Environment values of a container are never printed: they go from the inspected
configuration to the Engine API and nowhere else, and secret-looking ones are
redacted from the log lines we show.
"""

from __future__ import annotations

import json
import re
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import httpx
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.http_health import HEALTHY, HealthWait, wait_until_healthy
from tasks.common.secrets import (
    redact_urls,
    secret_arguments,
    secret_flag,
    secret_name,
    secret_value,
)
from tasks.docker.compose import (
    PROJECT_LABEL,
    SERVICE_LABEL,
    ComposeError,
    ComposeService,
    compose_container_id,
    compose_container_ids,
    compose_recreate,
    find_service,
)
from tasks.docker.containers import ContainerError, docker_client

STOP_SECONDS = 10
RUNNING = frozenset({"running", "restarting", "paused"})
COMPOSE_LABELS = "com.docker.compose."
# The image holding the filesystem of a compose-managed original kept aside.
SET_ASIDE_IMAGE = "proxilion-dr/set-aside"
SET_ASIDE_LABEL = "proxilion-dr.set-aside-from"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")
# Networks that need no endpoint configuration when a container is created.
PLAIN_NETWORKS = {"", "default", "bridge", "host", "none"}


class RecreateError(ContainerError):
    """Recreating failed; the message says what state the container was left in."""


@dataclass(frozen=True)
class ContainerState:
    """What `docker inspect` says about a container, without its configuration values."""

    name: str
    exists: bool
    container_id: str = ""
    status: str = "absent"
    exit_code: int | None = None
    oom_killed: bool = False
    restart_count: int = 0
    error: str = ""
    started_at: str = ""
    finished_at: str = ""
    health: str = ""  # Docker's own healthcheck status, when the image defines one
    image: str = ""
    restart_policy: str = ""
    compose_project: str | None = None
    compose_service: str | None = None

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    def summary(self) -> str:
        if not self.exists:
            return f"container {self.name!r} does not exist"
        parts = [f"{self.status}"]
        if self.exit_code is not None and self.status in {"exited", "dead", "restarting"}:
            parts.append(f"exit code {self.exit_code}")
        parts.append(f"OOM-killed {'yes' if self.oom_killed else 'no'}")
        parts.append(f"restarts {self.restart_count}")
        if self.health:
            parts.append(f"docker health {self.health}")
        if self.error:
            parts.append(f"error {self.error}")
        if self.started_at:
            parts.append(f"started {self.started_at}")
        if self.finished_at and self.status != "running":
            parts.append(f"finished {self.finished_at}")
        parts.append(f"image {self.image}, restart policy {self.restart_policy or 'no'}")
        if self.compose_service:
            parts.append(f"compose {self.compose_project}/{self.compose_service}")
        return ", ".join(parts)


def _time(value: str | None) -> str:
    """Docker's RFC 3339 nanosecond time as `YYYY-mm-dd HH:MM:SS UTC` ('' when unset)."""
    if not value or value.startswith("0001-"):
        return ""
    return value[:19].replace("T", " ") + " UTC"


def state_of(attrs: dict[str, Any]) -> ContainerState:
    """The facts of an inspected container (its `attrs`)."""
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    policy = (attrs.get("HostConfig") or {}).get("RestartPolicy") or {}
    return ContainerState(
        name=attrs.get("Name", "").lstrip("/"),
        exists=True,
        container_id=attrs.get("Id", ""),
        status=state.get("Status", "unknown"),
        exit_code=state.get("ExitCode"),
        oom_killed=bool(state.get("OOMKilled")),
        restart_count=int(attrs.get("RestartCount") or 0),
        error=state.get("Error") or "",
        started_at=_time(state.get("StartedAt")),
        finished_at=_time(state.get("FinishedAt")),
        health=(state.get("Health") or {}).get("Status", ""),
        image=config.get("Image") or attrs.get("Image", ""),
        restart_policy=policy.get("Name") or "",
        compose_project=labels.get(PROJECT_LABEL),
        compose_service=labels.get(SERVICE_LABEL),
    )


def _get(name: str) -> Any | None:
    try:
        return docker_client().containers.get(name)
    except NotFound:
        return None


@dataclass(frozen=True)
class Inspection:
    """A container as found: its state, and (when it exists) its full configuration,
    kept for recreating it. `attrs` holds env values: never print it."""

    state: ContainerState
    attrs: dict[str, Any] | None = field(default=None, repr=False)

    def secrets(self) -> list[str]:
        """The values of its secret-looking environment variables (to redact them)."""
        env = ((self.attrs or {}).get("Config") or {}).get("Env") or []
        values = []
        for item in env:
            name, _, value = item.partition("=")
            if len(value) >= 3 and (secret_name(name) or secret_value(value)):
                values.append(value)
        return sorted(values, key=len, reverse=True)


@task(cache_policy=NO_CACHE)
def inspect_container(name: str) -> Inspection:
    """State, exit code, OOM kill, restart count of container `name` (absent is a state)."""
    container = _get(name)
    if container is None:
        return Inspection(ContainerState(name, exists=False))
    return Inspection(state_of(container.attrs), container.attrs)


def current_state(name: str) -> ContainerState:
    container = _get(name)
    return ContainerState(name, exists=False) if container is None else state_of(container.attrs)


def stopped_reason(name: str) -> str | None:
    """Why waiting for `name` to become healthy is pointless (it exited, or is gone),
    else None (running, starting, or restarting under its restart policy)."""
    state = current_state(name)
    if not state.exists:
        return f"container {name!r} no longer exists"
    if state.status in {"exited", "dead"}:
        return f"container {name!r} {state.status} (exit code {state.exit_code})"
    return None


def published_url(name: str, url: str) -> str | None:
    """`url`, whose port is the one inside container `name` (a replica of a scaled
    service), where that container answers now: the host address and port it publishes
    the port at (0.0.0.0 → 127.0.0.1), else its own address on its network. None when
    it has neither (not running, or on the host's network). Ask after each start: an
    ephemeral port changes."""
    container = _get(name)
    if container is None or container.status != "running":
        return None
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    network = container.attrs.get("NetworkSettings") or {}
    bindings = (network.get("Ports") or {}).get(f"{port}/tcp") or []
    binding = next((b for b in bindings if ":" not in b["HostIp"]), None)
    if binding:
        host = "127.0.0.1" if binding["HostIp"] in ("", "0.0.0.0") else binding["HostIp"]
        return str(parsed.copy_with(host=host, port=int(binding["HostPort"])))
    networks = (network.get("Networks") or {}).values()
    address = next((n["IPAddress"] for n in networks if n.get("IPAddress")), None)
    return str(parsed.copy_with(host=address)) if address else None


def no_address(name: str, url: str) -> str:
    """Why a replica cannot be probed (it is stopped, or has no address of its own)."""
    return stopped_reason(name) or (
        f"container {name!r} neither publishes the port of {url} nor has an address of its "
        "own (host networking?): give each replica its own port or network address"
    )


@task(cache_policy=NO_CACHE)
def wait_until_container_healthy(
    name: str, url: str, deadline_seconds: float, published: bool = False
) -> HealthWait:
    """Poll `url` for `{"status": "healthy"}` until the deadline, giving up early when
    container `name` exits or disappears. `published`: `url`'s port is the one inside
    the container, probed where the container answers (`published_url`)."""
    if published:
        where = published_url(name, url)
        if where is None:
            return HealthWait(url, False, 0.0, 0, no_address(name, url))
        url = where
    return wait_until_healthy(url, deadline_seconds, HEALTHY, lambda: stopped_reason(name))


def clean_lines(raw: bytes, secrets: list[str]) -> list[str]:
    """Log bytes as printable lines: control characters dropped, the given secret values
    and credentials in URLs replaced by `***`."""
    text = ANSI.sub("", raw.decode(errors="replace").replace("\r\n", "\n"))
    for value in secrets:
        text = text.replace(value, "***")
    return redact_urls(text)[0].splitlines()


@task(cache_policy=NO_CACHE)
def container_log_tail(name: str, secrets: list[str], lines: int = 100) -> list[str]:
    """The last `lines` lines `name` logged (both streams, with Docker's timestamps),
    cleaned of control characters and secrets (see `clean_lines`)."""
    container = _get(name)
    if container is None:
        return []
    raw = container.logs(tail=lines, stdout=True, stderr=True, timestamps=True)
    return clean_lines(raw, secrets)


def _masked_argv(argv: list[str] | None) -> list[str] | None:
    """A command line with the values of secret flags (`--requirepass x`, `-a x`) and
    URL credentials replaced by `***`."""
    if argv is None:
        return None
    masked = []
    for i, arg in enumerate(argv):
        if i and secret_flag(argv[i - 1], "redis-cli" in " ".join(argv[:i])):
            masked.append("***")
            continue
        for match in reversed(secret_arguments(arg)):
            arg = arg[: match.start("value")] + "***" + arg[match.end("value") :]
        masked.append(redact_urls(arg)[0])
    return masked


@task(cache_policy=NO_CACHE)
def inspect_lines(inspection: Inspection) -> list[str]:
    """The container's `docker inspect` data for the report, as JSON lines: state,
    image, command, environment NAMES (values never shown), labels, mounts, network,
    ports, restart policy; secret values in them replaced by `***`."""
    attrs = inspection.attrs or {}
    config = attrs.get("Config") or {}
    host = attrs.get("HostConfig") or {}
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    shown = {
        "Id": attrs.get("Id"),
        "Name": attrs.get("Name"),
        "Created": attrs.get("Created"),
        "Image": attrs.get("Image"),
        "State": attrs.get("State"),
        "RestartCount": attrs.get("RestartCount"),
        "Config": {
            "Image": config.get("Image"),
            "Entrypoint": _masked_argv(config.get("Entrypoint")),
            "Cmd": _masked_argv(config.get("Cmd")),
            "Env": [item.partition("=")[0] + "=***" for item in config.get("Env") or []],
            "WorkingDir": config.get("WorkingDir"),
            "User": config.get("User"),
            "Labels": config.get("Labels"),
        },
        "HostConfig": {
            key: host.get(key)
            for key in ("NetworkMode", "PortBindings", "RestartPolicy", "Binds", "Mounts")
        },
        "Mounts": attrs.get("Mounts"),
        "Networks": {name: {"Aliases": n.get("Aliases")} for name, n in networks.items()},
    }
    return clean_lines(json.dumps(shown, indent=1).encode(), inspection.secrets())


@task(cache_policy=NO_CACHE)
def restart_container(name: str, stop_seconds: int = STOP_SECONDS) -> ContainerState:
    """Restart `name` (started when exited, unpaused first when paused); its new state."""
    container = _get(name)
    if container is None:
        raise ContainerError(f"container {name!r} no longer exists: it cannot be restarted")
    try:
        if container.status == "paused":
            container.unpause()
        container.restart(timeout=stop_seconds)
    except APIError as error:
        raise ContainerError(f"docker could not restart {name!r}: {error.explanation}") from None
    return current_state(name)


# ------------------------------------------------------------------ recreate (SDK)


def _image_ref(attrs: dict[str, Any]) -> tuple[str, str]:
    """The image to recreate from: its name when the name still points at the image the
    container ran, else that image's id. Returns (reference, note for the report)."""
    client = docker_client()
    name, image_id = attrs["Config"].get("Image", ""), attrs["Image"]
    try:
        if name and client.images.get(name).id == image_id:
            return name, ""
    except ImageNotFound:
        pass
    try:
        client.images.get(image_id)
    except ImageNotFound:
        raise RecreateError(
            f"the image the container ran ({name or image_id}) is no longer on this host: "
            "load or build it again, or recreate from the compose file (compose_file)"
        ) from None
    return image_id, f"{name} now names another image; recreated from the one it ran, {image_id}"


def creation_config(attrs: dict[str, Any], image: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """An Engine API create body reproducing the inspected container (image, command,
    entrypoint, env, labels, user, working dir, mounts with its volumes, network mode,
    ports, restart policy…), and the extra networks to connect after creating it."""
    config = {k: v for k, v in attrs["Config"].items() if v is not None}
    config["Image"] = image
    if config.get("Hostname") == attrs["Id"][:12]:
        config.pop("Hostname")  # the old container's generated hostname
    host = {k: v for k, v in attrs["HostConfig"].items() if v is not None}
    # Anonymous volumes keep their data: the new container mounts the same volumes.
    volumes = {m["Destination"]: m["Name"] for m in attrs.get("Mounts") or [] if m.get("Name")}
    mounts = [dict(m) for m in host.get("Mounts") or []]
    for mount in mounts:
        if mount.get("Type") == "volume" and not mount.get("Source"):
            mount["Source"] = volumes.get(mount.get("Target"))
    if mounts:
        host["Mounts"] = mounts
    binds = list(host.get("Binds") or [])
    covered = {b.split(":")[1] for b in binds if ":" in b} | {m.get("Target") for m in mounts}
    for mount in attrs.get("Mounts") or []:  # the image's VOLUMEs, named nowhere else
        if mount.get("Type") == "volume" and mount.get("Destination") not in covered:
            mode = "" if mount.get("RW", True) else ":ro"
            binds.append(f"{mount['Name']}:{mount['Destination']}{mode}")
    if binds:
        host["Binds"] = binds
    config["HostConfig"] = host
    networks = dict((attrs.get("NetworkSettings") or {}).get("Networks") or {})
    mode = host.get("NetworkMode", "")
    extra: dict[str, Any] = {}
    if mode not in PLAIN_NETWORKS and not mode.startswith("container:"):
        endpoints = {}
        for net, settings in networks.items():
            aliases = [a for a in settings.get("Aliases") or [] if a != attrs["Id"][:12]]
            endpoint = {"Aliases": aliases or None, "IPAMConfig": settings.get("IPAMConfig")}
            endpoint = {k: v for k, v in endpoint.items() if v}
            if net == mode:
                endpoints[net] = endpoint
            else:
                extra[net] = endpoint
        config["NetworkingConfig"] = {"EndpointsConfig": endpoints}
    return config, extra


@task(cache_policy=NO_CACHE)
def plan_recreate(inspection: Inspection) -> str:
    """Check that the container can be recreated from its configuration (its image is
    here, the create body builds) without changing anything; what would be created."""
    if inspection.attrs is None:
        raise RecreateError(f"container {inspection.state.name!r} does not exist")
    image, note = _image_ref(inspection.attrs)
    config, _ = creation_config(inspection.attrs, image)
    host = config["HostConfig"]
    mounts = len(host.get("Binds") or []) + len(host.get("Mounts") or [])
    policy = (host.get("RestartPolicy") or {}).get("Name") or "no"
    text = (
        f"image {image}, network mode {host.get('NetworkMode') or 'default'}, {mounts} mounts, "
        f"{len(config.get('Env') or [])} environment variables, "
        f"{len(config.get('Labels') or {})} labels, restart policy {policy}"
    )
    return f"{text} ({note})" if note else text


@dataclass(frozen=True)
class Replacement:
    """A recreated container and the original, moved aside until the new one is proven."""

    name: str
    aside: str | None  # the original's name while aside (None: there was no original)
    was_running: bool
    note: str = ""
    # A compose-managed original (`copy_aside`): the image holding its filesystem, and
    # its inspected configuration, to create it again from them.
    snapshot: str | None = None
    original: dict[str, Any] | None = field(default=None, repr=False)


def _aside_name(name: str) -> str:
    return f"{name}-replaced-{datetime.now(UTC):%Y%m%dT%H%M%S}"


def _reason(error: DockerException) -> str:
    return getattr(error, "explanation", None) or str(error)


def rename_aside(name: str) -> tuple[str, bool] | None:
    """Stop `name` and rename it `<name>-replaced-<UTC>`; (new name, was running), or
    None when there is no such container."""
    container = _get(name)
    if container is None:
        return None
    was_running = container.status in RUNNING
    aside = _aside_name(name)
    try:
        if was_running:
            container.stop(timeout=STOP_SECONDS)
        container.rename(aside)
    except DockerException as error:
        if was_running:
            with suppress(DockerException):
                container.start()
        raise RecreateError(
            f"could not move {name!r} aside ({_reason(error)}); "
            f"it is now {current_state(name).summary()}"
        ) from None
    return aside, was_running


def copy_aside(inspection: Inspection) -> Replacement:
    """Keep a container compose manages where compose does not see it: stopped, its
    filesystem committed to an image (`proxilion-dr/set-aside:<name>-replaced-<UTC>`),
    and a container of that image with its configuration but compose's labels emptied,
    created (never started) as `<name>-replaced-<UTC>`. The original itself stays for
    compose to replace."""
    name = inspection.state.name
    container = _get(name)
    if container is None or inspection.attrs is None:
        raise RecreateError(f"container {name!r} no longer exists: nothing to keep aside")
    was_running = container.status in RUNNING
    aside = _aside_name(name)
    client = docker_client()
    snapshot = None
    try:
        if was_running:
            container.stop(timeout=STOP_SECONDS)
        snapshot = container.commit(repository=SET_ASIDE_IMAGE, tag=aside[:128]).id
        config, _ = creation_config(inspection.attrs, snapshot)
        # emptied, not dropped: the image carries them too, and a container's own win
        labels = config.get("Labels") or {}
        config["Labels"] = {k: "" if k.startswith(COMPOSE_LABELS) else v for k, v in labels.items()}
        config["Labels"][SET_ASIDE_LABEL] = name
        client.api.create_container_from_config(config, name=aside)
    except DockerException as error:
        if snapshot:
            with suppress(DockerException):
                client.images.remove(snapshot)
        if was_running:
            with suppress(DockerException):
                container.start()
        raise RecreateError(
            f"could not keep a copy of {name!r} aside ({_reason(error)}); "
            f"it is now {current_state(name).summary()}"
        ) from None
    return Replacement(name, aside, was_running, snapshot=snapshot, original=inspection.attrs)


def _create(config: dict[str, Any], networks: dict[str, Any], name: str, start: bool) -> None:
    """Create container `name` from an Engine API body, join its extra networks, start it."""
    client = docker_client()
    created = client.api.create_container_from_config(config, name=name)
    for network, endpoint in networks.items():
        client.api.connect_container_to_network(
            created["Id"],
            network,
            aliases=endpoint.get("Aliases"),
            **_ipam(endpoint.get("IPAMConfig")),
        )
    if start:
        client.api.start(created["Id"])


@task(cache_policy=NO_CACHE)
def recreate_container(inspection: Inspection) -> Replacement:
    """Recreate the inspected container from its own configuration and start it; the
    original waits aside. On failure the original is put back (see `roll_back`) and
    RecreateError says in what state."""
    if inspection.attrs is None:
        raise RecreateError(f"container {inspection.state.name!r} does not exist")
    name = inspection.state.name
    image, note = _image_ref(inspection.attrs)
    config, extra_networks = creation_config(inspection.attrs, image)
    moved = rename_aside(name)
    replacement = Replacement(name, moved[0] if moved else None, bool(moved and moved[1]), note)
    try:
        _create(config, extra_networks, name, start=True)
    except DockerException as error:
        state = roll_back(replacement)
        raise RecreateError(
            f"docker refused to recreate {name!r} ({_reason(error)}); {state}"
        ) from None
    return replacement


def _ipam(ipam: dict[str, Any] | None) -> dict[str, Any]:
    ipam = ipam or {}
    return {"ipv4_address": ipam.get("IPv4Address"), "ipv6_address": ipam.get("IPv6Address")}


@task(cache_policy=NO_CACHE)
def roll_back(replacement: Replacement) -> str:
    """Remove the new container and put the original back under its name, started again
    if it was running. Returns the resulting state in words (for the report)."""
    client = docker_client()
    name = replacement.name
    with suppress(NotFound):
        client.containers.get(name).remove(force=True)
    if replacement.aside is None:
        return f"the failed new container was removed; there is no container {name!r}"
    try:
        if replacement.snapshot and replacement.original:
            config, networks = creation_config(replacement.original, replacement.snapshot)
            _create(config, networks, name, start=replacement.was_running)
            client.containers.get(replacement.aside).remove(v=False, force=True)
            how = f" (its filesystem from image {SET_ASIDE_IMAGE}:{replacement.aside[:128]})"
        else:
            original = client.containers.get(replacement.aside)
            original.rename(name)
            if replacement.was_running:
                original.start()
            how = ""
    except DockerException as error:
        return (
            f"putting the original back failed ({_reason(error)}): it is container "
            f"{replacement.aside!r}, now {current_state(replacement.aside).summary()}"
        )
    return (
        f"the original container is back under its name{how}, now {current_state(name).summary()}"
    )


@task(cache_policy=NO_CACHE)
def keep_replacement(replacement: Replacement) -> str | None:
    """The new container is verified: remove the original (its volumes are kept), and
    the image of a copy kept aside from compose. Returns what was removed."""
    if replacement.aside is None:
        return None
    client = docker_client()
    with suppress(NotFound):
        client.containers.get(replacement.aside).remove(v=False, force=True)
    if replacement.snapshot:
        with suppress(NotFound):
            client.images.remove(replacement.snapshot)
    return replacement.aside


# -------------------------------------------------------------- recreate (compose)


def compose_target(compose_file: str, state: ContainerState) -> ComposeService:
    """The service of `compose_file` that runs the container; refused when that service
    runs several containers: compose recreates every container of a service."""
    target = find_service(compose_file, state.name, state.compose_project, state.compose_service)
    others = [i for i in compose_container_ids(target) if i != state.container_id]
    if others:
        raise RecreateError(
            f"service {target.service} runs {len(others)} more container(s), and compose "
            f"would recreate them all: recover its replicas with service={target.service}, or "
            f"leave compose_file empty to recreate {state.name} from its own configuration"
        )
    return target


def service_replicas(compose_file: str, service: str) -> list[str]:
    """The names of the containers compose runs for `service` of `compose_file`."""
    target = find_service(compose_file, service, None, service)
    client = docker_client()
    names = sorted(client.containers.get(i).name for i in compose_container_ids(target))
    if not names:
        raise RecreateError(
            f"compose runs no container for service {service} of {target.compose_file}: "
            "start it (compose up -d), then run this again"
        )
    return names


@task(cache_policy=NO_CACHE)
def recreate_with_compose(target: ComposeService, inspection: Inspection) -> Replacement:
    """`up --force-recreate` the service of `target`, the original kept aside first: a
    copy compose does not see when compose manages it (`copy_aside`), else the
    container renamed (compose would refuse its name). Any failure puts it back.
    Returns the new container's name, and where the original waits."""
    state = inspection.state
    if state.exists and state.compose_service == target.service:
        replacement = copy_aside(inspection)
    else:
        moved = rename_aside(state.name) if state.exists else None
        replacement = Replacement(state.name, moved[0] if moved else None, bool(moved and moved[1]))
    try:
        compose_recreate(target)
        created = docker_client().containers.get(compose_container_id(target))
    except (ComposeError, DockerException) as error:
        reason = getattr(error, "explanation", None) or str(error)
        now = (
            roll_back(replacement)
            if replacement.aside
            else f"it is now {current_state(state.name).summary()}"
        )
        raise RecreateError(f"{reason}; {now}") from None
    return replace(replacement, name=created.name)
