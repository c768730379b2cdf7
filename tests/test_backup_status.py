"""backup-status: the table an operator opens first, on backups of known ages (fresh,
late, missing) locally and in an S3 prefix that lacks one of them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.flow_engine import run_flow
from redis_servers import free_port

from deployments.notifications import replace_automation, status_automation
from flows.backup_redis import backup_redis
from flows.backup_status import ARTIFACT_KEY, backup_status
from sandbox import constants as stack
from tasks.store.archive import Manifest, manifest_name
from tasks.store.local import backup_name
from tasks.store.s3 import object_key
from tasks.store.status import Copies, status_rows


def fake_backup(backup_dir: Path, kind: str, age: timedelta, size: int, source_id: str) -> Manifest:
    """A complete local backup (data + manifest) created `age` ago."""
    created = datetime.now(UTC) - age
    name = backup_name(kind, created, "gzip", source_id)
    path = backup_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    manifest = Manifest(
        kind=kind,
        name=name,
        created_at=created.isoformat(),
        size=size,
        sha256="0" * 64,
        compression="gzip",
        raw_size=size,
        duration_seconds=1.0,
        source_id=source_id,
    )
    path.with_name(manifest_name(path.name)).write_text(manifest.to_json())
    return manifest


def upload(manifest: Manifest, backup_dir: Path, prefix: str) -> None:
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    data = (backup_dir / manifest.name).read_bytes()
    s3.put_object(Bucket=stack.S3_BUCKET, Key=object_key(prefix, manifest.name), Body=data)
    s3.put_object(
        Bucket=stack.S3_BUCKET,
        Key=object_key(prefix, manifest_name(manifest.name)),
        Body=manifest.to_json().encode(),
    )


def by_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["kind"]: row for row in rows}


def status_artifact_of(flow_run_id: uuid.UUID) -> list[dict[str, Any]]:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[ARTIFACT_KEY]))
        )
    mine = [a for a in artifacts if a.flow_run_id == flow_run_id]
    assert mine, f"no {ARTIFACT_KEY} artifact in flow run {flow_run_id}"
    data = mine[0].data
    return data if isinstance(data, list) else json.loads(data)


def test_status_table_shows_fresh_late_missing_here_and_in_s3(
    backup_dir: Path, s3_prefix: str
) -> None:
    redis_old = fake_backup(backup_dir, "redis", timedelta(hours=7), 1000, "redis.test:6379")
    redis_new = fake_backup(backup_dir, "redis", timedelta(hours=1), 1100, "redis.test:6379")
    prometheus = fake_backup(
        backup_dir, "prometheus", timedelta(days=3), 5000, "http://prom.test:9090"
    )
    fake_backup(backup_dir, "logs", timedelta(hours=2), 300, "proxilion-gateway")
    for manifest in (redis_old, redis_new, prometheus):
        upload(manifest, backup_dir, s3_prefix)  # S3 lacks the logs backup; no config at all
    state = backup_status(
        backup_dir=str(backup_dir),
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=s3_prefix,
        s3_endpoint_url=stack.S3_ENDPOINT,
        return_state=True,
    )

    rows = by_kind(state.result())
    redis, prom, config, log = rows["redis"], rows["prometheus"], rows["config"], rows["logs"]
    assert (redis["local"], redis["S3"]) == ("fresh", "fresh")  # 1 h old, every 6 h
    assert redis["newest local"].startswith(Path(redis_new.name).name)
    assert redis["source"] == "redis.test:6379"
    assert redis["trend"] == "+10.0% (from 1000 B)"
    assert redis["size"] == "1.1 KiB"
    assert (prom["local"], prom["S3"]) == ("LATE", "LATE")  # 3 days old, daily: late after 2
    assert prom["schedule"] == "every 1 day (late after 2 days)"
    assert (config["local"], config["S3"]) == ("MISSING", "MISSING")
    assert (log["local"], log["S3"]) == ("fresh", "MISSING")  # the upload S3 lacks
    # No restore of these sources was proven (tests/test_restore_proofs.py proves some).
    assert all(row["last verified restore"] == "never" for row in rows.values())
    published = by_kind(status_artifact_of(state.state_details.flow_run_id))
    assert published == rows


def test_status_without_s3_says_not_configured(backup_dir: Path) -> None:
    fake_backup(backup_dir, "config", timedelta(days=15), 10, "/opt/proxilion")

    rows = by_kind(backup_status(backup_dir=str(backup_dir), s3_bucket=""))

    assert rows["config"]["local"] == "LATE"
    assert rows["config"]["schedule"] == "every 7 days (late after 14 days)"
    assert rows["config"]["S3"] == "—"
    assert rows["config"]["newest in S3"] == "not configured (no s3_bucket)"


@pytest.fixture
def status_after_backups(backup_dir: Path) -> Iterator[Callable[[uuid.UUID], FlowRun]]:
    """The automation `python -m deployments apply` creates, on a backup-status
    deployment of this test's backup_dir; yields `refreshed(backup_run)`: the status run
    the automation started after `backup_run` ended, run to its end here (a stand-in for
    the runner that serves the deployment). The automation is removed after."""
    deployment = backup_status.to_deployment(
        name=f"hourly-{uuid.uuid4().hex[:8]}",
        parameters={"backup_dir": str(backup_dir), "s3_bucket": ""},
    )
    deployment_id = deployment.apply()
    automation = status_automation(deployment_id).model_copy(
        update={"name": f"test {deployment.name}"}
    )
    automation_id = replace_automation(automation)

    def refreshed(backup_run: uuid.UUID) -> FlowRun:
        with get_client(sync_client=True) as client:
            ended = client.read_flow_run(backup_run).end_time
            deadline = time.monotonic() + 60
            while not (runs := client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )):  # fmt: skip
                assert time.monotonic() < deadline, "the automation started no status run"
                time.sleep(0.2)
            [status_run] = runs
            assert status_run.created > ended  # started by the backup's end, not before
            run_flow(backup_status, flow_run=status_run, parameters=status_run.parameters)
            return client.read_flow_run(status_run.id)

    try:
        yield refreshed
    finally:
        with get_client(sync_client=True) as client:
            client.delete_automation(automation_id)


def test_a_finished_backup_starts_a_status_run_its_own_run_does_not_wait_for(
    backup_dir: Path, sandbox_redis: str, status_after_backups: Callable[[uuid.UUID], FlowRun]
) -> None:
    state = backup_redis(redis_url=sandbox_redis, backup_dir=str(backup_dir), s3_bucket="",
                         return_state=True)  # fmt: skip

    assert state.is_completed()
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
    assert children == []  # no subflow: nothing after the backup's end in its run
    status_run = status_after_backups(state.state_details.flow_run_id)
    assert status_run.state is not None and status_run.state.is_completed()
    rows = by_kind(status_artifact_of(status_run.id))
    assert rows["redis"]["local"] == "fresh"
    assert rows["redis"]["trend"] == "first backup"
    assert rows["prometheus"]["local"] == "MISSING"


def test_failed_backup_run_also_refreshes_the_status(
    backup_dir: Path, status_after_backups: Callable[[uuid.UUID], FlowRun]
) -> None:
    port = free_port()
    fake_backup(backup_dir, "redis", timedelta(hours=13), 10, f"127.0.0.1:{port}")

    state = backup_redis(
        redis_url=f"redis://127.0.0.1:{port}/0",  # nothing listens: the backup fails
        container="",
        backup_dir=str(backup_dir),
        s3_bucket="",
        return_state=True,
    )

    assert state.is_failed()
    rows = by_kind(status_artifact_of(status_after_backups(state.state_details.flow_run_id).id))
    assert rows["redis"]["local"] == "LATE"  # the failure left the 13 h old backup newest


def test_status_says_never_restored_and_missing_with_nothing_at_all() -> None:
    now = datetime.now(UTC)
    rows = status_rows({"redis": Copies([], [])}, {"redis": timedelta(hours=6)}, {}, now)

    assert rows == [
        {
            "kind": "redis",
            "source": "—",
            "schedule": "every 6 h (late after 12 h)",
            "newest local": "none",
            "local": "MISSING",
            "newest in S3": "none",
            "S3": "MISSING",
            "size": "—",
            "trend": "—",
            "last verified restore": "never",
        }
    ]
