"""backup-redis: snapshot Redis session state and keep it safe, here and off-site.

Runbook steps: trigger save, wait, copy the RDB out, validate, compress and
checksum, store (manifest last), upload, prune, report.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from prefect import flow

from flows.settings import resolve
from tasks.archive import Compression, Manifest, check_compression
from tasks.locks import exclusive, lock_name
from tasks.redis import capture_rdb, choose_fetch, inspect_redis, redact_url, trigger_save
from tasks.report import publish_backup_report
from tasks.s3 import prune_remote, upload_backup
from tasks.storage import (
    backup_name,
    commit_local,
    elapsed,
    prepare_backup_dir,
    prune_local,
    staging_path,
    utc_now,
)


@flow(name="backup-redis", log_prints=True)
def backup_redis(
    redis_url: str | None = None,
    container: str | None = None,
    fetch: Literal["auto", "container", "path", "network"] | None = None,
    data_dir: str | None = None,
    backup_dir: str | None = None,
    s3_bucket: str | None = None,
    s3_prefix: str | None = None,
    s3_endpoint_url: str | None = None,
    compression: Literal["gzip", "zstd"] | None = None,
    retention_days: float | None = None,
    keep_min: int | None = None,
    deep_check: bool | None = None,
    save_timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """Back up one Redis to `backup_dir/redis/dump_<UTC>.rdb.gz` (and S3), then prune.

    Empty parameters take their PROXILION_DR_* setting. `fetch` picks how the RDB
    leaves Redis: `container` (Docker archive API), `path` (Redis's folder on this
    host, `data_dir`), `network` (replication stream, for a replica or remote host)
    or `auto`. Returns the backup's manifest.
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
    store = Path(p["backup_dir"])
    codec: Compression = check_compression(p["compression"])
    server = redact_url(p["redis_url"])
    with exclusive(lock_name("backup-redis", server)):
        prepare_backup_dir(store, "redis")
        facts = inspect_redis(p["redis_url"])
        method = choose_fetch(p["fetch"], p["container"] or None, p["data_dir"] or None)
        save = None
        if method != "network":  # the replication stream makes its own snapshot
            save = trigger_save(
                p["redis_url"],
                p["save_timeout_seconds"],
                p["container"] if method == "container" else None,
            )
        name = backup_name("redis", utc_now(), codec)
        captured = capture_rdb(
            method,
            p["redis_url"],
            p["container"] or None,
            p["data_dir"] or None,
            facts,
            staging_path(store, name),
            codec,
            p["deep_check"],
        )
        manifest = Manifest(
            kind="redis",
            name=name,
            created_at=utc_now().isoformat(),
            size=captured.file.size,
            sha256=captured.file.sha256,
            compression=codec,
            raw_size=captured.file.raw_size,
            duration_seconds=elapsed(started),
            source={
                "server": server,
                "redis_version": facts.redis_version,
                "role": facts.role,
                "rdb_version": captured.rdb.rdb_version,
                "rdb_checksum_verified": captured.rdb.checksum_verified,
                "keyspace": facts.keyspace,
                "fetch": method,
                "deep_check": p["deep_check"],
            },
            steps={"save": save.seconds if save else 0.0, "capture": captured.seconds},
        )
        stored = commit_local(store, captured.file, manifest)
        remote = None
        if p["s3_bucket"]:
            remote = upload_backup(
                stored, manifest, p["s3_bucket"], p["s3_prefix"], p["s3_endpoint_url"] or None
            ).url
        kept_local = prune_local(store, "redis", p["retention_days"], p["keep_min"])
        kept_remote = None
        if p["s3_bucket"]:
            kept_remote = prune_remote(
                p["s3_bucket"],
                p["s3_prefix"],
                "redis",
                p["s3_endpoint_url"] or None,
                p["retention_days"],
                p["keep_min"],
            )
        publish_backup_report(
            manifest,
            str(stored),
            remote,
            kept_local,
            kept_remote,
            {
                "server": server,
                "keys": sum(db["keys"] for db in facts.keyspace.values()),
                "fetch": method,
            },
        )
    print(f"Backup stored at {stored}" + (f" and {remote}" if remote else ""))
    return asdict(manifest)


if __name__ == "__main__":
    backup_redis()
