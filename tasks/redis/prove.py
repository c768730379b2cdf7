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
from tasks.redis.aof import MARKER_KEY
from tasks.redis.sample import check_sample, open_clients
from tasks.redis.server import connect, explain
from tasks.redis.setup import RedisSetup
from tasks.store.archive import Manifest


class RestoreNotVerified(RuntimeError):
    """Redis runs, but does not hold what the backup holds."""


# A process started this long before the restore started it cannot be the one
# restored (INFO's uptime has a resolution of one second).
START_SLACK_SECONDS = 2.0


def _keyspace(redis_url: str) -> dict[str, int]:
    client = connect(redis_url)
    try:
        return {
            name: int(v["keys"])
            for name, v in client.info("keyspace").items()
            if isinstance(v, dict)
        }
    except redis.RedisError as error:
        raise explain(error, redis_url) from None


def _stats(redis_url: str) -> dict[str, Any]:
    client = connect(redis_url)
    try:
        return {**client.info("persistence"), **client.info("stats")}
    except redis.RedisError as error:
        raise explain(error, redis_url) from None


def _process_start(load: dict[str, Any]) -> float:
    """When the Redis process that answered `load` started (Unix time, ±1 s)."""
    return int(load["server_time_usec"]) / 1e6 - int(load["uptime_in_seconds"])


def check_started_after(load: dict[str, Any], since: float) -> None:
    """The Redis that answered `load` started after `since`, when the restore started
    it: not another data dir's, not an old process."""
    started = _process_start(load)
    if started < since - START_SLACK_SECONDS:
        raise RestoreNotVerified(
            f"the Redis answering has run since {started:.0f}, before this restore started "
            f"it ({since:.0f}): it is not the one restored (another server at redis_url?)"
        )


def load_counts(load: dict[str, Any]) -> tuple[int, int]:
    """(keys loaded, keys dropped as already expired) by the last RDB or AOF-base load."""
    return int(load["rdb_last_load_keys_loaded"]), int(load.get("rdb_last_load_keys_expired", 0))


def reports_loads(load: dict[str, Any]) -> bool:
    """Redis 7.0+ says how many keys its last RDB or AOF-base load read and dropped."""
    return "rdb_last_load_keys_loaded" in load


def check_what_was_loaded(
    manifest: Manifest, load: dict[str, Any], since: float, file_keys: int | None = None
) -> str:
    """Redis's own count of the keys it read when it started (`rdb_last_load_keys_loaded`
    plus `rdb_last_load_keys_expired`, dropped as already expired) equals the backup's
    key count, and that process started after `since`, when the restore started it: the
    Redis answering is the one that loaded this backup, not another data dir or an old
    process. `file_keys`: the keys redis-check-rdb read in the placed RDB, when it ran;
    it proves the count when the manifest's is not exact (`keyspace_exact` empty: read
    around the snapshot, not at it)."""
    want = sum(int(db["keys"]) for db in (manifest.source.get("keyspace") or {}).values())
    exact = manifest.source.get("keyspace_exact", "recorded before this field existed")
    check_started_after(load, since)
    if not reports_loads(load):
        return (
            f"Redis {load.get('redis_version', '?')} does not report what it loaded (7.0+): "
            "WEAKER CHECK, only the key counts per db below"
        )
    loaded, expired = load_counts(load)
    if file_keys is not None and loaded + expired != file_keys:
        raise RestoreNotVerified(
            f"Redis loaded {loaded} keys and dropped {expired} expired ones ({loaded + expired} "
            f"in all), redis-check-rdb read {file_keys} in the RDB placed for it: it did not "
            "load that file (does its data dir differ from data_dir?)"
        )
    if not exact:
        if file_keys is None:
            return (
                f"Redis loaded {loaded} keys + {expired} expired on load; the backup's "
                f"{want} were counted around its snapshot, not at it: WEAKER CHECK "
                "(redis-check-rdb did not count the file)"
            )
        return (
            f"Redis loaded {loaded} keys + {expired} expired on load = the {file_keys} keys "
            f"redis-check-rdb read in the backup's RDB (the manifest's {want} were counted "
            "around the snapshot, not at it)"
        )
    if loaded + expired != want:
        raise RestoreNotVerified(
            f"Redis loaded {loaded} keys and dropped {expired} expired ones ({loaded + expired} "
            f"in all), the backup holds {want}: it did not load this backup (does its data "
            "dir differ from data_dir?)"
        )
    counted = "" if file_keys is None else f" (redis-check-rdb read {file_keys} in the file)"
    return f"Redis loaded {loaded} keys + {expired} expired on load = the backup's {want}{counted}"


def count_slack(manifest: Manifest, file_keys: int | None) -> int | None:
    """How far the manifest's per-db counts may be from the RDB's: 0 when exact, the
    difference from redis-check-rdb's count of the file when not, None when unknown."""
    if manifest.source.get("keyspace_exact", "older"):
        return 0
    if file_keys is None:
        return None
    want = sum(int(db["keys"]) for db in (manifest.source.get("keyspace") or {}).values())
    return abs(file_keys - want)


def verify_keyspace(
    redis_url: str,
    expected: dict[str, dict[str, int]],
    load: dict[str, Any],
    slack: int | None = 0,
) -> str:
    """Key counts per db against the backup's manifest. Exact while nothing was written
    since the load: every db holds at most its backup's keys, no other db has keys, and
    the keys missing are exactly those that expired (on load or since). After writes
    (the gateway is back), each db may hold up to that many more; with `slack` (the
    manifest's counts were read around the snapshot), that many more again. Redis < 7
    reports no load counts, and `slack` None says the manifest's counts are not exact
    and nothing says by how much: a db then holds at least its keys without a TTL."""
    actual = _keyspace(redis_url)
    now = _stats(redis_url)
    writes = int(now.get("rdb_changes_since_last_save", 0))
    if int(now.get("rdb_last_save_time", 0)) > _process_start(load) + 1:
        writes = max(writes, 1)  # a save since the load reset the count: it proves nothing
    gone = int(load.get("rdb_last_load_keys_expired", 0)) + int(now.get("expired_keys", 0))
    gone += int(now.get("evicted_keys", 0))
    lines = [f"{db} {actual.get(db, 0)}/{facts['keys']}" for db, facts in sorted(expected.items())]
    summary = f"keys per db restored/backup: {', '.join(lines) or 'none'}"
    problems = []
    if not reports_loads(load):
        for db, facts in sorted(expected.items()):
            have, want, expiring = actual.get(db, 0), facts["keys"], facts.get("expires", 0)
            if have < want - expiring:
                problems.append(
                    f"{db} holds {have} keys, the backup {want} ({expiring} with a TTL)"
                )
        summary += "; WEAKER CHECK (Redis < 7): at least the keys without a TTL"
    elif slack is None:
        summary += (
            "; NOT COMPARED: the backup's counts were read around its snapshot and "
            "redis-check-rdb did not count the file"
        )
    else:
        extra = {db: n for db, n in actual.items() if db not in expected and n > writes + slack}
        problems += [f"{db} holds {n} keys the backup does not have" for db, n in extra.items()]
        for db, facts in sorted(expected.items()):
            have, want = actual.get(db, 0), facts["keys"]
            if have > want + writes + slack:
                problems.append(f"{db} holds {have} keys, the backup {want}")
        missing = sum(f["keys"] for f in expected.values()) - sum(
            actual.get(db, 0) for db in expected
        )
        if slack:
            summary += f"; the backup's counts were read around its snapshot: within {slack}"
        elif writes == 0 and missing != gone:
            problems.append(f"{missing} keys are missing but only {gone} expired")
        if writes:
            summary += f"; {writes} writes since the load: counts compared within {writes}"
        elif not slack:
            summary += f"; {gone} expired (on load or since), none written: exact"
    if problems:
        raise RestoreNotVerified(f"restored Redis differs from the backup: {'; '.join(problems)}")
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


def prove_redis(
    redis_url: str,
    manifest: Manifest,
    load: dict[str, Any],
    since: float,
    file_keys: int | None = None,
) -> list[Check]:
    """The checks that prove the Redis at `redis_url`, started at `since` (time.time())
    and just loaded (`load`: INFO server, persistence and stats after loading), holds
    the backup `manifest` describes (`file_keys`: redis-check-rdb's count of the RDB
    placed, when it ran)."""
    expected = manifest.source.get("keyspace", {})
    slack = count_slack(manifest, file_keys)
    checks = [
        Check("what Redis loaded", lambda: check_what_was_loaded(manifest, load, since, file_keys)),
        Check("key counts per db", lambda: verify_keyspace(redis_url, expected, load, slack)),
    ]
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
    return f"appendonly {wanted}" + (
        " (a restart loads what was restored)" if setup.aof_enabled else ""
    )


@task(cache_policy=NO_CACHE)
def check_gateway(health_url: str, timeout_seconds: float) -> str:
    """The gateway (which keeps its sessions in this Redis) answers healthy again."""
    wait = wait_until_healthy(health_url, timeout_seconds, HEALTHY)
    if not wait.healthy:
        raise RestoreNotVerified(f"gateway at {redact_url(health_url)}: {wait.summary()}")
    return f"{redact_url(health_url)} {wait.summary()}"


def connections_received(redis_url: str) -> int:
    """Connections this Redis accepted since it started, the one asking included
    (INFO stats `total_connections_received`): who else connected meanwhile."""
    client = connect(redis_url)
    try:
        return int(client.info("stats")["total_connections_received"])
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    finally:
        client.close()


def ping(url: str) -> str:
    client = connect(url)
    try:
        return "PONG" if client.ping() else "no PONG"
    except redis.RedisError as error:
        raise ConnectionError(f"Redis at {redact_url(url)}: {one_line(error)}") from None
    finally:
        client.close()


def check_aof_load(
    load: dict[str, Any], since: float, base_keys: int | None, chain_size: int
) -> str:
    """Redis, started after `since`, loaded the restored AOF: its base's keys (loaded +
    expired on load = the keys redis-check-aof read in the base) and every byte of the
    cut chain (`aof_current_size` right after the load = the chain's size)."""
    check_started_after(load, since)
    parts = []
    if base_keys is not None and reports_loads(load):
        loaded, expired = load_counts(load)
        if loaded + expired != base_keys:
            raise RestoreNotVerified(
                f"Redis loaded {loaded} keys (+{expired} expired) from its AOF base, the restored "
                f"base holds {base_keys}: it did not load this AOF (data_dir?)"
            )
        parts.append(f"base: {loaded} keys + {expired} expired on load = the base's {base_keys}")
    size = int(load.get("aof_current_size", -1))
    if size < chain_size:
        raise RestoreNotVerified(
            f"Redis reports an AOF of {size} bytes after loading, the restored chain has "
            f"{chain_size}: it did not load all of it"
        )
    extra = f" (+{size - chain_size} written since the load)" if size > chain_size else ""
    parts.append(f"AOF: {size} bytes = every byte of the cut chain{extra}")
    return "; ".join(parts)


def check_markers(redis_url: str, before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    """The marker keys backup-redis-aof wrote (fields of `MARKER_KEY`): each written
    before the cut holds its nonce, each first written after it is absent. Proves
    where the chain was cut, by keys written at known times."""
    expected: dict[tuple[int, str], str | None] = {}
    for event in before:
        expected[(event["db"], event["field"])] = None if event.get("deleted") else event["nonce"]
    later = {(e["db"], e["field"]) for e in after if not e.get("deleted")} - expected.keys()
    if not expected and not later:
        return "no marker in this generation: NOT checked (WEAKER: the chain holds none)"
    dbs = sorted({db for db, _ in expected.keys() | later})
    actual: dict[int, dict[str, str]] = {}
    for db, client in open_clients(redis_url, dbs).items():
        try:
            raw = client.hgetall(MARKER_KEY)
        except redis.RedisError as error:
            raise explain(error, redis_url) from None
        actual[db] = {k.decode(): v.decode() for k, v in raw.items()}
    wrong = [
        f"{field} ({'missing' if nonce else 'present'})"
        for (db, field), nonce in expected.items()
        if actual[db].get(field) != nonce
    ]
    wrong += [
        f"{field} (written after the cut, present)" for db, field in later if field in actual[db]
    ]
    if wrong:
        listed = ", ".join(wrong[:5])
        raise RestoreNotVerified(f"marker keys differ from the restore point: {listed}")
    present = [f for f, n in expected.items() if n]
    newest = max((int(f) for _, f in present), default=None)
    text = f"{len(present)} markers written up to the cut present"
    text += f" (newest written at {newest})" if newest else ""
    text += f", {len(later)} written after it absent"
    if not later:
        text += " (WEAKER: none was written after the cut)"
    return text


def keyspace_now(redis_url: str) -> str:
    """Key counts per db after a point-in-time restore: not known in advance, so shown
    and not compared."""
    counts = _keyspace(redis_url)
    shown = ", ".join(f"{db} {n}" for db, n in sorted(counts.items())) or "none"
    return f"{shown}: a point in time has no recorded count, NOT compared (WEAKER CHECK)"


def prove_aof(
    redis_url: str,
    load: dict[str, Any],
    since: float,
    base_keys: int | None,
    chain_size: int,
    markers: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> list[Check]:
    """The checks that prove the Redis at `redis_url` loaded a restored AOF chain and
    that the chain was cut where asked (`markers`: the generation's marker events
    before and after the cut)."""
    return [
        Check("what Redis loaded", lambda: check_aof_load(load, since, base_keys, chain_size)),
        Check("marker keys at the restore point", lambda: check_markers(redis_url, *markers)),
        Check("key counts per db", lambda: keyspace_now(redis_url)),
    ]
