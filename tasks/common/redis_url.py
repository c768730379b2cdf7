"""Redis connection URLs, parsed once and the way redis-py parses them.

Every consumer (redis-py clients, the replication-stream fetch, lock names,
manifests) reads the same `RedisTarget`, so a percent-encoded password means the
same thing everywhere and `unix://` never silently becomes 127.0.0.1:6379. A URL
whose credentials do not parse unambiguously is refused before anything connects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis
from redis.connection import parse_url

from tasks.common.secrets import AmbiguousUrl, check_url, redact_url

SCHEMES = ("redis", "rediss", "unix")
URL_FORMS = (
    "redis://[user:password@]host:port/db, rediss:// for TLS, or "
    "unix://[user:password@]/path/to/redis.sock?db=N"
)


class BadRedisUrl(ValueError):
    """The Redis URL cannot be used; the message names the fix, never the credentials."""


class AmbiguousRedisUrl(BadRedisUrl, AmbiguousUrl):
    """A Redis URL whose password holds an unencoded `#`, `/`, `?` or `@`."""


@dataclass(frozen=True)
class RedisTarget:
    """One Redis server as a URL names it: where it is, and redis-py's connection kwargs."""

    scheme: str
    host: str | None
    port: int | None
    socket_path: str | None
    db: int
    where: str
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @property
    def server(self) -> str:
        """The server without credentials or db: `host:port` or the socket path (one
        BGSAVE covers every db, so locks are per server)."""
        return self.socket_path or f"{self.host}:{self.port}"

    def client(self, timeout: float, **options: Any) -> redis.Redis:
        """A redis-py client for this server with the given command timeout."""
        kwargs = {"socket_timeout": timeout, "socket_connect_timeout": 5} | options
        return redis.Redis(connection_pool=redis.ConnectionPool(**(kwargs | self.options)))


def parse_redis_url(url: str) -> RedisTarget:
    """Parse `url` with redis-py's own parser; refuse what it would misread."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise BadRedisUrl(f"redis_url must start with redis://, rediss:// or unix://: {URL_FORMS}")
    try:
        check_url(url, "redis_url")
    except AmbiguousUrl as error:
        raise AmbiguousRedisUrl(str(error)) from None
    try:
        options = parse_url(url)
    except ValueError as error:
        raise BadRedisUrl(
            f"redis_url {redact_url(url)} is not a Redis URL ({error}): use {URL_FORMS}"
        ) from None
    socket_path = options.get("path") if scheme == "unix" else None
    if scheme == "unix" and not socket_path:
        raise BadRedisUrl(f"redis_url {redact_url(url)} names no socket path: use {URL_FORMS}")
    host = None if socket_path else str(options.get("host", "localhost"))
    port = None if socket_path else int(options.get("port", 6379))
    db = int(options.get("db", 0))
    username, password = options.get("username"), options.get("password")
    login = "***@" if username or password else ""
    shown_host = f"[{host}]" if host and ":" in host else host
    where = (
        f"unix://{login}{socket_path}?db={db}"
        if socket_path
        else f"{scheme}://{login}{shown_host}:{port}/{db}"
    )
    return RedisTarget(scheme, host, port, socket_path, db, where, username, password, options)
