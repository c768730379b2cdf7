"""The restore drill's scratch environment: containers beside the live stack, never in it.

Each scratch container is made from the image of the live container it stands in for
(inspected: image, entrypoint, read-only mounts such as the programs and scripts, the
environment, host networking or not), with its own name (`drill-redis`…), its own
free port on 127.0.0.1, its own data folder, and the label `proxilion-dr.drill`
naming the data folder it uses. A drill that was killed halfway leaves containers
and folders behind: `remove_leftovers` finds them by that label and removes them.
Nothing here touches a live container beyond reading its configuration.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.errors import APIError, DockerException, NotFound
from docker.types import Mount

from tasks.docker.containers import ContainerError, docker_client, get_container

DRILL_LABEL = "proxilion-dr.drill"
DRILL_DIR_LABEL = "proxilion-dr.drill-dir"
DRILL_NETWORK = "proxilion-dr-drill"
# Scratch folders are named so; only folders of this shape are ever removed.
SCRATCH_PREFIX = "drill-"


class ScratchError(ContainerError):
    """A scratch container could not be made or started; says which and why."""


class DrillBusy(RuntimeError):
    """Another restore drill holds this host's drill containers."""


# Host-wide, not per Prefect server or scratch_dir: the containers' names are.
HOST_LOCK = Path(tempfile.gettempdir()) / "proxilion-dr-drill.lock"


def flock_holder(path: Path) -> str:
    """Who holds a flock(2) on `path`, from /proc/locks: ", pid N (name)", or "" when
    it cannot be told. Only the process name: a command line may carry credentials."""
    try:
        info = path.stat()
        wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted:
                pid = fields[4]
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                return f", pid {pid} ({name})"
    except (OSError, ValueError):
        pass
    return ""


@contextlib.contextmanager
def one_drill_per_host() -> Iterator[None]:
    """Hold this host's drill lock for the drill's lifetime. Scratch containers have
    fixed names (`drill-redis`…): a second drill would remove the first one's, so it
    is refused instead. The lock dies with its process: a killed drill frees it."""
    with open(HOST_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DrillBusy(
                f"another restore drill is running on this host (it holds {HOST_LOCK}"
                f"{flock_holder(HOST_LOCK)}): run this one when it has finished"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class LiveShape:
    """What a scratch container copies from the live one it stands in for."""

    image: str
    entrypoint: list[str]
    command: list[str]
    environment: dict[str, str]
    read_only_mounts: list[Mount]
    host_network: bool


def inspect_live(container: str, image: str | None = None) -> LiveShape:
    """The live container's image, start command, environment and read-only mounts
    (programs, scripts; never its data). `image` overrides the image."""
    hint = "Fix the container name, or give the image to use for the drill"
    attrs = get_container(container, hint).attrs
    config = attrs.get("Config") or {}
    mounts = [
        Mount(target=m["Destination"], source=m["Source"], type="bind", read_only=True)
        for m in attrs.get("Mounts") or []
        if m.get("Type") == "bind" and not m.get("RW", True)
    ]
    env = dict(pair.split("=", 1) for pair in config.get("Env") or [] if "=" in pair)
    return LiveShape(
        image=image or str(config.get("Image") or attrs.get("Image")),
        entrypoint=list(config.get("Entrypoint") or []),
        command=list(config.get("Cmd") or []),
        environment=env,
        read_only_mounts=mounts,
        host_network=(attrs.get("HostConfig") or {}).get("NetworkMode") == "host",
    )


def program_argv(live: LiveShape, program: str, flags: list[str]) -> tuple[list[str], list[str]]:
    """(entrypoint, command) that run `program` of the live image with our own `flags`:
    the live entrypoint when it is the program (prom/prometheus) or a wrapper
    (redis's docker-entrypoint.sh), the live program path when it names one."""
    argv = live.entrypoint + live.command
    at = next((i for i, arg in enumerate(argv) if os.path.basename(arg).startswith(program)), None)
    if at is None:
        return live.entrypoint, [program, *flags]
    if at < len(live.entrypoint):
        return live.entrypoint[: at + 1], flags
    return live.entrypoint, [*argv[len(live.entrypoint) : at + 1], *flags]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Scratch:
    """One drill's scratch environment: its folder and the containers it started."""

    folder: Path
    containers: list[str] = field(default_factory=list)

    def data_dir(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o777)  # the service may run as its own user
        return path


def new_scratch(scratch_root: Path, run_id: str) -> Scratch:
    """A fresh folder `<scratch_root>/drill-<run id>` for this drill's data."""
    folder = Path(scratch_root) / f"{SCRATCH_PREFIX}{run_id}"
    folder.mkdir(parents=True, exist_ok=False)
    return Scratch(folder)


def _network(host: bool) -> dict[str, Any]:
    if host:
        return {"network_mode": "host"}
    client = docker_client()
    try:
        client.networks.get(DRILL_NETWORK)
    except NotFound:
        client.networks.create(DRILL_NETWORK, labels={DRILL_LABEL: "network"})
    return {"network": DRILL_NETWORK}


def start_scratch(
    scratch: Scratch,
    name: str,
    live: LiveShape,
    entrypoint: list[str],
    command: list[str],
    port: int,
    mounts: list[Mount],
    environment: dict[str, str] | None = None,
) -> str:
    """Create and start scratch container `name` (an old one of that name is removed
    first) listening on `port`: host networking like the live one, else on the drill
    network with `port` published on 127.0.0.1 only. Returns its name."""
    client = docker_client()
    remove_container(name)
    ports = {} if live.host_network else {"ports": {f"{port}/tcp": ("127.0.0.1", port)}}
    try:
        container = client.containers.create(
            live.image,
            command=command,
            entrypoint=entrypoint or None,
            name=name,
            environment=environment if environment is not None else {},
            mounts=[*live.read_only_mounts, *mounts],
            labels={DRILL_LABEL: name, DRILL_DIR_LABEL: str(scratch.folder)},
            restart_policy={"Name": "no"},
            **_network(live.host_network),
            **ports,
        )
    except DockerException as error:
        raise ScratchError(f"could not create drill container {name!r}: {error}") from None
    scratch.containers.append(name)
    try:
        container.start()
    except DockerException as error:
        raise ScratchError(f"drill container {name!r} did not start: {error}") from None
    return name


def remove_container(name: str) -> bool:
    """Remove a container by name if it exists and is a drill container."""
    try:
        container = docker_client().containers.get(name)
    except NotFound:
        return False
    if DRILL_LABEL not in (container.labels or {}):
        raise ScratchError(
            f"a container named {name!r} exists and is not a drill container: rename it, "
            "or give the drill other container names"
        )
    with contextlib.suppress(NotFound):
        container.remove(force=True)
    return True


def _remove_folder(path: Path) -> bool:
    if not path.name.startswith(SCRATCH_PREFIX) or not path.is_dir():
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def tear_down(scratch: Scratch) -> list[str]:
    """Remove this drill's containers and folder; never raises (returns what is left)."""
    left = []
    for name in scratch.containers:
        try:
            remove_container(name)
        except (DockerException, ContainerError) as error:
            left.append(f"{name} ({error})")
    _remove_folder(scratch.folder)
    return left


def _drill_dir(attrs: dict[str, Any]) -> str | None:
    """The scratch folder a drill container, network or volume is labelled with."""
    labels = attrs.get("Labels") or (attrs.get("Config") or {}).get("Labels") or {}
    return labels.get(DRILL_DIR_LABEL)


def remove_leftovers(scratch_root: Path) -> list[str]:
    """Containers (and their scratch folders), networks and volumes of earlier drills
    that used `scratch_root`, found by label and removed; returns their names. Run at
    the start of every drill, under the lock on `scratch_root`: a drill with another
    scratch root may be running right now, and what it started is its own."""
    client = docker_client()
    root = Path(scratch_root).resolve()

    def ours(item: Any) -> bool:
        folder = _drill_dir(item.attrs)
        return bool(folder) and Path(str(folder)).resolve().is_relative_to(root)

    removed = []
    for container in client.containers.list(all=True, filters={"label": DRILL_LABEL}):
        if not ours(container):
            continue
        folder = str(_drill_dir(container.attrs))
        with contextlib.suppress(NotFound, APIError):
            container.remove(force=True)
            removed.append(container.name)
        if _remove_folder(Path(folder)):
            removed.append(folder)
    # a drill's compose project (tasks/drill/compose.py) also leaves its network and
    # volumes, labelled like its containers
    for kind in (client.networks, client.volumes):
        for item in kind.list(filters={"label": DRILL_LABEL}):
            if ours(item):
                with contextlib.suppress(NotFound, APIError):
                    item.remove()
                    removed.append(item.name)
    return removed
