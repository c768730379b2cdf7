"""backup-redis: snapshot Redis session state and keep it safe, here and off-site.

Runbook steps: trigger save, copy the RDB out while Redis writes it (or over the
replication stream), validate, compress and checksum, to.backup_dir (manifest last),
upload, prune, report.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

from flows.support.failures import explains_failure, run_name
from flows.support.hooks import FLOW_HOOKS
from flows.support.keeping import Destination, keep_backup
from flows.support.parameter_docs import shared_args
from flows.support.parameters import dr_flow
from flows.support.pushes import backup_failed, backup_succeeded, with_hooks
from flows.support.settings import SETTING, resolve, settings
from tasks.common.clock import elapsed
from tasks.common.locks import exclusive, lock_name
from tasks.common.redis_url import parse_redis_url
from tasks.redis.capture import capture_rdb, choose_fetch, describe, redis_manifest
from tasks.redis.sample import sample_after_save, sample_before_save
from tasks.redis.save import start_save
from tasks.redis.server import inspect_redis
from tasks.store.archive import Compression, check_compression
from tasks.store.kinds import redis_source_id
from tasks.store.local import new_backup_name, prepare_backup_dir, staging_path

FAILED = backup_failed(
    "redis", lambda p: redis_source_id(p.get("redis_url") or settings().redis_url)
)


@dr_flow(
    name="backup-redis",
    flow_run_name=run_name("redis"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, FAILED),
)
@explains_failure
@shared_args
def backup_redis(
    redis_url: str = "",
    container: str = SETTING,
    fetch: Literal["setting", "auto", "container", "path", "network"] = "setting",
    data_dir: str = "",
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
    compression: Literal["setting", "gzip", "zstd"] = "setting",
    retention_days: float | None = None,
    keep_min: int | None = None,
    keep_hourly: int | None = None,
    keep_daily: int | None = None,
    keep_weekly: int | None = None,
    keep_monthly: int | None = None,
    keep_yearly: int | None = None,
    deep_check: bool = False,
    save_timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """Back up one Redis to `backup_dir/redis/dump_<UTC>_<tag>.rdb.gz` (and S3), then
    prune this server's backups (`<tag>` names the server: host and port).

    Empty parameters and `setting` take their PROXILION_DR_* setting. Returns the
    backup's manifest.

    Args:
        redis_url: Redis to back up. Empty: PROXILION_DR_REDIS_URL (default
            redis://localhost:6379/0). A URL with a password is refused here (the UI
            shows parameters): put it in PROXILION_DR_REDIS_URL.
        container: Docker container running that Redis, for `fetch` container.
            `setting`: PROXILION_DR_REDIS_CONTAINER (default proxilion-redis).
            Empty: no container (Redis runs on a host; fetch by path or network).
        fetch: How the RDB leaves Redis: `container` (Docker archive API), `path`
            (Redis's folder on this host, `data_dir`), `network` (replication stream,
            for a replica or a remote host), `auto` (the first that works).
            `setting`: PROXILION_DR_REDIS_FETCH (default auto).
        data_dir: Redis's data folder on this host, for `fetch` path. Empty:
            PROXILION_DR_REDIS_DATA_DIR (default: none).
        {backup_destination}
        retention_days: Days a backup of this server is kept. None:
            PROXILION_DR_REDIS_RETENTION_DAYS (default 7).
        {gfs_rules:REDIS}
        deep_check: Also validate the RDB with redis-check-rdb (slower). Also on when
            PROXILION_DR_REDIS_DEEP_CHECK is true (default false).
        save_timeout_seconds: Seconds to wait for the BGSAVE to finish. None:
            PROXILION_DR_REDIS_SAVE_TIMEOUT_SECONDS (default 600).
    """
    p = resolve(
        locals(),
        container="redis_container",
        fetch="redis_fetch",
        data_dir="redis_data_dir",
        retention_days="redis_retention_days",
        deep_check="redis_deep_check",
        save_timeout_seconds="redis_save_timeout_seconds",
    )
    started = time.perf_counter()
    to = Destination.from_parameters(p, "redis")
    codec: Compression = check_compression(p["compression"])
    target = parse_redis_url(p["redis_url"])  # refuses a URL redis-py would misread
    server = target.where
    source_id = redis_source_id(p["redis_url"])
    with exclusive(lock_name("backup-redis", target.server)):
        prepare_backup_dir(to.backup_dir, "redis", to.modes)
        facts = inspect_redis(p["redis_url"])
        method = choose_fetch(
            p["fetch"], p["container"] or None, p["data_dir"] or None, facts, p["redis_url"]
        )
        sample = sample_before_save(p["redis_url"], facts.keyspace)
        save = None
        if method != "network":  # the replication stream makes its own snapshot
            save = start_save(  # returns once Redis has forked the snapshot
                p["redis_url"],
                p["save_timeout_seconds"],
                p["container"] if method == "container" else None,
            )
            sample = sample_after_save(p["redis_url"], sample)  # while the fork writes
        name = new_backup_name(to.backup_dir, "redis", codec, source_id)
        captured = capture_rdb(  # follows the file the save writes, ends with the save
            method,
            p["redis_url"],
            p["container"] or None,
            p["data_dir"] or None,
            facts,
            staging_path(to.backup_dir, name),
            codec,
            p["deep_check"],
            save,
            network_fallback=p["fetch"] == "auto",
            encrypt=to.age_copy,
        )
        if captured.save is None:  # the snapshot the stream made
            sample = sample_after_save(p["redis_url"], sample)
        manifest = redis_manifest(
            name, captured, facts, server, captured.save, elapsed(started), source_id, sample
        )
        stored, remote = keep_backup(
            captured.file,
            manifest,
            to,
            {
                **describe(manifest),
                "server": server,
                "keys": sum(db["keys"] for db in manifest.source["keyspace"].values()),
                "fetch": captured.method,
            },
        )
    backup_succeeded(to.backup_dir, manifest, elapsed(started))
    print(f"Backup stored at {stored}" + (f" and {remote}" if remote else ""))
    return asdict(manifest)


if __name__ == "__main__":
    backup_redis()
