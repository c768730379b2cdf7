"""backup-logs: keep the gateway's recent container logs, here and off-site.

Runbook steps: export the container logs of the window (stdout and stderr, with
timestamps), compress, store (manifest last), upload, prune, report.
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
from flows.support.settings import resolve, settings
from tasks.common.clock import elapsed, utc_now
from tasks.common.locks import exclusive, lock_name
from tasks.logs.capture import (
    LOG_LINE_FORMAT,
    capture_logs,
    container_names,
    find_log_sources,
    logs_manifest,
    parse_window,
)
from tasks.store.archive import Compression, check_compression
from tasks.store.kinds import logs_source_id
from tasks.store.local import backup_name, prepare_backup_dir, staging_path

FAILED = backup_failed(
    "logs",
    lambda p: logs_source_id(container_names(p.get("containers") or settings().logs_containers)),
)


@dr_flow(
    name="backup-logs",
    flow_run_name=run_name("logs"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, FAILED),
)
@explains_failure
@shared_args
def backup_logs(
    containers: list[str] | str = "",
    window: str = "",
    read: Literal["auto", "api", "file"] = "auto",
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
    """Back up the last `window` of container logs to
    `backup_dir/logs/gateway_<UTC>_<tag>.log.gz` (and S3), then prune the backups of
    the same containers (`<tag>` names the set of containers).

    Several containers go into ONE file, one container after the other (each in time
    order); every line reads `<timestamp> <container> <stream> <message>`, so
    `zgrep ' proxilion-gateway stderr '` or `sort` work on it. Empty parameters and
    `setting` take their PROXILION_DR_* setting. Returns the backup's manifest.

    Args:
        containers: Containers whose logs are kept: a list or a comma-separated
            string. Empty: PROXILION_DR_LOGS_CONTAINERS (default proxilion-gateway).
        window: How far back from now, with its unit: `30m`, `24h`, `7d`. Empty:
            PROXILION_DR_LOGS_WINDOW (default 24h).
        read: How logs leave Docker: `api` (Engine API, any log driver), `file` (the
            json-file log on this host, much faster) or `auto` (file when possible).
        {backup_destination}
        retention_days: Days a backup of these containers is kept. None:
            PROXILION_DR_LOGS_RETENTION_DAYS (default 30).
        {gfs_rules:LOGS}
    """
    p = resolve(
        locals(),
        containers="logs_containers",
        window="logs_window",
        retention_days="logs_retention_days",
    )
    started = time.perf_counter()
    to = Destination.from_parameters(p, "logs")
    store = to.backup_dir
    codec: Compression = check_compression(p["compression"])
    names = container_names(p["containers"])
    source_id = logs_source_id(names)
    until = utc_now()
    since = until - parse_window(p["window"])
    with exclusive(lock_name("backup-logs", str(store))):
        prepare_backup_dir(store, "logs", to.modes)
        sources = find_log_sources(names, p["read"])
        name = backup_name("logs", until, codec, source_id)
        staging = staging_path(store, name)
        captured = capture_logs(sources, since, until, staging, codec, to.age_copy)
        manifest = logs_manifest(name, captured, p["window"], elapsed(started), source_id)
        stored, remote = keep_backup(
            captured.file,
            manifest,
            to,
            {
                "containers": ", ".join(f"{s.name} (read via {s.read})" for s in sources),
                "window": f"{p['window']} ({captured.since} → {captured.until})",
                "lines": captured.lines,
                "stderr lines": sum(s.stderr_lines for s in captured.containers.values()),
                "line format": LOG_LINE_FORMAT,
            },
        )
    backup_succeeded(store, manifest, elapsed(started))
    print(f"{captured.lines} log lines stored at {stored}" + (f" and {remote}" if remote else ""))
    return asdict(manifest)


if __name__ == "__main__":
    backup_logs()
