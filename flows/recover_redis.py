"""recover-redis: runbook scenario 2, Redis data lost or corrupt; put a backup back.

Runbook steps: find the backup (here, else S3) and verify it, check the target
(container, data dir, AOF setting, RDB version it loads, free disk), stop Redis while
the RDB is decompressed and validated beside its data, move its data aside, place the
RDB (also as the AOF base when AOF is on), start Redis and wait for loading:0 while
redis-check-rdb parses the same file and it is flushed to disk, verify what Redis
loaded and the key counts against the manifest, persistence, the gateway. Any failure
after the stop puts the old data back and starts Redis again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.support.failures import explains_failure, run_name
from flows.support.hooks import FLOW_HOOKS
from flows.support.parameter_docs import shared_args
from flows.support.parameters import dr_flow
from flows.support.pushes import recovered, recovery_failed, with_hooks
from flows.support.recovery import BackupSource, Recovery, find_backup, roll_back
from flows.support.settings import SETTING, resolve
from tasks.common.aside import MovedAside, unique_folder
from tasks.common.files import require_free_space
from tasks.common.locks import exclusive, lock_name
from tasks.common.redis_url import parse_redis_url
from tasks.docker.containers import (
    container_running,
    find_data_dir,
    stop_container,
)
from tasks.redis.prove import check_gateway, check_persistence, prove_redis
from tasks.redis.restore import (
    StagedRdb,
    check_loadable,
    check_rdb,
    move_redis_data_aside,
    place_rdb,
    rdb_version_of,
    stage_rdb,
    start_checked,
)
from tasks.redis.setup import RedisSetup, read_redis_setup, settle_aof
from tasks.store.find import FoundBackup
from tasks.store.kinds import redis_source_id

GATEWAY_TIMEOUT = 60.0


@dataclass(frozen=True)
class Target:
    """The Redis being restored, as inspected before it was touched."""

    container: str
    redis_url: str
    data: Path
    setup: RedisSetup
    was_running: bool


@dr_flow(
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
    p = resolve(locals(), container="redis_container", data_dir="redis_data_dir")
    source = BackupSource.of(p)
    recovery = Recovery("recover-redis", dry_run=dry_run)
    lock = lock_name("backup-redis", parse_redis_url(p["redis_url"]).server)  # backup's lock
    with recovery.reporting(), exclusive(lock):
        found = find_backup(recovery, source, "redis", backup, redis_source_id(p["redis_url"]))
        target = inspect_target(recovery, p["container"], p["redis_url"], p["data_dir"] or None)
        check_free_disk(recovery, found, target)
        if dry_run:
            plan(recovery, found, target)
        else:
            restore(recovery, found, target, p["gateway_health_url"], start_timeout_seconds)
    result = recovery.result()
    recovered("redis", result)
    return result


def inspect_target(r: Recovery, container: str, redis_url: str, data_dir: str | None) -> Target:
    """The step "inspect Redis": version, data dir and AOF setting, read before anything
    is touched (from the container's binary and files when Redis does not answer)."""
    with r.step("inspect Redis") as step:
        if not container:
            raise ValueError("container is empty: name the Redis container to restore into")
        was_running = container_running(container)
        setup = read_redis_setup(redis_url, container)
        data = find_data_dir(container, setup.dir, data_dir)
        settle_aof(setup, data)
        step.detail = (
            f"Redis {setup.redis_version} (loads RDB ≤ {setup.rdb_version}), "
            f"{'running' if was_running else 'not running'}, data dir {data}, "
            f"appendonly {'yes' if setup.aof_enabled else 'no'}"
        )
    return Target(container, redis_url, data, setup, was_running)


def check_free_disk(r: Recovery, found: FoundBackup, t: Target) -> None:
    """The restored RDB, plus the fresh dump Redis writes of its current data when it
    is stopped (moving aside is a rename: free)."""
    with r.step("check free disk") as step:
        current = t.data / t.setup.dbfilename
        shutdown_save = current.stat().st_size if current.is_file() else 0
        needed = found.manifest.raw_size + shutdown_save
        free = require_free_space(t.data, needed, f"restoring {found.manifest.name} into {t.data}")
        step.detail = f"{free / 1e6:.0f} MB free in {t.data}, {needed / 1e6:.0f} MB needed"


def plan(r: Recovery, found: FoundBackup, t: Target) -> None:
    """The dry run: validate the RDB fully; say what the live run would do."""
    with r.step("validate the RDB (dry run)") as step:
        rdb = check_rdb(found, t.setup)
        step.detail = f"RDB v{rdb.rdb_version} loads on Redis {t.setup.redis_version}"
        step.detail += f"; {rdb.deep_check}"
    present = [n for n in t.setup.data_names() if (t.data / n).exists()]
    r.skip("stop Redis", f"would stop container {t.container}")
    r.skip("move current data aside", f"would move {', '.join(present) or 'nothing'} "
           f"into {t.data}/{t.setup.dbfilename}.before-restore-<UTC>/")  # fmt: skip
    aof = " and as the AOF base" if t.setup.aof_enabled else ""
    r.skip("place the RDB", f"would place {found.manifest.name} as {t.setup.dbfilename}{aof}")
    keyspace = found.manifest.source.get("keyspace")
    r.skip("start Redis and verify", f"would verify key counts {keyspace}")


def restore(
    r: Recovery, found: FoundBackup, t: Target, gateway_health_url: str, timeout: float
) -> None:
    """Stop Redis while the RDB is decompressed and validated beside its data, swap it
    in, start Redis on it while redis-check-rdb parses it and it is flushed to disk,
    prove it; on any failure put the old data back and start Redis again."""
    with r.step("check the RDB version loads here") as step:  # before Redis is touched
        version = rdb_version_of(found)
        check_loadable(version, t.setup, found.manifest.name)
        step.detail = f"RDB v{version}: Redis {t.setup.redis_version} loads it"
    staging = stage_rdb.submit(found, t.setup, t.data, deep=False, durable=False)
    staged: StagedRdb | None = None
    moved: MovedAside | None = None
    try:
        with r.step("stop Redis") as step:
            stopped = stop_container(t.container)
            step.detail = f"container {t.container} " + (
                "stopped" if stopped else "was not running"
            )
            step.detail += "; the RDB is decompressed meanwhile"
        with r.step("decompress and validate the RDB") as step:  # what the stop did not hide
            staged = staging.result()
            rdb = staged.rdb
            step.detail = (
                f"RDB v{rdb.rdb_version}, {rdb.size} bytes, {rdb.checksum_detail}; "
                f"{staged.seconds:.2f} s in all, from the stop's start"
            )
        with r.step("move current data aside") as step:
            moved = move_redis_data_aside(t.data, t.setup)
            r.moved_aside.append(str(moved.folder))
            step.detail = f"{', '.join(moved.names) or 'nothing there'} → {moved.folder}"
        with r.step("place the RDB") as step:
            step.detail = ", ".join(place_rdb(staged, t.data, t.setup))
        with r.step("start Redis and wait for loading:0") as step:
            path = t.data / t.setup.dbfilename
            checked = start_checked(found, staged.rdb, path, t.redis_url, t.container, timeout)
            load = checked.load
            step.detail = (
                f"loaded {load.get('rdb_last_load_keys_loaded', '?')} keys; alongside: "
                f"{checked.deep_check}, the RDB flushed to disk"
            )
        r.prove(prove_redis(t.redis_url, found.manifest, load, checked.started_at), found.manifest)
        with r.step("check persistence") as step:
            step.detail = check_persistence(t.redis_url, t.setup)
        if gateway_health_url:
            with r.step("check the gateway") as step:
                step.detail = check_gateway(gateway_health_url, GATEWAY_TIMEOUT)
        r.healthy()
    except BaseException:
        failed_folder = unique_folder(t.data, "failed-restore")
        roll_back(r, t.container, moved, failed_folder, t.setup.data_names(), t.was_running)
        raise
    finally:
        staging.wait()  # never leave it writing into the data dir
        if staging.state.is_completed():
            staging.result().discard()  # nothing once placed


if __name__ == "__main__":
    recover_redis()
