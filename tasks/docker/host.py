"""Is this a new host the stack can be rebuilt on: Docker and compose answer, and
nothing listens yet where the restored services will."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from tasks.common.secrets import redact_url
from tasks.docker import containers
from tasks.docker.compose import compose_command


class PortTaken(RuntimeError):
    """Something already answers where a restored service must listen."""


def answers(url: str) -> bool:
    """Something accepts a TCP connection at the URL's host and port."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}[parts.scheme]
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
