"""recover-redis: runbook scenario 2, Redis data lost or corrupt; put a backup back.

Runbook steps: find the backup (here, else S3) and verify it, check the target
(container, data dir, AOF setting, RDB version it loads, free disk), validate and
stage the RDB, stop Redis, move its data aside, place the RDB (also as the AOF base
when AOF is on), start Redis, wait for loading:0, verify key counts against the
manifest and persistence, check the gateway. Any failure after the data was moved
puts it back and starts Redis again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from flows.support.hooks import FLOW_HOOKS
from flows.support.parameter_docs import shared_args
from flows.support.pushes import recovered, recovery_failed, with_hooks
from flows.support.recovery import Recovery
from flows.support.restoring import find_backup, roll_back
from flows.support.settings import SETTING, refuse_secret_parameters, resolve
from flows.support.steps import explains_failure, run_name
from tasks.common.aside import MovedAside, move_into_aside, unique_folder
from tasks.common.files import require_free_space
from tasks.common.locks import exclusive, lock_name
from tasks.common.redis_url import parse_redis_url
from tasks.docker.containers import (
    container_running,
    find_data_dir,
    start_container,
    stop_container,
)
from tasks.redis.restore import (
    RedisSetup,
    check_gateway,
    check_persistence,
    check_rdb,
    place_staged,
    read_redis_setup,
    settle_aof,
    stage_rdb,
    verify_keyspace,
    wait_until_loaded,
)
from tasks.store.find import FoundBackup
from tasks.store.sources import redis_source_id

GATEWAY_TIMEOUT = 60.0


@flow(
    name="recover-redis",
    flow_run_name=run_name("redis recovery"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, recovery_failed("redis")),
)
@explains_failure
@shared_args
def recover_redis(
    backup: str = "latest",
    container: str = SETTING,
    redis_url: str = "",
    data_dir: str = "",
    gateway_health_url: str = "",
    dry_run: bool = False,
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
    age_identity_file: str = "",
    start_timeout_seconds: float = 600.0,
) -> dict[str, Any]:
    """Restore Redis from an RDB backup, safely, then prove it (scenario 2).

    The current data is moved aside (never deleted; its path is in the report) and
    put back if any later step fails. Empty parameters and `setting` take their PROXILION_DR_*
    setting. Returns RTO, RPO, the backup used, where the old data went, each step.

    Args:
        backup: Backup to restore: `latest` (newest complete one) or a name as listed,
            e.g. `redis/dump_20260101_000000.rdb.gz`. Looked for in backup_dir, then S3.
        container: Docker container running Redis (stopped and started by the restore).
            `setting`: PROXILION_DR_REDIS_CONTAINER (default proxilion-redis).
        redis_url: How to reach that Redis (redis://host:port/db). Empty:
            PROXILION_DR_REDIS_URL (default redis://localhost:6379/0). A URL with a
            password is refused here: credentials belong in PROXILION_DR_REDIS_URL.
        data_dir: Host folder holding Redis's dump.rdb. Empty:
            PROXILION_DR_REDIS_DATA_DIR (default: none, found from the container's
            mount of Redis's `dir`).
        gateway_health_url: The gateway's /health URL, checked after the restore.
            Empty: PROXILION_DR_GATEWAY_HEALTH_URL (default: none, no check).
        dry_run: ON: check everything (backup, checksum, RDB validity and version,
            container, data dir, free disk) and publish the plan; nothing is stopped,
            moved or written. OFF (the default): a LIVE RESTORE. Redis is stopped and
            its current data (dump.rdb and the AOF) is REPLACED by the backup: the old
            files are moved aside into `<data dir>/dump.rdb.before-restore-<UTC>/`
            (never deleted; remove that folder by hand once satisfied), Redis is
            started on the backup, and keys written since the backup are gone. Any
            failure after the move puts the old data back and starts Redis again.
        {backup_source}
        start_timeout_seconds: Seconds Redis may take to start and load the data.
    """
    refuse_secret_parameters(locals(), "redis_url")
    p = resolve(
        locals(),
        container="redis_container",
        data_dir="redis_data_dir",
    )
    recovery = Recovery("recover-redis", dry_run=dry_run)
    lock = lock_name("backup-redis", parse_redis_url(p["redis_url"]).server)  # backup's lock
    with recovery.reporting(), exclusive(lock):
        _recover(recovery, p)
    result = recovery.result()
    recovered("redis", result)
    return result


def _recover(r: Recovery, p: dict[str, Any]) -> None:
    container = p["container"]
    found = find_backup(r, p, "redis", redis_source_id(p["redis_url"]))
    with r.step("inspect Redis") as step:
        if not container:
            raise ValueError("container is empty: name the Redis container to restore into")
        was_running = container_running(container)
        setup = read_redis_setup(p["redis_url"], container)
        data = find_data_dir(container, setup.dir, p["data_dir"] or None)
        settle_aof(setup, data)
        step.detail = (
            f"Redis {setup.redis_version} (loads RDB ≤ {setup.rdb_version}), "
            f"{'running' if was_running else 'not running'}, data dir {data}, "
            f"appendonly {'yes' if setup.aof_enabled else 'no'}"
        )
    with r.step("check free disk") as step:
        step.detail = _check_space(found, setup, data)
    if r.dry_run:
        _plan(r, found, setup, data, container)
        return
    staging = unique_folder(data, ".restore-staging")
    try:
        with r.step("validate and stage the RDB") as step:
            rdb = stage_rdb(found, setup, staging)
            step.detail = (
                f"RDB v{rdb.rdb_version}, {rdb.size} bytes, {rdb.checksum_detail}; "
                f"deep check {rdb.deep_check}"
            )
        target = Target(container, p["redis_url"], data, setup, was_running)
        _swap(r, target, found, staging, p)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_space(found: FoundBackup, setup: RedisSetup, data: Path) -> str:
    """The restored RDB, plus the fresh dump Redis writes of its current data when it
    is stopped (moving aside is a rename: free)."""
    current = data / setup.dbfilename
    shutdown_save = current.stat().st_size if current.is_file() else 0
    needed = found.manifest.raw_size + shutdown_save
    free = require_free_space(data, needed, f"restoring {found.manifest.name} into {data}")
    return f"{free / 1e6:.0f} MB free in {data}, {needed / 1e6:.0f} MB needed"


def _plan(r: Recovery, found: FoundBackup, setup: RedisSetup, data: Path, container: str) -> None:
    with r.step("validate the RDB (dry run)") as step:
        rdb = check_rdb(found, setup)
        step.detail = f"RDB v{rdb.rdb_version} loads on Redis {setup.redis_version}"
        step.detail += f"; {rdb.deep_check}"
    present = [n for n in setup.data_names() if (data / n).exists()]
    r.skip("stop Redis", f"would stop container {container}")
    r.skip("move current data aside", f"would move {', '.join(present) or 'nothing'} "
           f"into {data}/{setup.dbfilename}.before-restore-<UTC>/")  # fmt: skip
    aof = " and as the AOF base" if setup.aof_enabled else ""
    r.skip("place the RDB", f"would place {found.manifest.name} as {setup.dbfilename}{aof}")
    keyspace = found.manifest.source.get("keyspace")
    r.skip("start Redis and verify", f"would verify key counts {keyspace}")


@dataclass(frozen=True)
class Target:
    """The Redis being restored, as inspected before it was touched."""

    container: str
    redis_url: str
    data: Path
    setup: RedisSetup
    was_running: bool


def _swap(r: Recovery, t: Target, found: FoundBackup, staging: Path, p: dict[str, Any]) -> None:
    """Stop, move aside, place, start, verify; on any failure put the old data back."""
    container, url, data, setup = t.container, t.redis_url, t.data, t.setup
    moved: MovedAside | None = None
    try:
        with r.step("stop Redis") as step:
            stopped = stop_container(container)
            step.detail = f"container {container} " + ("stopped" if stopped else "was not running")
        with r.step("move current data aside") as step:
            moved = move_into_aside(data, setup.data_names(), data / setup.dbfilename)
            r.moved_aside.append(str(moved.folder))
            step.detail = f"{', '.join(moved.names) or 'nothing there'} → {moved.folder}"
        with r.step("place the RDB") as step:
            step.detail = ", ".join(place_staged(staging, data, setup))
        with r.step("start Redis and wait for loading:0") as step:
            start_container(container)
            load = wait_until_loaded(url, container, p["start_timeout_seconds"])
            step.detail = f"loaded {load.get('rdb_last_load_keys_loaded', '?')} keys"
        with r.step("verify key counts") as step:
            step.detail = verify_keyspace(url, found.manifest.source.get("keyspace", {}), load)
        with r.step("check persistence") as step:
            step.detail = check_persistence(url, setup)
        if p["gateway_health_url"]:
            with r.step("check the gateway") as step:
                step.detail = check_gateway(p["gateway_health_url"], GATEWAY_TIMEOUT)
        r.healthy()
    except BaseException:
        failed_folder = unique_folder(data, "failed-restore")
        roll_back(r, container, moved, failed_folder, setup.data_names(), t.was_running)
        raise


if __name__ == "__main__":
    recover_redis()
