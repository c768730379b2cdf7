"""The test helpers' own guarantees: a port taken between picking and binding is
retried with another, so parallel test runs do not fail each other at start-up."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis_servers
from redis_servers import FREE_PORT, running_redis
from test_redis_sync import make_certificates


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process (here: a listening socket) holds."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


@pytest.mark.parametrize("which", ["port", "tls-port"])
def test_a_port_taken_before_the_server_binds_it_is_retried(
    which: str, taken_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race (another process binds the port between free_port() and redis-server's
    # bind) cannot be timed on demand, so the first pick returns a port already taken.
    picks: list[int] = []
    pick = redis_servers.free_port

    def first_pick_taken() -> int:
        picks.append(pick() if picks else taken_port)
        return picks[-1]

    monkeypatch.setattr(redis_servers, "free_port", first_pick_taken)
    config: dict[str, Any] = {}
    if which == "tls-port":  # FREE_PORT options are picked before the main port
        ca, cert, key = make_certificates(tmp_path / "tls")
        config = {"tls-port": FREE_PORT, "tls-cert-file": cert, "tls-key-file": key}
        config |= {"tls-ca-cert-file": ca}
    with running_redis(tmp_path / "r", **config) as server:
        assert server.client().ping()
        used = server.options["tls-port"] if which == "tls-port" else server.port
    assert picks[0] == taken_port and used not in (taken_port, FREE_PORT)
