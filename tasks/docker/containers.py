"""Docker containers through the Docker SDK: find them, read files out of them."""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import docker
import httpx
from docker.errors import DockerException, NotFound

from tasks.common.certificates import verified
from tasks.common.errors import one_line
from tasks.common.files import CHUNK


class ContainerError(RuntimeError):
    """A container is missing or Docker cannot be reached; says what to do."""


def docker_client() -> docker.DockerClient:
    """The local Docker engine (DOCKER_HOST or the default socket)."""
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as error:
        raise ContainerError(
            f"cannot reach the Docker engine ({error}): start dockerd or set DOCKER_HOST"
        ) from None
    return client


def get_container(
    name: str,
    hint: str = "Fix the container parameter (or leave it empty to use another fetch method)",
) -> Any:
    """A container by name, or a clear error listing what exists, ending with `hint`."""
    client = docker_client()
    try:
        return client.containers.get(name)
    except NotFound:
        # sparse: one list call, not one inspect per container (which timed out at
        # 120 s on a busy daemon with many containers)
        listed = client.containers.list(all=True, sparse=True)
        names = sorted(n.lstrip("/") for c in listed for n in c.attrs.get("Names", [])[:1])
        raise ContainerError(
            f"no container named {name!r}; existing containers: {', '.join(names) or 'none'}. "
            + hint
        ) from None


def container_exists(name: str) -> bool:
    try:
        docker_client().containers.get(name)
    except (NotFound, ContainerError):
        return False
    return True


class _ChunkStream(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the archive API's stream)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def stream_archive(container_name: str, path: str) -> Iterator[bytes]:
    """A file or folder inside a container as an uncompressed tar stream
    (Docker archive API), in chunks; member names start with the path's last part."""
    container = get_container(container_name)
    try:
        chunks, _stat = container.get_archive(path, chunk_size=CHUNK)
    except NotFound:
        raise ContainerError(f"{path} does not exist in container {container_name!r}") from None
    # docker-py's generator holds the HTTP response; a reader that stops early (disk
    # full, S3 down) must close it, or dockerd keeps the container locked for every
    # other API call (inspect, exec, stop) until the connection dies.
    response = chunks.gi_frame.f_locals.get("response") if chunks.gi_frame else None
    try:
        yield from chunks
    finally:
        chunks.close()
        if response is not None:
            response.close()


def stream_file(container_name: str, path: str) -> Iterator[bytes]:
    """The bytes of one regular file inside a container, streamed (Docker archive API)."""
    chunks = stream_archive(container_name, path)
    raw = io.BufferedReader(_ChunkStream(chunks), buffer_size=CHUNK)
    with contextlib.closing(chunks), tarfile.open(fileobj=raw, mode="r|") as archive:
        member = archive.next()
        if member is None or not member.isfile():
            raise ContainerError(f"{path} in container {container_name!r} is not a regular file")
        source = archive.extractfile(member)
        assert source is not None
        while chunk := source.read(CHUNK):
            yield chunk


def log_tail(container_name: str, lines: int = 50) -> list[str]:
    """The last lines a container logged (both streams)."""
    output = get_container(container_name).logs(tail=lines, stdout=True, stderr=True)
    return output.decode(errors="replace").splitlines()


# ------------------------------------------- recovery: stop, start, where data lives
# (used by recover-redis and recover-prometheus)


def container_running(name: str) -> bool:
    """True when the container exists and runs (restarting counts as not running)."""
    container = get_container(name, "Fix the container parameter")
    container.reload()
    return bool(container.status == "running")


def stop_container(name: str, timeout: int = 30) -> bool:
    """Stop a container gracefully (SIGTERM, SIGKILL after `timeout` s); True when it
    was running, i.e. when the caller must start it again."""
    container = get_container(name, "Fix the container parameter")
    container.reload()
    if container.status not in ("running", "restarting", "paused"):
        return False
    try:
        container.stop(timeout=timeout)
    except DockerException as error:
        raise ContainerError(f"could not stop container {name!r}: {error}") from None
    return True


def start_container(name: str) -> None:
    """Start a stopped container (a running one is left as it is)."""
    container = get_container(name, "Fix the container parameter")
    try:
        container.start()
    except DockerException as error:
        raise ContainerError(f"could not start container {name!r}: {error}") from None


def exit_reason(name: str) -> str | None:
    """None while the container runs, else its state, exit code and last log lines."""
    container = get_container(name, "Fix the container parameter")
    container.reload()
    if container.status in ("running", "created"):
        return None
    state = container.attrs.get("State", {})
    tail = " | ".join(log_tail(name, 5))
    return f"container {name!r} is {container.status} (exit code {state.get('ExitCode')}): {tail}"


def host_path(name: str, inner: str) -> Path | None:
    """The host path behind a path inside the container (its bind mount or volume),
    or None when that path is not on a mount (it lives in the container's own layer)."""
    container = get_container(name, "Fix the container parameter")
    target = PurePosixPath(inner)
    best: tuple[int, Path] | None = None
    for mount in container.attrs.get("Mounts", []):
        destination = PurePosixPath(mount.get("Destination", "/"))
        source = mount.get("Source")
        if not source or not target.is_relative_to(destination):
            continue
        depth = len(destination.parts)
        if best is None or depth > best[0]:
            best = (depth, Path(source) / target.relative_to(destination))
    return best[1] if best else None


def run_like(name: str, command: list[str], timeout: float = 60.0) -> str:
    """Run `command` once in a throwaway container made from `name`'s image and mounts
    (the same binaries, no network), and return its output. For facts a stopped
    container cannot answer, e.g. `redis-server --version`."""
    client = docker_client()
    original = get_container(name, "Fix the container parameter")
    throwaway = client.containers.create(
        original.image.id,
        command=command,
        entrypoint=[],
        volumes_from=[original.id],
        network_mode="none",
        labels={"proxilion-dr.throwaway": name},
    )
    try:
        throwaway.start()
        throwaway.wait(timeout=timeout)
        return str(throwaway.logs(stdout=True, stderr=True).decode(errors="replace"))
    except DockerException as error:
        raise ContainerError(f"could not run {command[0]} like {name!r}: {error}") from None
    finally:
        throwaway.remove(force=True)


class DataDirNotFound(FileNotFoundError):
    """The service's data directory cannot be found on this host."""


class ServiceDidNotStart(RuntimeError):
    """The container exited while the restored service was starting."""


def find_data_dir(container: str | None, inner_dir: str | None, override: str | None) -> Path:
    """The host folder holding a service's data: `override` when given, else the host
    side of the container's mount holding `inner_dir` (the service's own setting)."""
    if override:
        path = Path(override)
        if not path.is_dir():
            raise DataDirNotFound(
                f"data_dir {path} does not exist on this host: give the host folder that "
                "the container mounts as its data directory"
            )
        return path
    if not container or not inner_dir:
        raise DataDirNotFound(
            "the data directory is unknown (no container to inspect, or the service did not "
            "say where it keeps its data): set data_dir to the host folder holding it"
        )
    path = host_path(container, inner_dir)
    if path is None:
        raise DataDirNotFound(
            f"{inner_dir} in container {container!r} is not on a mount (it lives inside the "
            "container): mount it from the host, or set data_dir"
        )
    if not path.is_dir():
        raise DataDirNotFound(
            f"container {container!r} mounts {inner_dir} from {path}, which is not a folder on "
            "this host (Docker on another machine?): run the flow there or set data_dir"
        )
    return path


def wait_started(
    probe: Callable[[], str | None], container: str, timeout_seconds: float, what: str
) -> None:
    """Poll `probe` (None when ready, else why not) until the restored service is
    ready; fail at once when its container exits, else at the deadline."""
    deadline = time.monotonic() + timeout_seconds
    last: str | None = "not probed"
    while time.monotonic() < deadline:
        last = probe()
        if last is None:
            return
        reason = exit_reason(container)
        if reason:
            raise ServiceDidNotStart(f"{what} did not start: {reason}")
        time.sleep(0.1)
    raise TimeoutError(
        f"{what} not ready within {timeout_seconds:.0f} s ({last}): raise "
        "start_timeout_seconds or check its log"
    )


def wait_until_answers(url: str, container: str, timeout: float) -> str:
    """Wait until the gateway's /health answers at all: before Redis runs it answers
    503 `unhealthy` naming Redis, which proves the gateway itself is up."""
    answer: list[str] = []

    def probe() -> str | None:
        try:
            response = httpx.get(url, timeout=2, verify=verified())
            body = response.json()
        except (httpx.HTTPError, ValueError) as error:
            return one_line(error)
        answer.append(f"HTTP {response.status_code} {body}")
        return None

    wait_started(probe, container, timeout, f"the gateway at {url}")
    return answer[-1]


def _passwd(container: Any) -> list[list[str]]:
    """The image's /etc/passwd entries (read from the container, started or not)."""
    try:
        stream, _stat = container.get_archive("/etc/passwd")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as archive:
            member = archive.next()
            data = archive.extractfile(member) if member else None
            text = data.read().decode(errors="replace") if data else ""
    except (DockerException, tarfile.TarError):
        return []
    return [line.split(":") for line in text.splitlines() if line.count(":") >= 3]


def container_user(name: str) -> tuple[int, int] | None:
    """The uid and gid a container's processes run as (its `User`: numbers, or a name
    looked up in the image's /etc/passwd); None for root or when it cannot be told."""
    container = get_container(name)
    user = (container.attrs.get("Config") or {}).get("User") or ""
    who, _, group = user.partition(":")
    if who in ("", "root", "0"):
        return None
    entries = _passwd(container)
    entry = next((e for e in entries if who in (e[0], e[2])), None)
    uid = int(who) if who.isdigit() else int(entry[2]) if entry else None
    if uid is None:
        return None
    gid = int(group) if group.isdigit() else int(entry[3]) if entry else uid
    return uid, gid
