"""Proving a restored Redis holds the backup (`prove_redis`: the checks recover-redis,
recover-host and the drill run), and that it will keep it (`check_persistence`) and
serves the gateway again (`check_gateway`)."""

from __future__ import annotations

from typing import Any

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.checks import Check
from tasks.common.errors import one_line
from tasks.common.http_health import (
    HEALTHY,
    wait_until_healthy,
)
from tasks.common.log import run_logger
from tasks.common.secrets import redact_url
from tasks.redis.sample import check_sample, open_clients
from tasks.redis.server import connect, explain
from tasks.redis.setup import RedisSetup
from tasks.store.archive import Manifest


class RestoreNotVerified(RuntimeError):
    """Redis runs, but does not hold what the backup holds."""


@task(cache_policy=NO_CACHE)
def verify_keyspace(
    redis_url: str, expected: dict[str, dict[str, int]], load: dict[str, Any]
) -> str:
    """Key counts per db against the backup's manifest. Keys with a TTL may have expired
    since the backup (Redis drops them on load: `rdb_last_load_keys_expired`), so a db
    may hold fewer keys, but never fewer than its keys without TTL."""
    client = connect(redis_url)
    try:
        actual = {
            name: int(v["keys"])
            for name, v in client.info("keyspace").items()
            if isinstance(v, dict)
        }
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    problems, lines = [], []
    for db, facts in sorted(expected.items()):
        have, want, expiring = actual.get(db, 0), facts["keys"], facts.get("expires", 0)
        lines.append(f"{db} {have}/{want}")
        if have < want - expiring:
            problems.append(f"{db} holds {have} keys, the backup {want} ({expiring} with a TTL)")
    expired = load.get("rdb_last_load_keys_expired", 0)
    summary = f"keys per db restored/backup: {', '.join(lines) or 'none'}"
    summary += f"; expired on load {expired}"
    if problems:
        raise RestoreNotVerified(f"restored Redis is missing keys: {'; '.join(problems)}")
    run_logger().info(summary)
    return summary


def check_keyed_sample(redis_url: str, sample: list[dict[str, Any]]) -> str:
    """The manifest's keyed sample (key, type, value digest) against the restored
    server; a sampled key past its recorded expiry may be gone."""
    problems = check_sample(open_clients(redis_url, sorted({e["db"] for e in sample})), sample)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RestoreNotVerified(
            f"{len(problems)} of {len(sample)} sampled keys differ: "
            + "; ".join(problems[:3])
            + more
        )
    return f"{len(sample)} keys: type and value digest match"


def prove_redis(redis_url: str, manifest: Manifest, load: dict[str, Any]) -> list[Check]:
    """The checks that prove the Redis at `redis_url`, just loaded (`load`: INFO
    persistence and stats after loading), holds the backup `manifest` describes."""
    expected = manifest.source.get("keyspace", {})
    checks = [Check("key counts per db", lambda: verify_keyspace.fn(redis_url, expected, load))]
    sample = manifest.source.get("sample") or []
    if sample:
        checks.append(Check("keyed sample", lambda: check_keyed_sample(redis_url, sample)))
    else:
        checks.append(
            Check("keyed sample", lambda: "not checked: the backup records no sample (older)")
        )
    return checks


@task(cache_policy=NO_CACHE)
def check_persistence(redis_url: str, setup: RedisSetup) -> str:
    """AOF as it was before the restore, its last write ok, no rewrite still running:
    a restart now keeps the restored data."""
    client = connect(redis_url)
    try:
        appendonly = client.config_get("appendonly").get("appendonly")
        info = client.info("persistence")
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    wanted = "yes" if setup.aof_enabled else "no"
    if appendonly != wanted:
        raise RestoreNotVerified(f"appendonly is {appendonly!r} after the restore, was {wanted!r}")
    if setup.aof_enabled and info.get("aof_last_write_status") != "ok":
        raise RestoreNotVerified(f"Redis cannot write its AOF: {info.get('aof_last_write_status')}")
    return f"appendonly {wanted}" + (" (restored RDB is the AOF base)" if setup.aof_enabled else "")


@task(cache_policy=NO_CACHE)
def check_gateway(health_url: str, timeout_seconds: float) -> str:
    """The gateway (which keeps its sessions in this Redis) answers healthy again."""
    wait = wait_until_healthy(health_url, timeout_seconds, HEALTHY)
    if not wait.healthy:
        raise RestoreNotVerified(f"gateway at {redact_url(health_url)}: {wait.summary()}")
    return f"{redact_url(health_url)} {wait.summary()}"


def ping(url: str) -> str:
    client = connect(url)
    try:
        return "PONG" if client.ping() else "no PONG"
    except redis.RedisError as error:
        raise ConnectionError(f"Redis at {redact_url(url)}: {one_line(error)}") from None
    finally:
        client.close()
