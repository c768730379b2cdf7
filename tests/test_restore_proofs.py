"""backup-status's "last verified restore" counts a restore only for the component and
the source it proved: a drill of the logs proves nothing about Redis, and a recovery
of one Redis nothing about another. With the real verify-restore and recover-redis
flows (the drill's host-wide lock keeps this module with the sandbox's group)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
from test_backup_status import fake_backup
from throwaway_services import Service, redis_container

from flows.backup_logs import backup_logs
from flows.backup_redis import backup_redis
from flows.backup_status import backup_status
from flows.recover_redis import recover_redis
from flows.verify_restore import verify_restore
from tasks.store.kinds import redis_source_id


def rows_of(backup_dir: Path) -> dict[tuple[str, str], dict[str, Any]]:
    rows = backup_status(backup_dir=str(backup_dir), s3_bucket="")
    return {(row["kind"], row["source"]): row for row in rows}


def proven_since(row: dict[str, Any], flow: str, since: datetime) -> bool:
    """The row's last verified restore is by `flow`, in the minute of `since` or later."""
    text = row["last verified restore"]
    if text == "never" or f" by {flow} " not in text:
        return False
    return datetime.strptime(text[:16], "%Y-%m-%d %H:%M").replace(tzinfo=UTC) >= since.replace(
        second=0, microsecond=0
    )


def test_a_drill_of_the_logs_marks_only_the_logs_verified(tmp_path: Path, backup_dir: Path) -> None:
    since = datetime.now(UTC)
    with redis_container(tmp_path) as service:  # a container with a few log lines
        logs = backup_logs(containers=[service.name], backup_dir=str(backup_dir), s3_bucket="")
    fake_backup(backup_dir, "redis", timedelta(hours=1), 100, "redis.proofs.test:6379")
    result = verify_restore(
        components=["logs"],
        logs_backup=logs["name"],
        backup_dir=str(backup_dir),
        s3_bucket="",
        scratch_dir=str(tmp_path / "scratch"),
    )
    assert result["ok"] and list(result["components"]) == ["logs"]
    rows = rows_of(backup_dir)
    assert proven_since(rows[("logs", service.name)], "verify-restore", since)
    assert rows[("redis", "redis.proofs.test:6379")]["last verified restore"] == "never"


def back_up(service: Service, backup_dir: Path) -> None:
    redis.Redis(port=service.port).set("session:1", service.name)
    backup_redis(
        redis_url=service.url,
        container=service.name,
        fetch="container",
        backup_dir=str(backup_dir),
        s3_bucket="",
    )


def test_a_recovery_of_one_redis_marks_only_that_server_verified(
    tmp_path: Path, backup_dir: Path
) -> None:
    since = datetime.now(UTC)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with redis_container(tmp_path / "a") as first, redis_container(tmp_path / "b") as second:
        back_up(first, backup_dir)
        back_up(second, backup_dir)
        result = recover_redis(
            container=first.name,
            redis_url=first.url,
            backup_dir=str(backup_dir),
            gateway_health_url="",
            s3_bucket="",
        )
        assert result["ok"]
        rows = rows_of(backup_dir)
        assert proven_since(rows[("redis", redis_source_id(first.url))], "recover-redis", since)
        assert not proven_since(
            rows[("redis", redis_source_id(second.url))], "recover-redis", since
        )
