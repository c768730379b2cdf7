"""backup-prometheus: snapshot the Prometheus TSDB and keep it safe, here and off-site.

Runbook steps: snapshot through the admin API, copy the snapshot out, tar, compress
and checksum, store (manifest last), upload, prune, report — and always delete the
snapshot, which holds disk until removed.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Literal

from prefect import flow

from flows.backup_health import backup_failed, backup_succeeded, with_hooks
from flows.hooks import BACKUP_HOOKS
from flows.settings import resolve, settings, warn_about_secret_parameters
from flows.steps import Destination, keep_backup
from tasks.archive import Compression, check_compression
from tasks.locks import exclusive, lock_name
from tasks.prometheus import (
    copy_snapshot,
    delete_snapshot,
    inspect_prometheus,
    locate_tsdb,
    prometheus_manifest,
    record_values,
    take_snapshot,
)
from tasks.secrets import check_url, redact_url, url_server
from tasks.sources import prometheus_source_id
from tasks.storage import backup_name, elapsed, prepare_backup_dir, staging_path, utc_now

FAILED = backup_failed(
    "prometheus",
    lambda p: prometheus_source_id(p.get("prometheus_url") or settings().prometheus_url),
)


@flow(name="backup-prometheus", log_prints=True, **with_hooks(BACKUP_HOOKS, FAILED))
def backup_prometheus(
    prometheus_url: str | None = None,
    container: str | None = None,
    fetch: Literal["auto", "container", "path"] | None = None,
    data_dir: str | None = None,
    backup_dir: str | None = None,
    s3_bucket: str | None = None,
    s3_prefix: str | None = None,
    s3_endpoint_url: str | None = None,
    compression: Literal["gzip", "zstd"] | None = None,
    retention_days: float | None = None,
    keep_min: int | None = None,
) -> dict[str, Any]:
    """Back up one Prometheus to `backup_dir/prometheus/prometheus_<UTC>_<tag>.tar.gz`
    (and S3), then prune this server's backups (`<tag>` names its URL).

    Empty parameters take their PROXILION_DR_* setting. `fetch` picks how the snapshot
    leaves Prometheus: `container` (Docker archive API), `path` (the TSDB folder on
    this host, `data_dir`) or `auto`. Giving `data_dir` with `container` also lets
    promtool check the snapshot on this host. Returns the backup's manifest.
    """
    warn_about_secret_parameters(locals(), "prometheus_url")
    p = resolve(
        locals(),
        container="prometheus_container",
        fetch="prometheus_fetch",
        data_dir="prometheus_data_dir",
        retention_days="prometheus_retention_days",
    )
    started = time.perf_counter()
    to = Destination.from_parameters(p)
    codec: Compression = check_compression(p["compression"])
    server = redact_url(check_url(p["prometheus_url"], "prometheus_url"))
    source_id = prometheus_source_id(p["prometheus_url"])
    with exclusive(lock_name("backup-prometheus", url_server(p["prometheus_url"]))):
        prepare_backup_dir(to.backup_dir, "prometheus", to.modes)
        facts = inspect_prometheus(p["prometheus_url"])
        tsdb = locate_tsdb(p["fetch"], p["container"] or None, p["data_dir"] or None, facts)
        snapshot = take_snapshot(p["prometheus_url"], tsdb)
        try:
            name = backup_name("prometheus", utc_now(), codec, source_id)
            captured = copy_snapshot(snapshot, staging_path(to.backup_dir, name), codec)
            recorded = record_values(p["prometheus_url"], captured.blocks)
            manifest = prometheus_manifest(
                name, captured, snapshot, facts, server, elapsed(started), source_id, recorded
            )
            stored, remote = keep_backup(
                captured.file,
                manifest,
                to,
                {
                    "server": server,
                    "snapshot": snapshot.name,
                    "blocks": manifest.source["blocks"],
                    "fetch": captured.method,
                },
            )
        finally:
            delete_snapshot(snapshot)
    backup_succeeded(to.backup_dir, manifest, elapsed(started))
    print(f"Backup stored at {stored}" + (f" and {remote}" if remote else ""))
    return asdict(manifest)


if __name__ == "__main__":
    backup_prometheus()
