"""Restoring a stored backup into a folder the way every flow does it: find and verify
the backup once (`fetch_backup`), then the data source's one restore path."""

from __future__ import annotations

from pathlib import Path

from tasks.prometheus.restore import RestoredSnapshot, restore_blocks
from tasks.redis.restore import RestoredRdb, restore_rdb
from tasks.redis.setup import RedisSetup
from tasks.store.find import fetch_backup


def restore_redis_into(
    backup_dir: Path, name: str, data_dir: Path, setup: RedisSetup | None = None
) -> RestoredRdb:
    """The Redis backup `name` (or `latest`) of `backup_dir` into `data_dir`."""
    found = fetch_backup.fn(backup_dir, "redis", name, "", "", None)
    return restore_rdb.fn(found, data_dir, setup)


def restore_prometheus_into(backup_dir: Path, name: str, data_dir: Path) -> RestoredSnapshot:
    """The Prometheus backup `name` (or `latest`) of `backup_dir` into `data_dir`."""
    found = fetch_backup.fn(backup_dir, "prometheus", name, "", "", None)
    return restore_blocks.fn(found, data_dir)
