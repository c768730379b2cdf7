"""backup-redis-aof: ship Redis's append-only file continuously, for point-in-time
recovery (recover-redis `target_time`, `undo_flushall`).

Runbook steps: check the AOF (appendonly, timestamps, where its files are), write
the marker, ship the new pieces (the end of a generation a rewrite closed, a new
base, each INCR file's new bytes; each validated with redis-check-aof and scanned),
store each (manifest last) and upload it, catch up, prune the generations the RDB
backups no longer reach, report. Never asks Redis to rewrite or pause anything.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect.states import State

from flows.support.failures import explains_failure, run_name, unavailable
from flows.support.hooks import FLOW_HOOKS
from flows.support.keeping import Destination, UploadFailed, with_exposure_warnings
from flows.support.parameter_docs import shared_args
from flows.support.parameters import dr_flow
from flows.support.pushes import backup_failed, backup_succeeded, backup_unchanged, with_hooks
from flows.support.settings import SETTING, resolve, settings
from flows.support.shipping import keep_pieces, publish_aof_report, wait_for_round
from tasks.common.clock import elapsed
from tasks.common.locks import exclusive, lock_name
from tasks.common.log import run_logger
from tasks.common.redis_url import parse_redis_url
from tasks.common.secrets import redact_url
from tasks.redis.ship import (
    KIND,
    AofSetup,
    Shipper,
    inspect_aof,
    load_shipped,
    redis_time,
    release_links,
    ship_aof,
    write_marker,
)
from tasks.store.archive import check_compression
from tasks.store.kinds import redis_source_id
from tasks.store.local import prepare_backup_dir

FAILED = backup_failed(KIND, lambda p: redis_source_id(p.get("redis_url") or settings().redis_url))


@dr_flow(
    name="backup-redis-aof",
    flow_run_name=run_name("redis aof"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, FAILED),
)
@explains_failure
@shared_args
def backup_redis_aof(
    redis_url: str = "",
    container: str = SETTING,
    data_dir: str = "",
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
    compression: Literal["setting", "gzip", "zstd"] = "setting",
    retention_days: float | None = None,
    keep_min: int | None = None,
    rounds: int = 1,
) -> dict[str, Any] | State[Any]:
    """Ship what is new in the AOF of one Redis (`appendonly yes`) to
    `backup_dir/redis-aof/<tag>/<generation>/` (and S3): point-in-time recovery.

    Each BASE file once, each INCR file as it grows (closed ones whole, the open one's
    new bytes), each piece validated with redis-check-aof, checksummed, its manifest
    written last. A marker written first (a field of the hash proxilion-dr:pitr-markers)
    must be in the pieces: it proves they are this Redis's AOF, and lets a restore to
    a time be checked. Without `aof-timestamp-enabled yes` the pieces still ship, and
    the report says why point-in-time recovery is unavailable. With `appendonly no`
    the run ends `Unavailable`. Returns what was shipped.

    Args:
        redis_url: Redis whose AOF is shipped. Empty: PROXILION_DR_REDIS_URL (default
            redis://localhost:6379/0). A URL with a password is refused here (the UI
            shows parameters): put it in PROXILION_DR_REDIS_URL.
        container: Docker container running that Redis: its mount of Redis's `dir`
            is where the AOF is read on this host. `setting`:
            PROXILION_DR_REDIS_CONTAINER (default proxilion-redis). Empty: Redis runs
            on this host (its own `dir`), or data_dir says where.
        data_dir: Host folder holding Redis's appendonlydir (overrides the container's
            mount). Empty: PROXILION_DR_REDIS_DATA_DIR (default: none).
        {backup_destination}
        retention_days: Days of RDB backups the AOF follows: AOF generations are kept
            while the RDB backups of this server kept by age reach back to them. None:
            PROXILION_DR_REDIS_RETENTION_DAYS (default 7).
        rounds: Ship this many times in the run, spread over a minute (round k starts
            60 × k / rounds seconds after the first): the every-minute deployment
            ships twice, so a write waits about 30 s plus a round, not a minute.
    """
    p = resolve(
        locals(),
        container="redis_container",
        data_dir="redis_data_dir",
        retention_days="redis_retention_days",
    )
    started = time.monotonic()
    to = Destination.from_parameters(p, "redis")
    source_id = redis_source_id(p["redis_url"])
    with exclusive(lock_name("backup-redis-aof", parse_redis_url(p["redis_url"]).server)):
        setup = inspect_aof(p["redis_url"], p["container"] or None, p["data_dir"] or None)
        if setup.unavailable:
            pitr = f"UNAVAILABLE: {setup.unavailable}"
            run_logger().warning("point-in-time recovery %s", pitr)
            publish_aof_report(None, None, {"point-in-time recovery": pitr})
            backup_unchanged(KIND, source_id)
            return unavailable(setup.unavailable, {"shipped": [], "unavailable": pitr})
        if setup.no_pitr:
            run_logger().warning("point-in-time recovery UNAVAILABLE: %s", setup.no_pitr)
        prepare_backup_dir(to.backup_dir, KIND, to.modes)
        done = []
        for round_ in range(max(rounds, 1)):
            wait_for_round(started, round_, rounds)
            done.append(ship_round(p, setup, to, source_id))
    shipped = [name for r in done for name in r["shipped"]]
    print(f"Shipped {len(shipped)} AOF piece(s) in {len(done)} round(s): {done[-1]['generation']}")
    return {**done[-1], "shipped": shipped, "rounds": done}


def ship_round(
    p: dict[str, Any], setup: AofSetup, to: Destination, source_id: str
) -> dict[str, Any]:
    """One round: marker, what was shipped, the new pieces, stored and uploaded, report."""
    began = time.perf_counter()
    marker = write_marker(p["redis_url"], to.retention.days + 1)
    shipped = load_shipped(to.backup_dir, source_id, to.s3_bucket, to.s3_prefix, to.s3_endpoint_url)
    facts = {
        "server": redact_url(p["redis_url"]),
        "redis_version": setup.redis_version,
        "read_at": redis_time(p["redis_url"]),
        "timestamps_enabled": not setup.no_pitr,
    }
    codec = check_compression(p["compression"])
    shipper = Shipper(to.backup_dir, source_id, codec, to.age_copy, facts)
    run = ship_aof(setup, p["redis_url"], marker, shipped, shipper)
    pitr = f"UNAVAILABLE: {setup.no_pitr}" if setup.no_pitr else "available (timestamps on)"
    report = {
        "server": source_id,
        "point-in-time recovery": pitr,
        "AOF read from": str(setup.folder),
        "marker": f"{marker.field} = {marker.nonce}",
    }
    report = with_exposure_warnings(to, KIND, report)
    try:
        kept = keep_pieces(run, shipped, to, source_id)
    except UploadFailed as failed:
        publish_aof_report(run, None, report, failed.error)
        raise failed.error from None
    verified_at = time.time()
    publish_aof_report(run, kept, report)
    release_links(setup.data_dir, run.generation, run.link)
    if run.pieces:
        backup_succeeded(to.backup_dir, run.pieces[-1].manifest, elapsed(began))
    return {
        "generation": run.generation,
        "new_generation": run.new_generation,
        "shipped": [s.manifest.name for s in run.pieces],
        "marker": {
            "field": marker.field,
            "nonce": marker.nonce,
            "written_at": marker.written_at,
            "piece": run.marker_piece,
        },
        "verified_at": verified_at,
        "point_in_time": not setup.no_pitr,
        "no_pitr": setup.no_pitr,
        "uploaded": kept.uploaded,
        "caught_up": kept.caught_up,
        "notes": run.notes,
    }


if __name__ == "__main__":
    backup_redis_aof()
