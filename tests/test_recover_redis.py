"""recover-redis on real Redis 7 in throwaway containers: every key, value and TTL comes
back (also under `appendonly yes`, and after one more restart), bad input is refused
before Redis is touched, the backup may live only in S3, a dry run changes nothing."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from mounts import mounted_tmpfs
from prefect.client.orchestration import get_client
from redis_servers import (
    RedisServer,
    assert_same_keyspace,
    keyspace_snapshot,
    seed_mixed_data,
    start_from_rdb,
)
from throwaway_services import Service, gateway_healthy_when, redis_container, redis_ready, restart

from flows.backup_redis import backup_redis
from flows.recover_redis import recover_redis
from flows.support.failures import StepFailed
from sandbox import constants as stack
from tasks.common.files import write_durably
from tasks.store.archive import CompressedWriter, Manifest, manifest_name, open_decompressed
from tasks.store.s3 import object_key


def seed(service: Service) -> None:
    """Every core type, TTLs, a >1 MiB value, two dbs (tests/redis_servers.py)."""
    seed_mixed_data(RedisServer(service.port, service.url, service.data_dir, None), 1200)  # type: ignore[arg-type]


def back_up(service: Service, backup_dir: Path, **storage: Any) -> Manifest:
    """The real backup-redis flow, through the container (BGSAVE, archive API)."""
    storage.setdefault("s3_bucket", "")
    return Manifest(
        **backup_redis(
            redis_url=service.url,
            container=service.name,
            fetch="container",
            backup_dir=str(backup_dir),
            **storage,
        )
    )


def recover(service: Service, backup_dir: Path, **parameters: Any) -> dict[str, Any]:
    defaults = {
        "container": service.name,
        "redis_url": service.url,
        "backup_dir": str(backup_dir),
        "gateway_health_url": "",
        "s3_bucket": "",
    }
    return recover_redis(**(defaults | parameters))


def flushall(service: Service) -> None:
    redis.Redis(port=service.port).flushall()


def data_files(service: Service) -> dict[str, tuple[int, int]]:
    """Every file under the data dir as relative path -> (size, mtime_ns)."""
    return {
        str(p.relative_to(service.data_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(service.data_dir.rglob("*"))
        if p.is_file()
    }


def started_at(service: Service) -> str:
    return str(service.container().attrs["State"]["StartedAt"])


def assert_untouched(service: Service, before: dict[str, Any]) -> None:
    """Redis never stopped, same keys, same files: the failed or dry run changed nothing."""
    assert started_at(service) == before["started"]
    assert data_files(service) == before["files"]
    assert_same_keyspace(before["keys"], keyspace_snapshot(service.url))


def state(service: Service) -> dict[str, Any]:
    return {
        "started": started_at(service),
        "files": data_files(service),
        "keys": keyspace_snapshot(service.url),
    }


def report(key: str) -> str:
    """The newest markdown report artifact published under `key`."""
    with get_client(sync_client=True) as client:
        [artifact] = [a for a in client.read_latest_artifacts() if a.key == key]
    return str(artifact.data)


def step(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in result["steps"] if s["name"] == name)


# ------------------------------------------------------------------------- recoveries


def test_flushall_then_recover_brings_every_key_value_and_ttl_back(
    tmp_path: Path, backup_dir: Path
) -> None:
    healthy = threading.Event()
    healthy.set()
    with redis_container(tmp_path) as service, gateway_healthy_when(healthy) as health:
        seed(service)
        manifest = back_up(service, backup_dir)
        expected = keyspace_snapshot(service.url)
        flushall(service)
        redis.Redis(port=service.port).set("written-after-the-loss", "x")
        result = recover(service, backup_dir, gateway_health_url=health)
        assert_same_keyspace(expected, keyspace_snapshot(service.url))
        assert result["ok"] and result["backup"]["name"] == manifest.name
        assert step(result, "check the gateway")["outcome"] == "ok"
        assert result["rto_seconds"] > 0 and result["rpo_seconds"] >= 0
        [aside] = result["moved_aside"]
        # the data that was there (saved by Redis when it was stopped) is kept, loadable
        with start_from_rdb(Path(aside) / "dump.rdb", tmp_path / "old") as old:
            assert old.client().get("written-after-the-loss") == b"x"
        published = report("recover-redis")
        assert "# recover-redis: OK" in published and f"`{manifest.name}`" in published
        assert "RTO measured" in published and "RPO" in published and aside in published
        assert step(result, "key counts per db")["outcome"] == "ok"


def test_recover_with_appendonly_yes_loads_the_backup_and_keeps_it_after_a_restart(
    tmp_path: Path, backup_dir: Path
) -> None:
    with redis_container(tmp_path, appendonly=True) as service:
        seed(service)
        back_up(service, backup_dir)
        expected = keyspace_snapshot(service.url)
        flushall(service)
        result = recover(service, backup_dir)
        assert_same_keyspace(expected, keyspace_snapshot(service.url))
        assert "appendonlydir" in os.listdir(result["moved_aside"][0])
        assert redis.Redis(port=service.port).config_get("appendonly") == {"appendonly": "yes"}
        restart(service, redis_ready)
        assert_same_keyspace(expected, keyspace_snapshot(service.url))


def test_redis_that_no_longer_starts_on_a_corrupt_aof_is_recovered(
    tmp_path: Path, backup_dir: Path
) -> None:
    """Redis exits at start on a broken AOF manifest: the setup is read from the stopped
    container (binary version, config file through its mount) and the restore brings
    it back."""
    with redis_container(tmp_path, appendonly=True) as service:
        seed(service)
        back_up(service, backup_dir)
        expected = keyspace_snapshot(service.url)
        container = service.container()
        container.stop()
        (service.data_dir / "appendonlydir" / "appendonly.aof.manifest").write_text("garbage\n")
        container.start()
        assert container.wait(timeout=30)["StatusCode"] != 0  # Redis refuses to start
        result = recover(service, backup_dir)
        assert_same_keyspace(expected, keyspace_snapshot(service.url))
        assert "not running" in step(result, "inspect Redis")["detail"]
        restart(service, redis_ready)
        assert_same_keyspace(expected, keyspace_snapshot(service.url))


def test_backup_only_in_s3_is_downloaded_verified_and_restored(
    tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    s3 = {
        "s3_bucket": stack.S3_BUCKET,
        "s3_prefix": s3_prefix,
        "s3_endpoint_url": stack.S3_ENDPOINT,
    }
    with redis_container(tmp_path) as service:
        seed(service)
        manifest = back_up(service, backup_dir, **s3)
        expected = keyspace_snapshot(service.url)
        fresh = tmp_path / "new-host-backups"  # the host that held backup_dir is gone
        flushall(service)
        result = recover(service, fresh, **s3)
        assert_same_keyspace(expected, keyspace_snapshot(service.url))
        assert result["backup"]["from"].startswith(f"s3://{stack.S3_BUCKET}/{s3_prefix}/")
        assert (fresh / manifest.name).read_bytes() == (backup_dir / manifest.name).read_bytes()
        assert (fresh / manifest_name(manifest.name)).is_file()


def test_dry_run_checks_everything_and_changes_nothing(tmp_path: Path, backup_dir: Path) -> None:
    with redis_container(tmp_path) as service:
        seed(service)
        back_up(service, backup_dir)
        flushall(service)
        redis.Redis(port=service.port).set("current", "data")
        before = state(service)
        result = recover(service, backup_dir, dry_run=True)
        assert_untouched(service, before)
        assert result["dry_run"] and result["ok"] and result["moved_aside"] == []
        outcomes = {s["name"]: s["outcome"] for s in result["steps"]}
        assert outcomes["validate the RDB (dry run)"] == "ok"
        assert outcomes["stop Redis"] == "planned"


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path, Manifest]]:
    """One throwaway Redis with data and one good backup, shared by the refusals."""
    tmp = tmp_path_factory.mktemp("refusals")
    backups = tmp / "backups"
    with redis_container(tmp) as service:
        seed(service)
        yield service, backups, back_up(service, backups)


def add_backup(backup_dir: Path, good: Manifest, name: str, rdb: bytes, source_id: str = "") -> str:
    """A stored backup holding `rdb`, with an honest manifest (size and sha256 match)."""
    writer = CompressedWriter(backup_dir / name, "gzip")
    writer.write(rdb)
    stored = writer.close()
    manifest = Manifest.describe(
        "redis", name, stored, 0.0, source=good.source, source_id=source_id or good.source_id
    )
    write_durably(backup_dir / manifest_name(name), manifest.to_json().encode())
    return name


def refused(service: Service, backup_dir: Path, match: str, **parameters: Any) -> str:
    before = state(service)
    with pytest.raises(StepFailed, match=match) as failure:
        recover(service, backup_dir, **parameters)
    assert_untouched(service, before)
    return str(failure.value)


def test_corrupt_backup_is_refused_before_redis_is_touched(
    live: tuple[Service, Path, Manifest], tmp_path: Path
) -> None:
    service, backups, good = live
    corrupt = tmp_path / "backups"
    (corrupt / "redis").mkdir(parents=True)
    data = bytearray((backups / good.name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (corrupt / good.name).write_bytes(bytes(data))
    (corrupt / manifest_name(good.name)).write_text(good.to_json())
    message = refused(service, corrupt, "fails its checksum", backup=good.name)
    assert "find and verify the backup" in message


def test_rdb_newer_than_the_server_is_refused(
    live: tuple[Service, Path, Manifest], tmp_path: Path
) -> None:
    """Redis 7.0 here loads RDB 10 at most. No newer Redis is installed to write a real
    RDB 12, so the header of a real backup is rewritten (the one fake in this file)."""
    service, backups, good = live
    with open_decompressed(backups / good.name, "gzip") as stream:
        rdb = stream.read()
    assert rdb[:9] == b"REDIS0010"
    newer = tmp_path / "backups"
    (newer / "redis").mkdir(parents=True)
    name = add_backup(newer, good, "redis/dump_20260101_000000.rdb.gz", b"REDIS0012" + rdb[9:])
    message = refused(service, newer, "RDB version 12", backup=name)
    assert "loads RDB 10 at most" in message


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ({"backup": "redis/dump_19990101_000000.rdb.gz"}, "no redis backup named"),
        ({"backup": "../../etc/passwd"}, "not a redis backup name"),
        ({"backup": "prometheus/prometheus_20260101_000000.tar.gz"}, "not a redis backup name"),
        ({"backup": "redis/../../x.rdb.gz"}, "not a redis backup name"),
        ({"data_dir": "/nonexistent/redis-data"}, "does not exist on this host"),
        ({"container": "proxilion-dr-no-such-container"}, "no container named"),
    ],
    ids=["unknown-name", "dotdot", "other-folder", "dotdot-inside", "no-data-dir", "no-container"],
)
def test_bad_input_is_refused_clearly_and_nothing_changes(
    live: tuple[Service, Path, Manifest], parameters: dict[str, Any], match: str
) -> None:
    service, backups, _good = live
    refused(service, backups, match, **parameters)


def test_latest_with_no_backup_anywhere_is_refused(
    live: tuple[Service, Path, Manifest], tmp_path: Path, s3_prefix: str
) -> None:
    service, _backups, _good = live
    message = refused(
        service,
        tmp_path / "empty",
        "no complete redis backup",
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=s3_prefix,
        s3_endpoint_url=stack.S3_ENDPOINT,
    )
    assert f"s3://{stack.S3_BUCKET}/{s3_prefix}/redis/" in message


def test_latest_never_picks_another_servers_backup(
    live: tuple[Service, Path, Manifest], tmp_path: Path
) -> None:
    service, backups, good = live
    with open_decompressed(backups / good.name, "gzip") as stream:
        rdb = stream.read()
    shared = tmp_path / "shared-backups"
    (shared / "redis").mkdir(parents=True)
    add_backup(shared, good, "redis/dump_20260101_000000_0badc0de.rdb.gz", rdb, "10.0.0.9:6379")
    message = refused(service, shared, "backups of other servers exist")
    assert "10.0.0.9:6379" in message and "give its name as backup" in message


def test_truncated_s3_object_is_refused_by_its_checksum(
    live: tuple[Service, Path, Manifest], tmp_path: Path, s3_prefix: str
) -> None:
    service, backups, good = live
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    key = object_key(s3_prefix, good.name)
    s3.put_object(Bucket=stack.S3_BUCKET, Key=key, Body=(backups / good.name).read_bytes()[:-100])
    s3.put_object(Bucket=stack.S3_BUCKET, Key=manifest_name(key), Body=good.to_json().encode())
    fresh = tmp_path / "fresh"
    refused(
        service,
        fresh,
        "truncated or corrupt",
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=s3_prefix,
        s3_endpoint_url=stack.S3_ENDPOINT,
    )
    assert not (fresh / good.name).exists() and not (fresh / manifest_name(good.name)).exists()


def test_not_enough_disk_is_refused(live: tuple[Service, Path, Manifest], tmp_path: Path) -> None:
    """The data dir given is a real 64 KiB tmpfs: too small for the restore."""
    service, backups, _good = live
    with mounted_tmpfs(tmp_path / "small", "size=64k") as small:
        refused(service, backups, "not enough disk", data_dir=str(small))


def test_a_failure_after_the_data_was_moved_puts_it_back_and_starts_redis(
    live: tuple[Service, Path, Manifest], tmp_path: Path
) -> None:
    """The backup is intact, but its manifest promises keys the RDB does not hold (a
    mismatched manifest): verification fails after Redis was restarted on it."""
    service, backups, good = live
    with open_decompressed(backups / good.name, "gzip") as stream:
        rdb = stream.read()
    lying = tmp_path / "backups"
    (lying / "redis").mkdir(parents=True)
    source = dict(good.source, keyspace={"db0": {"keys": 10**6, "expires": 0}})
    name = add_backup(lying, Manifest(**{**vars(good), "source": source}), good.name, rdb)
    before = keyspace_snapshot(service.url)
    with pytest.raises(StepFailed, match="step 'what Redis loaded' failed: .*holds 1000000"):
        recover(service, lying, backup=name)
    assert service.container().status == "running" and redis_ready(service)
    assert_same_keyspace(before, keyspace_snapshot(service.url))
    kept = [p.name for p in service.data_dir.iterdir()]
    assert not [n for n in kept if ".before-restore-" in n], "old data not put back"
    assert [n for n in kept if n.startswith("failed-restore-")], "failed restore not kept"
