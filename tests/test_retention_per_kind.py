"""Each kind's retention, through its own backup flow: Prometheus and logs keep 30 days,
config 90 (Redis: tests/test_retention.py). A slip in the per-kind wiring (config
pruned at Redis's 7 days, say) would delete backups an operator counts on.

Aged backups of the source are planted the way a flow writes them; the real flow then
backs up that source and prunes: the backup just past its kind's retention goes, the
one just inside stays."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from test_backup_config import write_project
from test_recover_prometheus import backfill
from throwaway_services import prometheus_container, redis_container

from flows.backup_config import backup_config
from flows.backup_logs import backup_logs
from flows.backup_prometheus import backup_prometheus
from tasks.common.clock import utc_now
from tasks.store.archive import manifest_name
from tasks.store.kinds import config_source_id, logs_source_id, prometheus_source_id
from tasks.store.local import backup_name, list_local


def plant(backup_dir: Path, kind: str, source_id: str, age: timedelta) -> str:
    """A complete backup of `source_id` made `age` ago (data, then its manifest)."""
    created = utc_now() - age
    name = backup_name(kind, created, "gzip", source_id)
    data = os.urandom(64)
    manifest = {
        "kind": kind,
        "name": name,
        "created_at": created.isoformat(),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "compression": "gzip",
        "raw_size": len(data),
        "duration_seconds": 0.1,
        "source_id": source_id,
    }
    path = backup_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.with_name(manifest_name(path.name)).write_text(json.dumps(manifest))
    return name


def planted_around(backup_dir: Path, kind: str, source_id: str, days: int) -> tuple[str, str]:
    """(a backup a day past `days`, one a day inside it)."""
    past = plant(backup_dir, kind, source_id, timedelta(days=days + 1))
    inside = plant(backup_dir, kind, source_id, timedelta(days=days - 1))
    return past, inside


def kept(backup_dir: Path, kind: str) -> set[str]:
    return {m.name for m in list_local(backup_dir, kind)}


def assert_pruned_at(
    backup_dir: Path, kind: str, result: dict[str, Any], old: tuple[str, str]
) -> None:
    past, inside = old
    assert kept(backup_dir, kind) == {inside, result["name"]}, f"{kind}: {past} should go"
    assert not (backup_dir / past).exists()


def test_prometheus_backups_are_kept_30_days(tmp_path: Path, backup_dir: Path) -> None:
    with prometheus_container(tmp_path, backfill) as service:
        old = planted_around(backup_dir, "prometheus", prometheus_source_id(service.url), 30)
        result = backup_prometheus(
            prometheus_url=service.url,
            container=service.name,
            fetch="container",
            backup_dir=str(backup_dir),
            s3_bucket="",
            keep_min=1,
        )
    assert_pruned_at(backup_dir, "prometheus", result, old)


def test_config_backups_are_kept_90_days(tmp_path: Path, backup_dir: Path) -> None:
    project = write_project(tmp_path / "project")
    old = planted_around(backup_dir, "config", config_source_id(project), 90)
    result = backup_config(
        project_dir=str(project),
        env_container="",
        backup_dir=str(backup_dir),
        s3_bucket="",
        keep_min=1,
    )
    assert_pruned_at(backup_dir, "config", result, old)


def test_log_backups_are_kept_30_days(tmp_path: Path, backup_dir: Path) -> None:
    with redis_container(tmp_path) as service:  # a container with a few log lines
        old = planted_around(backup_dir, "logs", logs_source_id([service.name]), 30)
        result = backup_logs(
            containers=[service.name], backup_dir=str(backup_dir), s3_bucket="", keep_min=1
        )
    assert_pruned_at(backup_dir, "logs", result, old)
