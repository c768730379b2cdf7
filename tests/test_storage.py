"""Naming, manifests-last listing and retention of the local backup directory."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tasks.store.archive import Manifest, manifest_name
from tasks.store.kinds import (
    logs_source_id,
    prometheus_source_id,
    redis_source_id,
    source_of,
    source_tag,
)
from tasks.store.local import (
    BackupNotFound,
    Retention,
    backup_name,
    find_local,
    list_local,
    plan_retention,
    remove_stale_partials,
    resolve_name,
    staging_path,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SOURCE = "redis.internal:6379"


def manifest(age: timedelta, kind: str = "redis", source_id: str = SOURCE) -> Manifest:
    created = NOW - age
    return Manifest(
        kind=kind,
        name=backup_name(kind, created, "gzip", source_id),
        created_at=created.isoformat(),
        size=1,
        sha256="0" * 64,
        compression="gzip",
        raw_size=1,
        duration_seconds=0.1,
        source_id=source_id,
    )


def names(items: list[Manifest]) -> set[str]:
    return {m.name for m in items}


def test_names_keep_the_seed_shape_in_utc_with_a_source_tag() -> None:
    local = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).astimezone()
    tag = source_tag(SOURCE)
    assert backup_name("redis", local, "gzip", SOURCE) == f"redis/dump_20260102_030405_{tag}.rdb.gz"
    assert backup_name("logs", local, "zstd", "gw") == (
        f"logs/gateway_20260102_030405_{source_tag('gw')}.log.zst"
    )
    assert re.fullmatch("[0-9a-f]{8}", tag)
    assert backup_name("redis", local, "gzip", "other:6379") != backup_name(
        "redis", local, "gzip", SOURCE
    )


@pytest.mark.parametrize(
    ("url", "identity"),
    [
        ("redis://:s3cret@Redis.Internal:6380/2", "redis.internal:6380"),
        ("rediss://user:pa%2Fss@10.0.0.5", "10.0.0.5:6379"),
        ("redis://***@localhost:6379/0", "localhost:6379"),  # as older manifests recorded it
        ("unix://:s3cret@/run/redis.sock?db=1", "unix:/run/redis.sock"),
    ],
)
def test_redis_identity_is_host_and_port_without_credentials(url: str, identity: str) -> None:
    assert redis_source_id(url) == identity


def test_prometheus_identity_drops_credentials_and_trailing_slash() -> None:
    assert prometheus_source_id("http://admin:s3cret@Prom:9090/") == "http://prom:9090"
    assert prometheus_source_id("https://prom.example/sub/") == "https://prom.example/sub"


@pytest.mark.parametrize("url", ["redis://:hunter#2@host:6379/0", "http://:pa?ss@prom:x/"])
def test_unparsable_urls_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ValueError, match="cannot be (used|parsed)") as refused:
        (redis_source_id if url.startswith("redis") else prometheus_source_id)(url)
    assert "hunter" not in str(refused.value) and "pa?ss" not in str(refused.value)


def test_logs_identity_is_the_set_of_containers() -> None:
    assert logs_source_id(["b", "a", "b"]) == logs_source_id(["a", "b"]) == "a,b"


@pytest.mark.parametrize(
    ("kind", "source", "identity"),
    [
        ("redis", {"server": "redis://***@10.0.0.5:6379/0"}, "10.0.0.5:6379"),
        ("prometheus", {"server": "http://prom:9090"}, "http://prom:9090"),
        ("config", {"project_dir": "/opt/proxilion"}, "/opt/proxilion"),
        ("logs", {"container": "proxilion-gateway,redis"}, "proxilion-gateway,redis"),
        ("redis", {}, ""),
    ],
)
def test_older_manifests_get_their_identity_from_their_source_facts(
    kind: str, source: dict, identity: str
) -> None:
    old = Manifest.from_json(json.dumps(asdict(manifest(DAY, kind)) | {"source": source}))
    old.source_id = ""  # as written before source_id existed
    assert source_of(old) == identity


def test_retention_is_counted_per_source() -> None:
    ours = [manifest(d * DAY) for d in (1, 10)]
    theirs = [manifest(d * DAY, source_id="other:6379") for d in (9, 30)]
    unknown = manifest(40 * DAY, source_id="")  # an old manifest that does not say
    plan = plan_retention([*ours, *theirs, unknown], NOW, Retention(7, 1), SOURCE)
    assert names(plan.keep) == {ours[0].name} and names(plan.delete) == {ours[1].name}
    assert plan.other_sources == 3


def test_only_our_stale_staging_files_are_removed(tmp_path: Path) -> None:
    old = (NOW - 2 * DAY).timestamp()
    ours = staging_path(tmp_path, backup_name("redis", NOW, "zstd", SOURCE))
    young = staging_path(tmp_path, backup_name("redis", NOW, "gzip", SOURCE))
    others = [tmp_path / "redis" / n for n in (".x.partial", ".dump_1.rdb.gz.abcdef12.partial")]
    ours.parent.mkdir()
    for path in (ours, young, *others):
        path.write_bytes(b"x")
        if path != young:
            os.utime(path, (old, old))
    os.utime(young, (NOW.timestamp() - 3600,) * 2)  # an hour old: may still be written
    assert remove_stale_partials(tmp_path / "redis", "redis", NOW) == [ours.name]
    assert young.exists() and all(path.exists() for path in others)


def test_retention_deletes_old_but_keeps_keep_min_and_newest() -> None:
    ages = [timedelta(days=d) for d in (0.1, 1, 8, 9, 10, 30)]
    backups = [manifest(a) for a in ages]
    plan = plan_retention(backups, NOW, Retention(7, 3), SOURCE)
    assert names(plan.keep) == names(backups[:3])
    assert names(plan.delete) == names(backups[3:])


def test_retention_never_deletes_the_newest_even_when_all_are_old() -> None:
    backups = [manifest(timedelta(days=d)) for d in (40, 50, 60)]
    plan = plan_retention(backups, NOW, Retention(7, 1), SOURCE)
    assert names(plan.keep) == {backups[0].name}
    assert len(plan.delete) == 2


def test_future_dated_backups_are_reported_not_counted() -> None:
    future = manifest(-timedelta(days=3))
    old = [manifest(timedelta(days=d)) for d in (20, 21)]
    plan = plan_retention([future, *old], NOW, Retention(7, 1), SOURCE)
    assert names(plan.future) == {future.name}
    assert names(plan.keep) == {old[0].name}  # the newest real one, not the future one
    assert names(plan.delete) == {old[1].name}


@pytest.mark.parametrize(("days", "keep"), [(-1, 3), (7, 0)])
def test_retention_refuses_bad_settings(days: float, keep: int) -> None:
    with pytest.raises(ValueError, match="retention_days|keep_min"):
        Retention(days, keep)


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "redis/../../x", " "])
def test_names_cannot_escape_the_backup_dir(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="backup name"):
        resolve_name(tmp_path, name)


def test_a_backup_without_manifest_is_never_listed(tmp_path: Path) -> None:
    complete, incomplete = manifest(timedelta(days=1)), manifest(timedelta(hours=1))
    for item in (complete, incomplete):
        (tmp_path / item.name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / item.name).write_bytes(b"x")
    (tmp_path / manifest_name(complete.name)).write_text(complete.to_json())
    assert names(list_local(tmp_path, "redis")) == {complete.name}
    assert find_local(tmp_path, "redis", "latest")[0].name == complete.name
    with pytest.raises(BackupNotFound, match="incomplete"):
        find_local(tmp_path, "redis", incomplete.name)
