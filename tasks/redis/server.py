"""Talking to one Redis: a client with explicit timeouts, errors that name the server
(never its password) and the fix, and the facts a backup records about it."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from tasks.common.redis_url import parse_redis_url
from tasks.common.retry import TransientError, retrying_task
from tasks.common.secrets import redact_url

COMMAND_TIMEOUT = 30.0


class RedisAccessError(PermissionError):
    """Redis refused our credentials."""


class RedisUnreachable(TransientError):
    """Redis did not answer; it may be restarting."""


def connect(redis_url: str, timeout: float = COMMAND_TIMEOUT) -> redis.Redis:
    """A client with explicit timeouts (redis-py's 5 s default is too short for admin work)."""
    return parse_redis_url(redis_url).client(timeout, decode_responses=True)


def explain(error: redis.RedisError, redis_url: str) -> Exception:
    """Turn a redis-py error into one that names the server (without secrets) and the fix."""
    where = redact_url(redis_url)
    if (
        isinstance(error, redis.AuthenticationError)
        or "WRONGPASS" in str(error)
        or ("NOAUTH" in str(error))
    ):
        return RedisAccessError(
            f"Redis at {where} refused the credentials: check the password or ACL user "
            "in redis_url (or PROXILION_DR_REDIS_URL)"
        )
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        reason = str(error).replace(redis_url, where)
        return RedisUnreachable(
            f"cannot reach Redis at {where} ({reason}): is it running? check redis_url"
        )
    return error


@dataclass
class ServerFacts:
    """What a backup records about the server it came from."""

    redis_version: str
    role: str
    keyspace: dict[str, dict[str, int]]
    rdb_dir: str | None
    rdb_filename: str | None
    aof_enabled: bool
    run_id: str = ""  # unique per server process: proves a route reaches this server
    tcp_port: int = 0  # the port it listens on, as the server itself sees it


@retrying_task(1, 5)
def inspect_redis(redis_url: str) -> ServerFacts:
    """Version, role, key counts and where the RDB lives."""
    client = connect(redis_url)
    try:
        info = client.info("everything")
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    try:
        config = client.config_get("dir")
        config.update(client.config_get("dbfilename"))
    except redis.ResponseError:
        config = {}  # CONFIG may be renamed or forbidden; data_dir must then be given
    keyspace = {
        name: {"keys": int(value["keys"]), "expires": int(value["expires"])}
        for name, value in info.items()
        if name.startswith("db") and isinstance(value, dict)
    }
    return ServerFacts(
        redis_version=str(info["redis_version"]),
        role=str(info.get("role", "master")),
        keyspace=keyspace,
        rdb_dir=config.get("dir"),
        rdb_filename=config.get("dbfilename"),
        aof_enabled=bool(int(info.get("aof_enabled", 0))),
        run_id=str(info.get("run_id", "")),
        tcp_port=int(info.get("tcp_port", 0)),
    )
