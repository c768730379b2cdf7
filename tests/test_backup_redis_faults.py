"""backup-redis under bad input and faults: each fails clearly and stores nothing
that could pass for a good backup."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from mounts import mounted_tmpfs
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import State
from prefect_records import log_messages, recent_runs, recorder_marker, wait_for_task_runs
from redis_servers import running_redis

from flows.backup_redis import backup_redis
from flows.support.settings import SecretParameter
from sandbox import constants as stack
from tasks.common.secrets import redact_url
from tasks.docker.containers import ContainerError
from tasks.redis.capture import capture_rdb
from tasks.redis.rdb import RdbError
from tasks.redis.save import SaveFailed, SaveTimeout
from tasks.redis.server import RedisUnreachable, inspect_redis
from tasks.store.local import list_local
from tasks.store.s3 import S3Error, S3Unreachable

SECRET = "s3cr3t-Pa55word"


def no_backups(backup_dir: Path) -> None:
    assert list_local(backup_dir, "redis") == []
    leftovers = [p for p in backup_dir.rglob("*") if p.is_file()]
    assert leftovers == [], f"partial files left behind: {leftovers}"


def all_log_text() -> str:
    return "\n".join(log_messages())


def test_unreachable_redis(backup_dir: Path) -> None:
    with pytest.raises(RedisUnreachable, match="cannot reach Redis at redis://127.0.0.1:1/0"):
        backup_redis(
            redis_url="redis://127.0.0.1:1/0",
            container="",
            fetch="network",
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
    no_backups(backup_dir)


def test_wrong_password_is_clear_and_never_shown(
    backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_redis(tmp_path / "r", requirepass="the-right-one") as server:
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        monkeypatch.setenv("PROXILION_DR_REDIS_URL", url)  # credentials: environment only
        with pytest.raises(PermissionError, match="refused the credentials") as failure:
            backup_redis(
                container="",
                fetch="network",
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
    assert SECRET not in str(failure.value)
    assert SECRET not in all_log_text()
    no_backups(backup_dir)


def test_credentials_in_url_never_reach_logs_artifacts_or_manifest(
    backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_redis(tmp_path / "r", requirepass=SECRET) as server:
        redis.Redis(port=server.port, password=SECRET).set("k", "v")
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        # As a parameter the password would be stored and shown by Prefect: refused.
        with pytest.raises(SecretParameter, match="put the URL in PROXILION_DR_REDIS_URL"):
            backup_redis(redis_url=url, container="", fetch="network", backup_dir=str(backup_dir))
        no_backups(backup_dir)
        monkeypatch.setenv("PROXILION_DR_REDIS_URL", url)
        manifest = backup_redis(
            container="", fetch="network", backup_dir=str(backup_dir), s3_bucket=""
        )
    assert manifest["source"]["server"] == f"redis://***@127.0.0.1:{server.port}/0"
    assert SECRET not in (backup_dir / (manifest["name"] + ".manifest.json")).read_text()
    assert SECRET not in all_log_text()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=recent_runs())
    assert artifacts and all(SECRET not in str(a.data) for a in artifacts)


def test_redact_url_hides_user_and_password() -> None:
    assert redact_url("rediss://admin:pw@h:6380/2") == "rediss://***@h:6380/2"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_bgsave_failure_reports_redis_reason(backup_dir: Path, tmp_path: Path) -> None:
    with (
        running_redis(tmp_path / "r", enable_protected_configs="yes") as server,
        mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as readonly,
    ):
        redis.Redis(port=server.port).set("k", "v")
        redis.Redis(port=server.port).config_set("dir", str(readonly))
        with pytest.raises(SaveFailed, match="failed to write its snapshot"):
            backup_redis(
                redis_url=server.url,
                container="",
                fetch="path",
                data_dir=str(server.dir),
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
    no_backups(backup_dir)


def test_save_that_never_finishes_hits_the_deadline(backup_dir: Path, tmp_path: Path) -> None:
    with running_redis(tmp_path / "r", **{"rdb-key-save-delay": "1000000"}) as server:
        redis.Redis(port=server.port).mset({f"k{i}": i for i in range(50)})
        with pytest.raises(SaveTimeout, match="did not finish its snapshot within 2 s"):
            backup_redis(
                redis_url=server.url,
                container="",
                fetch="path",
                data_dir=str(server.dir),
                backup_dir=str(backup_dir),
                s3_bucket="",
                save_timeout_seconds=2,
            )
    no_backups(backup_dir)


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_corrupt_rdb_is_refused_before_storing(
    damage: str, backup_dir: Path, tmp_path: Path
) -> None:
    with running_redis(tmp_path / "r") as server:
        redis.Redis(port=server.port).mset({f"k{i}": "v" * 100 for i in range(2000)})
        redis.Redis(port=server.port).save()
        corrupt = tmp_path / "corrupt"
        corrupt.mkdir()
        data = bytearray((server.dir / "dump.rdb").read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x10
        (corrupt / "dump.rdb").write_bytes(bytes(data))
        # Called at the capture step: the flow's own save proof refuses a file written
        # before its BGSAVE (test_backup_redis_fetch), so a damaged file that Redis
        # itself wrote (a bad disk) is what reaches validation.
        staging = backup_dir / "redis" / ".dump.rdb.gz.test.partial"
        staging.parent.mkdir()
        facts = inspect_redis.fn(server.url)
        with pytest.raises(RdbError, match="(?i)corrupt|truncated|checksum"):
            capture_rdb.fn("path", server.url, None, str(corrupt), facts, staging, "gzip", False)
        assert not staging.exists()
    no_backups(backup_dir)


def test_unknown_container_is_named(sandbox_redis: str, backup_dir: Path) -> None:
    named = "no container named 'proxilion-nope'.*proxilion-redis"
    with pytest.raises(ContainerError, match=named):
        backup_redis(
            redis_url=sandbox_redis,
            container="proxilion-nope",
            fetch="container",
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
    no_backups(backup_dir)


def test_s3_down_keeps_the_local_backup_and_fails_the_run(
    sandbox_redis: str, backup_dir: Path
) -> None:
    with pytest.raises(S3Unreachable, match="S3 endpoint http://127.0.0.1:1 is unreachable"):
        backup_redis(
            redis_url=sandbox_redis,
            fetch="container",
            backup_dir=str(backup_dir),
            s3_bucket=stack.S3_BUCKET,
            s3_endpoint_url="http://127.0.0.1:1",
        )
    [kept] = list_local(backup_dir, "redis")
    assert (backup_dir / kept.name).stat().st_size == kept.size


def test_missing_bucket_is_named(sandbox_redis: str, backup_dir: Path, s3_prefix: str) -> None:
    with pytest.raises(S3Error, match="bucket 'no-such-bucket' does not exist"):
        backup_redis(
            redis_url=sandbox_redis,
            fetch="container",
            backup_dir=str(backup_dir),
            s3_bucket="no-such-bucket",
            s3_prefix=s3_prefix,
            s3_endpoint_url=stack.S3_ENDPOINT,
        )
    assert len(list_local(backup_dir, "redis")) == 1


def test_read_only_backup_dir_fails_before_any_work(sandbox_redis: str, tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as readonly:
        with pytest.raises(PermissionError, match="is not writable.*choose another backup_dir"):
            backup_redis(
                redis_url=sandbox_redis, fetch="container", backup_dir=str(readonly), s3_bucket=""
            )
        assert os.listdir(readonly) == []


def task_runs_of(state: State) -> list[Any]:
    """The backup's own steps: not the backup-status subflow its hooks start once the
    backup (and its lock) has ended, which shows as a task run of the parent, nor the
    marker wait_for_task_runs sends. That one runs outside any flow, yet when this test
    runs alone (the process's first flow runs in threads), Prefect records it under the
    first backup's run, after both backups ended."""
    wait_for_task_runs()
    with get_client(sync_client=True) as client:
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=run_filter)
    left_out = ("backup-status", recorder_marker.name)
    return [run for run in runs if not run.name.startswith(left_out)]


def test_two_backups_of_one_redis_never_overlap(backup_dir: Path, tmp_path: Path) -> None:
    """The second backup's first step starts after the first backup's last step ended.

    The first backup's save is slowed (~4 s; the delay is lifted for later saves, its
    child keeps its own copy) and the second one starts only once that save runs, so
    without the lock their steps would overlap."""
    with running_redis(tmp_path / "r", **{"rdb-key-save-delay": "80000"}) as server:
        client = server.client()
        client.mset({f"k{i}": i for i in range(50)})
        states: dict[str, State] = {}

        def backup(label: str) -> None:
            states[label] = backup_redis(
                redis_url=server.url,
                container="",
                fetch="path",
                data_dir=str(server.dir),
                backup_dir=str(backup_dir),
                s3_bucket="",
                return_state=True,
            )

        first = threading.Thread(target=backup, args=("first",))
        first.start()
        deadline = time.monotonic() + 120
        while not int(client.info("persistence")["rdb_bgsave_in_progress"]):
            assert first.is_alive() and time.monotonic() < deadline, "the first save never ran"
            time.sleep(0.05)
        client.config_set("rdb-key-save-delay", 0)
        second = threading.Thread(target=backup, args=("second",))
        second.start()
        first.join(timeout=300)
        second.join(timeout=300)
    assert states["first"].is_completed() and states["second"].is_completed()
    assert len(list_local(backup_dir, "redis")) == 2
    first_steps, second_steps = task_runs_of(states["first"]), task_runs_of(states["second"])
    first_ended = max(step.end_time for step in first_steps if step.end_time)
    second_started = min(step.start_time for step in second_steps if step.start_time)
    assert second_started > first_ended, "the second backup ran while the first held the lock"


def test_password_from_the_environment_never_reaches_run_parameters(
    backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_redis(tmp_path / "r", requirepass=SECRET) as server:
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        monkeypatch.setenv("PROXILION_DR_REDIS_URL", url)
        state = backup_redis(
            container="",
            fetch="network",
            backup_dir=str(backup_dir),
            s3_bucket="",
            return_state=True,
        )
    assert state.is_completed() and len(list_local(backup_dir, "redis")) == 1
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.parameters["redis_url"] == ""  # the default: the setting supplies the URL
    assert SECRET not in str(run.parameters)


def test_bad_retention_is_refused_before_any_work(sandbox_redis: str, backup_dir: Path) -> None:
    with pytest.raises(ValueError, match="keep_min must be at least 1"):
        backup_redis(
            redis_url=sandbox_redis,
            fetch="container",
            backup_dir=str(backup_dir),
            s3_bucket="",
            keep_min=0,
        )
    assert list(backup_dir.iterdir()) == []


def test_a_save_already_running_is_waited_for_then_ours_runs(
    backup_dir: Path, tmp_path: Path
) -> None:
    """The save is provably running when the flow arrives: its child was forked with a
    delay of 0.05 s per key (5 s for 100 keys), far longer than the flow's start-up;
    the delay is then lifted for later saves (the running child keeps its own copy)."""
    with running_redis(tmp_path / "r", **{"rdb-key-save-delay": "50000"}) as server:
        client = redis.Redis(port=server.port)
        client.mset({f"k{i}": i for i in range(100)})
        saves_before = client.info("persistence")["rdb_saves"]
        client.bgsave()
        client.config_set("rdb-key-save-delay", 0)
        assert client.info("persistence")["rdb_bgsave_in_progress"] == 1
        manifest = backup_redis(
            redis_url=server.url,
            container="",
            fetch="path",
            data_dir=str(server.dir),
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
        assert manifest["source"]["keyspace"]["db0"]["keys"] == 100
        # the flow's first BGSAVE was refused (a save was running), it waited, then saved
        bgsave = client.info("commandstats")["cmdstat_bgsave"]
        assert (bgsave["calls"], bgsave["failed_calls"]) == (3, 1)  # ours, refused, retried
        assert client.info("persistence")["rdb_saves"] == saves_before + 2
