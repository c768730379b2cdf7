"""Docker containers through the Docker SDK: find them, read files out of them."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import Any

import docker
from docker.errors import DockerException, NotFound

from tasks.archive import CHUNK


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
        # The raw listing: `containers.list()` inspects every container, one request each.
        listed = client.api.containers(all=True)
        names = sorted(n.lstrip("/") for c in listed for n in c.get("Names", [])[:1])
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
    yield from chunks


def stream_file(container_name: str, path: str) -> Iterator[bytes]:
    """The bytes of one regular file inside a container, streamed (Docker archive API)."""
    raw = io.BufferedReader(_ChunkStream(stream_archive(container_name, path)), buffer_size=CHUNK)
    with tarfile.open(fileobj=raw, mode="r|") as archive:
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
