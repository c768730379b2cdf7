"""recover-redis: runbook scenario 2, Redis data lost or corrupt; put a backup back.

Runbook steps: find the backup (here, else S3) and verify it, check the target
(container, data dir, AOF setting, RDB version it loads, free disk), stop Redis while
the RDB is decompressed and validated beside its data, move its data aside, place the
RDB (also as the AOF base when AOF is on), start Redis and wait for loading:0 while
redis-check-rdb parses the same file and it is flushed to disk, verify what Redis
loaded and the key counts against the manifest, persistence, the gateway. Any failure
after the stop puts the old data back and starts Redis again.

To a point in time (`target_time`, `undo_flushall`): find the AOF pieces of the
generation that covers it (here, else S3) and verify them, check the target runs an
AOF, assemble the AOF folder, cut it (at the second, or before the flush) and
validate it with redis-check-aof, then the same stop / move aside / place / start
steps, proven by what Redis loaded and the marker keys at the cut.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from tasks.common.checks import Check
from tasks.common.files import require_free_space
from tasks.common.locks import exclusive, lock_name
from tasks.common.redis_url import parse_redis_url
from tasks.docker.containers import (
    container_running,
    find_data_dir,
    start_container,
    stop_container,
)
from tasks.redis.aof import AofError
from tasks.redis.pitr import (
    ChainPlan,
    Where,
    fetch_chain,
    load_generations,
    parse_target_time,
    place_chain,
    plan_flush,
    plan_time,
    stage_chain,
    utc,
)
from tasks.redis.prove import check_gateway, check_persistence, prove_aof, prove_redis
from tasks.redis.restore import (
    CheckedLoad,
    check_loadable,
    check_rdb,
    move_redis_data_aside,
    place_rdb,
    rdb_version_of,
    stage_rdb,
    start_checked,
    wait_until_loaded,
)
from tasks.redis.setup import RedisSetup, read_redis_setup, settle_aof
from tasks.store.archive import Manifest
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
    target_time: str = "",
    undo_flushall: bool = False,
) -> dict[str, Any]:
    """Restore Redis from an RDB backup, or to a second from the AOF shipped by
    backup-redis-aof, safely, then prove it (scenario 2).

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
            container, data dir, free disk; for a point in time the AOF pieces it
            would use, assembled, cut and validated aside) and publish the plan;
            nothing is stopped, moved or written. OFF (the default): a LIVE RESTORE.
            Redis is stopped and its current data (dump.rdb and the AOF) is REPLACED
            by the backup (or the AOF cut at the point in time): the old files are
            moved aside into `<data dir>/dump.rdb.before-restore-<UTC>/`
            (never deleted; remove that folder by hand once satisfied), Redis is
            started on the backup, and keys written since the backup are gone. Any
            failure after the move puts the old data back and starts Redis again.
        {backup_source}
        start_timeout_seconds: Seconds Redis may take to start and load the data.
        target_time: Restore to this second instead of a backup: UTC, as
            `2026-01-01 14:02:05` (or ISO 8601 with an offset). Every write up to
            the end of that second is kept, none after: the newest AOF base before
            it, the AOF pieces up to it, the last one cut there. Needs
            backup-redis-aof and a target with appendonly yes. Empty: restore
            `backup` (no point in time). With undo_flushall: look from here on.
        undo_flushall: Restore the state just before the last FLUSHALL or FLUSHDB
            in the shipped AOF (at or after target_time when it is given): the AOF
            is cut right before that command. The report names the time restored
            to and the last command kept.
    """
    p = resolve(locals(), container="redis_container", data_dir="redis_data_dir")
    source = BackupSource.of(p)
    recovery = Recovery("recover-redis", dry_run=dry_run)
    server = parse_redis_url(p["redis_url"]).server
    point_in_time = bool(target_time.strip()) or undo_flushall
    with (
        recovery.reporting(),
        exclusive(lock_name("backup-redis", server)),  # the backups' locks: none runs meanwhile
        exclusive(lock_name("backup-redis-aof", server)),
    ):
        if point_in_time:
            at = restore_point(backup, target_time, undo_flushall)
            chain = find_chain(recovery, source, redis_source_id(p["redis_url"]), at, undo_flushall)
        else:
            found = find_backup(recovery, source, "redis", backup, redis_source_id(p["redis_url"]))
        target = inspect_target(recovery, p["container"], p["redis_url"], p["data_dir"] or None)
        if point_in_time:
            check_free_disk(recovery, chain.plan.raw_size, target)
            pitr = PointInTime(chain, source.backup_dir, p["gateway_health_url"])
            restore_chain(recovery, pitr, target, start_timeout_seconds)
        else:
            check_free_disk(recovery, found.manifest.raw_size, target)
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


def check_free_disk(r: Recovery, restored_size: int, t: Target) -> None:
    """The restored data (`restored_size` bytes), plus the fresh dump Redis writes of its
    current data when it is stopped (moving aside is a rename: free)."""
    with r.step("check free disk") as step:
        current = t.data / t.setup.dbfilename
        shutdown_save = current.stat().st_size if current.is_file() else 0
        needed = restored_size + shutdown_save
        free = require_free_space(t.data, needed, f"restoring {restored_size} bytes into {t.data}")
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

    def staged() -> str:  # what the stop did not hide of the decompression
        rdb, seconds = staging.result().rdb, staging.result().seconds
        return (
            f"RDB v{rdb.rdb_version}, {rdb.size} bytes, {rdb.checksum_detail}; "
            f"{seconds:.2f} s in all, from the stop's start"
        )

    def place() -> str:
        return ", ".join(place_rdb(staging.result(), t.data, t.setup))

    def start() -> CheckedLoad:
        path = t.data / t.setup.dbfilename
        rdb = staging.result().rdb
        checked = start_checked(found, rdb, path, t.redis_url, t.container, timeout)
        return replace(checked, deep_check=f"{checked.deep_check}, the RDB flushed to disk")

    def prove(checked: CheckedLoad) -> list[Check]:
        load, since, file_keys = checked.load, checked.started_at, checked.file_keys
        return prove_redis(t.redis_url, found.manifest, load, since, file_keys)

    steps = Swap(("decompress and validate the RDB", staged), ("place the RDB", place), start)
    try:
        swap_in(r, t, steps, prove, found.manifest, gateway_health_url)
    finally:
        staging.wait()  # never leave it writing into the data dir
        if staging.state.is_completed():
            staging.result().discard()  # nothing once placed


Step = tuple[str, Callable[[], str]]  # a step's name, and what it does (returns its detail)


@dataclass(frozen=True)
class Swap:
    """What a restore does in the steps all restores share: `meanwhile`, run once Redis
    is stopped (the staging the stop overlapped), `place` the data, `start` Redis on it
    (what it loaded, when it started, what checked the file alongside)."""

    meanwhile: Step | None
    place: Step
    start: Callable[[], CheckedLoad]


def swap_in(
    r: Recovery,
    t: Target,
    steps: Swap,
    prove: Callable[[CheckedLoad], list[Check]],
    manifest: Manifest,
    gateway_health_url: str,
) -> None:
    """Stop, move aside, place, start, prove (the data source's checks, for the restore
    of `manifest`); on any failure put the old data back and start Redis again."""
    moved: MovedAside | None = None
    try:
        with r.step("stop Redis") as step:
            stopped = stop_container(t.container)
            step.detail = f"container {t.container} " + (
                "stopped" if stopped else "was not running"
            )
        if steps.meanwhile:
            name, do = steps.meanwhile
            with r.step(name) as step:  # what the stop did not hide of it
                step.detail = do()
        with r.step("move current data aside") as step:
            moved = move_redis_data_aside(t.data, t.setup)
            r.moved_aside.append(str(moved.folder))
            step.detail = f"{', '.join(moved.names) or 'nothing there'} → {moved.folder}"
        with r.step(steps.place[0]) as step:
            step.detail = steps.place[1]()
        with r.step("start Redis and wait for loading:0") as step:
            checked = steps.start()
            step.detail = f"loaded {checked.load.get('rdb_last_load_keys_loaded', '?')} keys"
            step.detail += f"; alongside: {checked.deep_check}" if checked.deep_check else ""
        r.prove(prove(checked), manifest)
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


# ------------------------------------------------------------- point in time (AOF)


def restore_point(backup: str, target_time: str, undo_flushall: bool) -> int | None:
    """The second to restore to (or, with undo_flushall, to look for the flush from),
    refusing a named RDB backup alongside (the AOF pieces are the backup then)."""
    if backup != "latest":
        raise ValueError(
            f"backup={backup!r} with target_time or undo_flushall: a point in time is restored "
            "from the AOF pieces, not a named RDB backup; leave backup at `latest`"
        )
    return parse_target_time(target_time) if target_time.strip() else None


@dataclass(frozen=True)
class Chain:
    """The AOF pieces a point-in-time restore uses, found and verified."""

    plan: ChainPlan
    found: list[FoundBackup]


def find_chain(
    r: Recovery, source: BackupSource, source_id: str, at: int | None, undo_flushall: bool
) -> Chain:
    """The step "find the AOF pieces": the generation covering the time (or holding the
    last flush), its pieces up to the cut, each here else from S3, verified."""
    where = Where(
        source.backup_dir,
        source.s3_bucket,
        source.s3_prefix,
        source.s3_endpoint_url,
        source.age_identity_file,
    )
    with r.step("find the AOF pieces") as step:
        generations = load_generations(where, source_id)
        chain = plan_flush(generations, at) if undo_flushall else plan_time(generations, at or 0)
        found = [r.found(piece) for piece in fetch_chain(where, chain)]
        locations = sorted({f.location.split(" (")[0] for f in found})
        r.used_chain(chain.generation.name, chain.cut.ts, f"{', '.join(locations)}")
        step.detail = f"{chain.describe()}; each piece's size and sha256 verified"
        if chain.cut.flush:
            f = chain.cut.flush
            step.detail += f"; undoing {f['command']} on db {f['db']} at {utc(f.get('ts'))}"
    return Chain(chain, found)


@dataclass(frozen=True)
class PointInTime:
    chain: Chain
    scratch: Path  # where a dry run assembles the chain (the backup dir)
    gateway_health_url: str


def restore_chain(r: Recovery, pitr: PointInTime, t: Target, timeout: float) -> None:
    """Assemble, cut and validate the chain (in the data dir; aside for a dry run), say
    the time restored to and the last command kept, then swap it in and prove it."""
    if not t.setup.aof_enabled or not t.setup.appenddirname:
        with r.step("check the target runs an AOF") as step:
            step.detail = "appendonly is no (or Redis < 7)"
            raise AofError(
                f"Redis in {t.container} runs without a Redis 7 AOF (appendonly no): it would not "
                "load the restored AOF; set appendonly yes in its configuration and run again"
            )
    plan_ = pitr.chain.plan
    with r.step("assemble, cut and validate the AOF" + (" (dry run)" if r.dry_run else "")) as step:
        beside = pitr.scratch if r.dry_run else t.data
        staged = stage_chain(plan_, pitr.chain.found, beside, t.setup.appendfilename)
        step.detail = f"{staged.cut_detail}; {staged.check}"
    files = ", ".join(staged.files)
    try:
        r.point(plan_.cut.ts, staged.last_command, plan_.cut.how, plan_.cut.undone)
        if r.dry_run:
            r.skip("stop Redis", f"would stop container {t.container}")
            present = [n for n in t.setup.data_names() if (t.data / n).exists()]
            r.skip("move current data aside", f"would move {', '.join(present) or 'nothing'} "
                   f"into {t.data}/{t.setup.dbfilename}.before-restore-<UTC>/")  # fmt: skip
            r.skip("place the AOF", f"would place {files} as {t.setup.appenddirname}")
            return

        def place() -> str:
            return f"{files} as {', '.join(place_chain(staged, t.data, t.setup))}"

        def prove(checked: CheckedLoad) -> list[Check]:
            load, since, markers = checked.load, checked.started_at, plan_.markers()
            return prove_aof(t.redis_url, load, since, staged.base_keys, staged.size, markers)

        def start() -> CheckedLoad:
            since = time.time()
            start_container(t.container)
            return CheckedLoad(wait_until_loaded(t.redis_url, t.container, timeout), "", since)

        steps = Swap(None, ("place the AOF", place), start)
        manifest = pitr.chain.found[-1].manifest
        swap_in(r, t, steps, prove, manifest, pitr.gateway_health_url)
    finally:
        staged.discard()


if __name__ == "__main__":
    recover_redis()
