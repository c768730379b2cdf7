"""Naming, manifests-last listing and retention of the local backup directory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tasks.archive import Manifest, manifest_name
from tasks.storage import (
    BackupNotFound,
    backup_name,
    find_local,
    list_local,
    plan_retention,
    resolve_name,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def manifest(age: timedelta, kind: str = "redis") -> Manifest:
    created = NOW - age
    return Manifest(
        kind=kind,
        name=backup_name(kind, created, "gzip"),
        created_at=created.isoformat(),
        size=1,
        sha256="0" * 64,
        compression="gzip",
        raw_size=1,
        duration_seconds=0.1,
    )


def names(items: list[Manifest]) -> set[str]:
    return {m.name for m in items}


def test_names_keep_the_seed_shape_in_utc() -> None:
    local = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).astimezone()
    assert backup_name("redis", local, "gzip") == "redis/dump_20260102_030405.rdb.gz"
    assert backup_name("logs", local, "zstd") == "logs/gateway_20260102_030405.log.zst"


def test_retention_deletes_old_but_keeps_keep_min_and_newest() -> None:
    ages = [timedelta(days=d) for d in (0.1, 1, 8, 9, 10, 30)]
    backups = [manifest(a) for a in ages]
    plan = plan_retention(backups, NOW, retention_days=7, keep_min=3)
    assert names(plan.keep) == names(backups[:3])
    assert names(plan.delete) == names(backups[3:])


def test_retention_never_deletes_the_newest_even_when_all_are_old() -> None:
    backups = [manifest(timedelta(days=d)) for d in (40, 50, 60)]
    plan = plan_retention(backups, NOW, retention_days=7, keep_min=1)
    assert names(plan.keep) == {backups[0].name}
    assert len(plan.delete) == 2


def test_future_dated_backups_are_reported_not_counted() -> None:
    future = manifest(-timedelta(days=3))
    old = [manifest(timedelta(days=d)) for d in (20, 21)]
    plan = plan_retention([future, *old], NOW, retention_days=7, keep_min=1)
    assert names(plan.future) == {future.name}
    assert names(plan.keep) == {old[0].name}  # the newest real one, not the future one
    assert names(plan.delete) == {old[1].name}


@pytest.mark.parametrize(("days", "keep"), [(-1, 3), (7, 0)])
def test_retention_refuses_bad_settings(days: float, keep: int) -> None:
    with pytest.raises(ValueError, match="retention_days|keep_min"):
        plan_retention([], NOW, days, keep)


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
