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


READERS = {  # how each type's whole value is read, in a pipeline
    "string": lambda pipe, key: pipe.get(key),
    "hash": lambda pipe, key: pipe.hgetall(key),
    "list": lambda pipe, key: pipe.lrange(key, 0, -1),
    "set": lambda pipe, key: pipe.smembers(key),
    "zset": lambda pipe, key: pipe.zrange(key, 0, -1, withscores=True),
    "stream": lambda pipe, key: pipe.xrange(key),
}


def value_digests(client: redis.Redis, keys: list[bytes]) -> list[tuple[str, str] | None]:
    """(type, sha256 of the canonical value) of each key, None where it is gone or of a
    type we do not digest (module types): two round trips for all of them."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    kinds = [k.decode() if isinstance(k, bytes) else str(k) for k in pipe.execute()]
    readable = [(key, kind) for key, kind in zip(keys, kinds, strict=True) if kind in READERS]
    for key, kind in readable:
        READERS[kind](pipe, key)
    values = dict(zip((key for key, _ in readable), pipe.execute(), strict=True))
    digests: list[tuple[str, str] | None] = []
    for key, kind in zip(keys, kinds, strict=True):
        value = values.get(key) if kind in READERS else None
        if value is None:
            digests.append(None)
        else:
            canonical = kind.encode() + b"\0" + _canonical(kind, value)
            digests.append((kind, hashlib.sha256(canonical).hexdigest()))
    return digests


def _key_text(key: bytes) -> dict[str, str]:
    try:
        return {"key": key.decode("utf-8")}
    except UnicodeDecodeError:
        return {"key_hex": key.hex()}


def _key_bytes(entry: dict[str, Any]) -> bytes:
    return entry["key"].encode() if "key" in entry else bytes.fromhex(entry["key_hex"])


def pick_sample(clients: dict[int, redis.Redis], size: int = SAMPLE_SIZE) -> Sample:
    """Random keys spread over the dbs that hold keys, with their digests (read before
    the save); a few round trips per db, whatever the size."""
    populated = [db for db, client in sorted(clients.items()) if client.dbsize()]
    sample: Sample = []
    for position, db in enumerate(populated):
        client = clients[db]
        share = -(-(size - len(sample)) // (len(populated) - position))  # what is left, spread
        pipe = client.pipeline(transaction=False)
        for _ in range(share * 3):  # some repeat, some expire soon: draw more than needed
            pipe.randomkey()
        keys = list(dict.fromkeys(k for k in pipe.execute() if k is not None))
        for key in keys:
            pipe.pttl(key)
            pipe.pexpiretime(key)
        timings = pipe.execute()
        lasting = [
            (key, expires)
            for key, ttl, expires in zip(keys, timings[::2], timings[1::2], strict=True)
            if not 0 <= ttl < MIN_TTL_MS
        ]
        digests = value_digests(client, [key for key, _ in lasting])
        for (key, expires), digest in zip(lasting, digests, strict=True):
            if digest is None or len(sample) >= size or sum(e["db"] == db for e in sample) >= share:
                continue
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
    now = _found(clients, sample)
    return [e for e, d in zip(sample, now, strict=True) if d == (e["type"], e["sha256"])]


def _found(clients: dict[int, redis.Redis], sample: Sample) -> list[tuple[str, str] | None]:
    """Each sampled key's (type, digest) now, in the sample's order (None: missing)."""
    found: dict[int, tuple[str, str] | None] = {}
    for db in sorted({e["db"] for e in sample}):
        positions = [i for i, e in enumerate(sample) if e["db"] == db]
        client = clients.get(db)
        digests = (
            value_digests(client, [_key_bytes(sample[i]) for i in positions])
            if client is not None
            else [None] * len(positions)
        )
        found.update(zip(positions, digests, strict=True))
    return [found[i] for i in range(len(sample))]


def check_sample(
    clients: dict[int, redis.Redis], sample: Sample, now_ms: int | None = None
) -> list[str]:
    """Compare a restored server with a recorded sample; returns one line per mismatch.

    A sampled key whose recorded expiry has passed may be missing (Redis drops expired
    keys on load); any other missing key, other type or other digest is a mismatch."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    problems: list[str] = []
    for entry, found in zip(sample, _found(clients, sample), strict=True):
        name = entry.get("key", entry.get("key_hex"))
        expired = entry.get("expires_at_ms") is not None and entry["expires_at_ms"] <= now_ms
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
