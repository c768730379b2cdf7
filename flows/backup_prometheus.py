"""backup-prometheus: snapshot the Prometheus TSDB and keep it safe, here and off-site.

Runbook steps: snapshot through the admin API, copy the snapshot out, tar, compress
and checksum, store (manifest last), upload, prune, report — and always delete the
snapshot, which holds disk until removed.
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
from tasks.common.secrets import check_url, redact_url, url_server
from tasks.prometheus.api import inspect_prometheus
from tasks.prometheus.capture import (
    copy_snapshot,
    delete_snapshot,
    describe,
    locate_tsdb,
    prometheus_manifest,
    record_values,
    remove_leftover_snapshot,
    take_snapshot,
)
from tasks.store.archive import Compression, check_compression
from tasks.store.kinds import prometheus_source_id
from tasks.store.local import new_backup_name, prepare_backup_dir, staging_path

FAILED = backup_failed(
    "prometheus",
    lambda p: prometheus_source_id(p.get("prometheus_url") or settings().prometheus_url),
)


@dr_flow(
    name="backup-prometheus",
    flow_run_name=run_name("prometheus"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, FAILED),
)
@explains_failure
@shared_args
def backup_prometheus(
    prometheus_url: str = "",
    container: str = SETTING,
    fetch: Literal["setting", "auto", "container", "path"] = "setting",
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
) -> dict[str, Any]:
    """Back up one Prometheus to `backup_dir/prometheus/prometheus_<UTC>_<tag>.tar.gz`
    (and S3), then prune this server's backups (`<tag>` names its URL).

    Empty parameters and `setting` take their PROXILION_DR_* setting. Returns the
    backup's manifest.

    Args:
        prometheus_url: Prometheus to back up (its admin API must be enabled). Empty:
            PROXILION_DR_PROMETHEUS_URL (default http://localhost:9090). A URL with a
            password is refused here: put it in PROXILION_DR_PROMETHEUS_URL.
        container: Docker container running that Prometheus, for `fetch` container.
            `setting`: PROXILION_DR_PROMETHEUS_CONTAINER (default prometheus).
            Empty: no container (Prometheus runs on a host; `fetch` path).
        fetch: How the snapshot leaves Prometheus: `container` (Docker archive API),
            `path` (the TSDB folder on this host, `data_dir`), `auto` (the first that
            works). `setting`: PROXILION_DR_PROMETHEUS_FETCH (default auto).
        data_dir: The TSDB folder on this host, for `fetch` path (with `container`
            it also lets promtool check the snapshot). Empty:
            PROXILION_DR_PROMETHEUS_DATA_DIR (default: none).
        {backup_destination}
        retention_days: Days a backup of this server is kept. None:
            PROXILION_DR_PROMETHEUS_RETENTION_DAYS (default 30).
        {gfs_rules:PROMETHEUS}
    """
    p = resolve(
        locals(),
        container="prometheus_container",
        fetch="prometheus_fetch",
        data_dir="prometheus_data_dir",
        retention_days="prometheus_retention_days",
    )
    started = time.perf_counter()
    to = Destination.from_parameters(p, "prometheus")
    codec: Compression = check_compression(p["compression"])
    server = redact_url(check_url(p["prometheus_url"], "prometheus_url"))
    source_id = prometheus_source_id(p["prometheus_url"])
    with exclusive(lock_name("backup-prometheus", url_server(p["prometheus_url"]))):
        prepare_backup_dir(to.backup_dir, "prometheus", to.modes)
        facts = inspect_prometheus(p["prometheus_url"])
        tsdb = locate_tsdb(p["fetch"], p["container"] or None, p["data_dir"] or None, facts)
        snapshot = take_snapshot(p["prometheus_url"], tsdb)
        try:
            name = new_backup_name(to.backup_dir, "prometheus", codec, source_id)
            staging = staging_path(to.backup_dir, name)
            captured = copy_snapshot(snapshot, staging, codec, to.age_copy)
            recorded = record_values(p["prometheus_url"], captured.blocks)
            manifest = prometheus_manifest(
                name, captured, snapshot, facts, server, elapsed(started), source_id, recorded
            )
            stored, remote = keep_backup(
                captured.file,
                manifest,
                to,
                {
                    **describe(manifest),
                    "server": server,
                    "snapshot": snapshot.name,
                    "blocks": manifest.source["blocks"],
                    "fetch": captured.method,
                },
            )
        except BaseException:
            remove_leftover_snapshot(snapshot)  # the first error is the one to show
            raise
        delete_snapshot(snapshot)
    backup_succeeded(to.backup_dir, manifest, elapsed(started))
    print(f"Backup stored at {stored}" + (f" and {remote}" if remote else ""))
    return asdict(manifest)


if __name__ == "__main__":
    backup_prometheus()
