"""Is this a new host the stack can be rebuilt on: Docker and compose answer, and
nothing listens yet where the restored services will."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import docker.errors

from tasks.common.secrets import redact_url
from tasks.docker import containers
from tasks.docker.compose import compose_command
from tasks.docker.project import Service
from tasks.docker.roles import runs


class PortTaken(RuntimeError):
    """Something already answers where a restored service must listen."""


def answers(url: str) -> bool:
    """Something accepts a TCP connection at the URL's host and port."""
    parts = urlsplit(url)
    defaults = {"http": 80, "https": 443, "redis": 6379, "rediss": 6379, "tcp": 0}
    port = parts.port or defaults[parts.scheme]
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=1):
            return True
    except OSError:
        return False


def check_new_host(urls: dict[str, str]) -> str:
    """Docker and compose answer, and nothing listens where the services will."""
    version = containers.docker_client().version().get("Version", "?")
    command = compose_command()
    compose = " ".join([Path(command[0]).name, *command[1:]])
    taken = [f"{what} ({redact_url(url)})" for what, url in urls.items() if answers(url)]
    if taken:
        raise PortTaken(
            f"something already answers at {', '.join(taken)}: this is not a fresh host, or "
            "the old stack still runs; stop it (or use recover-gateway / recover-redis) "
            "and run again (nothing was changed)"
        )
    return f"Docker {version}, {compose}; {', '.join(urls)} addresses free"


class ImagesMissing(RuntimeError):
    """Images the project runs are neither on this host nor reachable in a registry."""


def check_ports_free(services: dict[str, Service]) -> str:
    """No port a service publishes (or listens on with the host's network) is taken
    already: `up` would fail half-way on it."""
    ports = sorted({port for service in services.values() for port in runs(service).host_ports})
    taken = [port for port in ports if port and answers(f"tcp://127.0.0.1:{port}")]
    if taken:
        raise PortTaken(
            f"ports {', '.join(map(str, taken))} are taken on this host, and the project's "
            "services need them: stop what listens there and run again (nothing was changed)"
        )
    return f"ports {', '.join(map(str, ports)) or 'none'} free"


def check_images(services: dict[str, Service]) -> str:
    """Every image the project runs is on this host, or its registry answers for it
    (compose pulls it at `up`); ImagesMissing naming the others."""
    client = containers.docker_client()
    images = sorted({s.image for s in services.values() if s.image})
    missing = []
    for image in images:
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            try:
                client.images.get_registry_data(image)
            except docker.errors.APIError as error:
                missing.append(f"{image} ({getattr(error, 'explanation', None) or error})")
    if missing:
        raise ImagesMissing(
            f"images not on this host and not pullable: {'; '.join(missing)}: load them "
            "(docker load) or make their registry reachable, then run again"
        )
    return f"{len(images)} images available"
