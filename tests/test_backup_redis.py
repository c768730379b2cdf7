"""backup-redis end to end on the real sandbox stack and on real redis-server processes."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import redis
from prefect_records import log_messages
from redis_servers import assert_same_keyspace, keyspace_snapshot, running_redis
from restoring import restore_redis_into

from flows.backup_redis import backup_redis
from sandbox import constants as stack
from sandbox.seed import url_for_db
from tasks.store.archive import sha256_file


def fill(url: str, sessions: int = 500) -> None:
    """Session-like data: JSON values with TTLs, counters, a hash, a zset, a big value."""
    client = redis.Redis.from_url(url)
    pipe = client.pipeline()
    for i in range(sessions):
        value = json.dumps({"session": i, "calls": [{"tool": "read_file", "risk": i % 9}] * 5})
        pipe.set(f"session:{i}", value, ex=3600 + i)
        pipe.set(f"ratelimit:{i}:1", i, px=900_000)
    pipe.hset("stats:daily", mapping={f"h{i}": i for i in range(100)})
    pipe.zadd("killchain:scores", {f"s{i}": i for i in range(100)})
    pipe.set("blob", b"\x00\xff" * 600_000)
    pipe.execute()
    redis.Redis.from_url(url, db=1).set("db1:key", "persisted")


def restore_and_compare(
    backup_dir: Path, name: str, source_url: str, tmp_path: Path, keys: str = ""
) -> None:
    """Put the backup into a fresh redis-server and compare every key with the source
    (only the keys starting with `keys`, when given)."""
    expected = keyspace_snapshot(source_url, match=keys + "*")
    target = tmp_path / "restored"
    target.mkdir()
    placed = restore_redis_into(backup_dir, name, target)
    assert placed.path == target / "dump.rdb"
    with running_redis(target) as restored:
        assert_same_keyspace(expected, keyspace_snapshot(restored, match=keys + "*"))


# The sandbox Redis is shared (the demo, other checkouts write to it at any time): the
# container test compares only keys of its own, written to a db the sandbox leaves empty.
OWN_DB = 9


@pytest.fixture
def own_keys(sandbox_redis: str) -> Iterator[str]:
    """Keys of every type, with and without TTLs, under a unique prefix in db OWN_DB of
    the sandbox Redis; deleted afterwards. Yields the prefix."""
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    client = redis.Redis.from_url(url_for_db(sandbox_redis, OWN_DB))
    pipe = client.pipeline()
    for i in range(300):
        value = json.dumps({"session": i, "calls": [{"tool": "read_file", "risk": i % 9}] * 5})
        pipe.set(f"{prefix}session:{i}", value, ex=3600 + i)
    pipe.hset(f"{prefix}stats", mapping={f"h{i}": i for i in range(100)})
    pipe.zadd(f"{prefix}scores", {f"s{i}": i for i in range(100)})
    pipe.rpush(f"{prefix}alerts", *[f"alert-{i}" for i in range(100)])
    pipe.sadd(f"{prefix}blocklist", "shell_exec", "raw_socket")
    pipe.xadd(f"{prefix}events", {"n": 1})
    pipe.set(f"{prefix}blob", b"\x00\xff" * 600_000)
    pipe.execute()
    try:
        yield prefix
    finally:
        client.delete(*client.scan_iter(match=f"{prefix}*", count=1000))
        client.close()


def flow_logs(text: str) -> list[str]:
    """Every log line the Prefect server holds that contains `text`."""
    return [message for message in log_messages() if text in message]


def test_container_backup_uploads_and_restores_key_for_key(
    sandbox_redis: str, own_keys: str, backup_dir: Path, s3_prefix: str, tmp_path: Path
) -> None:
    manifest = backup_redis(
        redis_url=sandbox_redis,
        container=stack.REDIS_CONTAINER,
        fetch="container",
        backup_dir=str(backup_dir),
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=s3_prefix,
        s3_endpoint_url=stack.S3_ENDPOINT,
    )
    stored = backup_dir / manifest["name"]
    assert manifest["name"].startswith("redis/dump_") and manifest["name"].endswith(".rdb.gz")
    assert stored.stat().st_size == manifest["size"]
    assert sha256_file(stored) == manifest["sha256"]
    assert manifest["source"]["rdb_version"] == 10 and manifest["source"]["fetch"] == "container"
    with gzip.open(stored) as raw:  # operators can gunzip it by hand
        assert raw.read(5) == b"REDIS"
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    key = f"{s3_prefix}/{manifest['name']}"
    assert s3.head_object(Bucket=stack.S3_BUCKET, Key=key)["ContentLength"] == manifest["size"]
    remote = json.loads(
        s3.get_object(Bucket=stack.S3_BUCKET, Key=key + ".manifest.json")["Body"].read()
    )
    assert remote["sha256"] == manifest["sha256"]
    assert manifest["source"]["keyspace"][f"db{OWN_DB}"]["keys"] >= 306
    restore_and_compare(backup_dir, "latest", sandbox_redis, tmp_path, keys=own_keys)


@pytest.mark.parametrize(
    ("fetch", "diskless"), [("path", "no"), ("network", "no"), ("network", "yes")]
)
def test_host_backup_round_trips(
    fetch: str, diskless: str, backup_dir: Path, tmp_path: Path
) -> None:
    with running_redis(
        tmp_path / "src", **{"repl-diskless-sync": diskless, "repl-diskless-sync-delay": "0"}
    ) as source:
        fill(source.url)
        manifest = backup_redis(
            redis_url=source.url,
            container="",
            fetch=fetch,
            data_dir=str(source.dir),
            backup_dir=str(backup_dir),
            s3_bucket="",
            compression="zstd",
        )
        assert manifest["name"].endswith(".rdb.zst")
        assert manifest["source"]["keyspace"]["db0"]["keys"] == 1003
        restore_and_compare(backup_dir, manifest["name"], source.url, tmp_path)
