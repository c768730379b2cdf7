"""A keyed sample of a Redis snapshot: key, type and a digest of the value, never the value.

Recorded in the manifest at backup time, it lets a restore prove that values came back,
not only key counts. The server is live while we sample, so a key is kept only when
its digest read before the save equals the one read after it: an unchanged key has
that same value in the snapshot taken in between.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from typing import Any

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.log import run_logger
from tasks.common.secrets import redact_urls

SAMPLE_SIZE = 32
# Keys whose TTL ends this soon after the sample was taken are left out: they may be
# gone by the time anyone restores the backup.
MIN_TTL_MS = 60_000

Sample = list[dict[str, Any]]


def open_clients(
    redis_url: str, dbs: Iterable[int], timeout: float = 30.0
) -> dict[int, redis.Redis]:
    """Binary-safe clients for `dbs` of the server at `redis_url` (same credentials,
    TLS or unix socket as the URL says)."""
    pool = redis.ConnectionPool.from_url(
        redis_url, socket_timeout=timeout, socket_connect_timeout=5
    )
    return {
        db: redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **{**pool.connection_kwargs, "db": db}
            )
        )
        for db in dbs
    }


def _canonical(kind: str, value: Any) -> bytes:
    """One byte form per value, independent of the server's encoding and order."""
    if kind == "string":
        return value
    if kind == "hash":
        return b"\0".join(k + b"=" + v for k, v in sorted(value.items()))
    if kind == "list":
        return b"\0".join(value)
    if kind == "set":
        return b"\0".join(sorted(value))
    if kind == "zset":
        return b"\0".join(m + b"=" + repr(s).encode() for m, s in value)
    if kind == "stream":
        return b"\0".join(
            i + b":" + b",".join(k + b"=" + v for k, v in sorted(f.items())) for i, f in value
        )
    raise ValueError(f"no digest for Redis type {kind!r}")


def value_digest(client: redis.Redis, key: bytes) -> tuple[str, str] | None:
    """(type, sha256 of the canonical value) of one key; None if it is gone or of a
    type we do not digest (module types)."""
    kind = client.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    readers = {
        "string": lambda: client.get(key),
        "hash": lambda: client.hgetall(key),
        "list": lambda: client.lrange(key, 0, -1),
        "set": lambda: client.smembers(key),
        "zset": lambda: client.zrange(key, 0, -1, withscores=True),
        "stream": lambda: client.xrange(key),
    }
    if kind not in readers:
        return None
    value = readers[kind]()
    if value is None:
        return None
    return kind, hashlib.sha256(kind.encode() + b"\0" + _canonical(kind, value)).hexdigest()


def _key_text(key: bytes) -> dict[str, str]:
    try:
        return {"key": key.decode("utf-8")}
    except UnicodeDecodeError:
        return {"key_hex": key.hex()}


def _key_bytes(entry: dict[str, Any]) -> bytes:
    return entry["key"].encode() if "key" in entry else bytes.fromhex(entry["key_hex"])


def pick_sample(clients: dict[int, redis.Redis], size: int = SAMPLE_SIZE) -> Sample:
    """Random keys spread over the dbs that hold keys, with their digests (read before
    the save)."""
    populated = [db for db, client in sorted(clients.items()) if client.dbsize()]
    sample: Sample = []
    seen: set[tuple[int, bytes]] = set()
    for attempt in range(size * 3):
        if len(sample) >= size or not populated:
            break
        db = populated[attempt % len(populated)]
        client = clients[db]
        key = client.randomkey()
        if key is None or (db, key) in seen:
            continue
        seen.add((db, key))
        ttl = client.pttl(key)
        if 0 <= ttl < MIN_TTL_MS:
            continue
        digest = value_digest(client, key)
        if digest is None:
            continue
        expires = client.pexpiretime(key)
        sample.append(
            {
                "db": db,
                **_key_text(key),
                "type": digest[0],
                "sha256": digest[1],
                "expires_at_ms": expires if expires > 0 else None,
            }
        )
    return sample


def confirm_sample(clients: dict[int, redis.Redis], sample: Sample) -> Sample:
    """The entries whose value is still the same after the save (so in the snapshot)."""
    return [
        entry
        for entry in sample
        if value_digest(clients[entry["db"]], _key_bytes(entry)) == (entry["type"], entry["sha256"])
    ]


def check_sample(
    clients: dict[int, redis.Redis], sample: Sample, now_ms: int | None = None
) -> list[str]:
    """Compare a restored server with a recorded sample; returns one line per mismatch.

    A sampled key whose recorded expiry has passed may be missing (Redis drops expired
    keys on load); any other missing key, other type or other digest is a mismatch."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    problems: list[str] = []
    for entry in sample:
        name = entry.get("key", entry.get("key_hex"))
        expired = entry.get("expires_at_ms") is not None and entry["expires_at_ms"] <= now_ms
        client = clients.get(entry["db"])
        found = value_digest(client, _key_bytes(entry)) if client is not None else None
        if found is None:
            if not expired:
                problems.append(f"db{entry['db']} key {name!r} is missing")
        elif found[0] != entry["type"]:
            problems.append(f"db{entry['db']} key {name!r} is a {found[0]}, was a {entry['type']}")
        elif found[1] != entry["sha256"]:
            problems.append(f"db{entry['db']} key {name!r} has a different value")
    return problems


def _dbs(keyspace: dict[str, Any]) -> list[int]:
    return sorted(int(name.removeprefix("db")) for name in keyspace if name.startswith("db"))


@task(cache_policy=NO_CACHE)
def sample_before_save(redis_url: str, keyspace: dict[str, Any]) -> Sample:
    """`pick_sample` of the live server's populated dbs, read just before the save (or,
    for the network route, before the replication stream makes its snapshot). A
    server that cannot be read gives no sample (a warning), never a failed backup."""
    try:
        return pick_sample(open_clients(redis_url, _dbs(keyspace)))
    except redis.RedisError as error:
        run_logger().warning("no keyed sample for this backup: %s", redact_urls(str(error))[0])
        return []


@task(cache_policy=NO_CACHE)
def sample_after_save(redis_url: str, sample: Sample) -> Sample:
    """`confirm_sample` after the snapshot: only keys unchanged across it are kept."""
    if not sample:
        return []
    try:
        return confirm_sample(open_clients(redis_url, sorted({e["db"] for e in sample})), sample)
    except redis.RedisError as error:
        run_logger().warning("no keyed sample for this backup: %s", redact_urls(str(error))[0])
        return []
