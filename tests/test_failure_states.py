"""What the runs list, run header and artifacts tab show: one-line failed states naming
the step, the reason and what is safe; a NOT-uploaded report and the catch-up upload;
the `Unchanged` state; run names; reports in the flow run, escaped, with the
manifest's facts. Everything is read back from the (test) Prefect server."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

import boto3
import pytest
from conftest import require
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect_records import run_logs
from redis_servers import free_port, running_redis
from test_backup_config import write_project
from waiting import past_the_second_of

from flows.backup_config import backup_config
from flows.backup_logs import backup_logs
from flows.backup_prometheus import backup_prometheus
from flows.backup_redis import backup_redis
from flows.recover_gateway import recover_gateway
from flows.support.failures import StepFailed, explains_failure
from sandbox import constants as stack
from tasks.logs.capture import LOG_LINE_FORMAT
from tasks.redis.server import RedisUnreachable
from tasks.store.local import list_local
from tasks.store.report import escape_markdown


def flow_run(state: Any) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def report(run_id: UUID) -> tuple[Any, dict[str, str]]:
    """The one report artifact of a flow run and its rows (field → value)."""
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return artifact, {row["field"]: row["value"] for row in data}


def remote_names(prefix: str) -> set[str]:
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    listing = s3.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=prefix + "/")
    return {item["Key"].removeprefix(prefix + "/") for item in listing.get("Contents", [])}


def test_failed_upload_keeps_a_report_and_the_next_run_uploads_what_s3_lacks(
    tmp_path: Path, s3_prefix: str
) -> None:
    project, backups = write_project(tmp_path / "project"), tmp_path / "backups"
    common = dict(
        project_dir=str(project),
        env_container="",
        backup_dir=str(backups),
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=s3_prefix,
    )
    dead = f"http://127.0.0.1:{free_port()}"
    state = backup_config(**common, s3_endpoint_url=dead, return_state=True)
    [first] = list_local(backups, "config")
    stored = backups / first.name
    run = flow_run(state)
    assert run.state is not None and run.state.is_failed()
    assert run.state.message == (
        f"upload to S3 failed: S3 endpoint {dead} is unreachable: check s3_endpoint_url and "
        f"the network; the backup is complete locally at {stored}; the next successful "
        "config backup uploads it"
    )
    assert run.name.startswith("config ") and run.name.endswith(" UTC")
    artifact, rows = report(run.id)
    assert artifact.key == "backup-config" and artifact.task_run_id is None
    assert rows["uploaded"].startswith("stored locally, NOT uploaded (S3 endpoint")
    assert rows["stored locally"] == str(stored)

    past_the_second_of(first.name)
    state = backup_config(
        **common, s3_endpoint_url=stack.S3_ENDPOINT, force=True, return_state=True
    )
    run = flow_run(state)
    assert run.state is not None and run.state.is_completed(), run.state
    second = state.result()["name"]
    names = {first.name, second}
    assert names | {n + ".manifest.json" for n in names} <= remote_names(s3_prefix)
    _, rows = report(run.id)
    assert rows["earlier backups uploaded now (S3 lacked them)"] == first.name
    assert rows["uploaded"].endswith("(size and ETag verified)")


def test_unchanged_config_ends_in_a_completed_state_named_unchanged(tmp_path: Path) -> None:
    project, backups = write_project(tmp_path / "project"), tmp_path / "backups"
    common = dict(project_dir=str(project), env_container="", backup_dir=str(backups), s3_bucket="")
    first = backup_config(**common)
    state = backup_config(**common, return_state=True)
    run = flow_run(state)
    assert run.state is not None and run.state.is_completed()
    assert run.state.name == "Unchanged"
    assert run.state.message == f"configuration unchanged since {first['name']}: nothing stored"
    assert state.result()["skipped"] is True  # the flow's value is still there
    artifact, rows = report(run.id)
    assert artifact.task_run_id is None
    assert rows["result"].startswith(f"unchanged since {first['name']}")


def test_early_failure_names_the_step_and_says_nothing_was_stored(backup_dir: Path) -> None:
    parameters = dict(
        redis_url="redis://127.0.0.1:1/0", container="", fetch="network", s3_bucket=""
    )
    state = backup_redis(**parameters, backup_dir=str(backup_dir), return_state=True)
    message = flow_run(state).state.message  # type: ignore[union-attr]
    assert message.startswith("inspect redis failed: cannot reach Redis at redis://127.0.0.1:1/0")
    assert message.endswith("; nothing new was stored; earlier backups are untouched")
    assert "\n" not in message
    with pytest.raises(RedisUnreachable):  # a direct call still raises the error itself
        backup_redis(**parameters, backup_dir=str(backup_dir))


def test_failed_run_logs_its_reason_as_an_error_without_tracebacks(backup_dir: Path) -> None:
    """An expected, explained failure (an error of ours, with its reason) reads as
    that reason in the Logs tab: one ERROR line equal to the failed state's message,
    and no Prefect traceback above it; an unexpected error keeps its traceback."""
    state = backup_redis(
        redis_url="redis://127.0.0.1:1/0",
        container="",
        fetch="network",
        s3_bucket="",
        backup_dir=str(backup_dir),
        return_state=True,
    )
    run = flow_run(state)
    logs = run_logs(run.id)
    errors = [log.message for log in logs if log.level >= logging.ERROR]
    assert run.state is not None and run.state.message in errors, errors
    assert not [log.message for log in logs if "Traceback" in log.message]

    @flow(name="unexpected-failure-stand-in")
    @explains_failure
    def buggy() -> None:
        raise KeyError("a bug, not an explained failure")

    logs = run_logs(flow_run(buggy(return_state=True)).id)
    assert any("Traceback" in log.message for log in logs), [log.message for log in logs]


def test_failure_a_retry_condition_saw_names_the_task_not_the_retry_machinery(
    backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_redis(tmp_path / "r", requirepass="the-right-one") as server:
        url = f"redis://:not-the-password@127.0.0.1:{server.port}/0"
        monkeypatch.setenv("PROXILION_DR_REDIS_URL", url)
        state = backup_redis(
            container="", fetch="network", backup_dir=str(backup_dir), return_state=True
        )
    message = flow_run(state).state.message  # type: ignore[union-attr]
    assert message.startswith("inspect redis failed: Redis at redis://***@127.0.0.1:")
    assert "not-the-password" not in message


def test_bad_parameter_failure_names_the_check(backup_dir: Path) -> None:
    state = backup_logs(keep_min=0, backup_dir=str(backup_dir), return_state=True)
    assert flow_run(state).state.message == (  # type: ignore[union-attr]
        "checking the retention parameters failed: keep_min must be at least 1 (the newest "
        "is always kept), got 0; nothing new was stored; earlier backups are untouched"
    )


def test_recovery_failure_is_the_state_message_without_a_traceback_prefix() -> None:
    missing = f"proxilion-dr-test-missing-{uuid.uuid4().hex[:8]}"
    state = recover_gateway(
        container=missing,
        health_url=f"http://127.0.0.1:{free_port()}/health",
        deadline_seconds=1,
        return_state=True,
    )
    run = flow_run(state)
    assert run.name.startswith("gateway recovery ")
    assert run.state is not None and run.state.is_failed()
    assert run.state.message == (
        "recover-gateway: step 'recreate container from its configuration' failed: container "
        f"'{missing}' does not exist, so there is no configuration to recreate it from: run "
        "again with compose_file=<path of the docker-compose.yml defining it>"
    )
    with pytest.raises(StepFailed):  # a direct call still raises the step failure
        state.result()


def test_redis_report_carries_versions_and_checks(sandbox_redis: str, backup_dir: Path) -> None:
    state = backup_redis(
        redis_url=sandbox_redis,
        container=stack.REDIS_CONTAINER,
        fetch="container",
        backup_dir=str(backup_dir),
        s3_bucket="",
        return_state=True,
    )
    manifest = state.result()
    run = flow_run(state)
    assert run.name.startswith("redis ")
    artifact, rows = report(run.id)
    assert artifact.key == "backup-redis" and artifact.task_run_id is None
    source = manifest["source"]
    assert rows["Redis version"] == source["redis_version"]
    assert rows["RDB version"] == str(source["rdb_version"])
    assert rows["RDB checksum (CRC-64) verified"] == "yes"
    assert rows["deep check (redis-check-rdb)"] == source["deep_check"]


def test_prometheus_report_carries_time_range_and_series(backup_dir: Path) -> None:
    require(stack.PROMETHEUS_HOST, stack.PROMETHEUS_PORT, "Prometheus (prometheus)")
    state = backup_prometheus(
        prometheus_url=stack.PROMETHEUS_URL,
        container=stack.PROMETHEUS_CONTAINER,
        fetch="container",
        data_dir="",
        backup_dir=str(backup_dir),
        s3_bucket="",
        return_state=True,
    )
    source = state.result()["source"]
    _, rows = report(flow_run(state).id)
    assert rows["time range (UTC)"] == f"{source['min_time']} → {source['max_time']}"
    assert rows["series (largest block)"] == str(source["series"])
    assert rows["Prometheus version"] == source["prometheus_version"]


def test_logs_report_escapes_the_line_format(backup_dir: Path) -> None:
    require(stack.GATEWAY_HOST, stack.GATEWAY_PORT, f"the gateway ({stack.GATEWAY_CONTAINER})")
    state = backup_logs(
        containers=stack.GATEWAY_CONTAINER,
        window="5m",
        backup_dir=str(backup_dir),
        s3_bucket="",
        return_state=True,
    )
    _, rows = report(flow_run(state).id)
    assert "<" in LOG_LINE_FORMAT
    assert rows["line format"] == escape_markdown(LOG_LINE_FORMAT)
    assert rows["line format"].startswith("&lt;timestamp&gt;")
