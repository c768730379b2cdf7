"""backup-config: keep the stack's configuration, without its secrets, here and off-site.

Runbook steps: copy the compose files, the allow-listed environment (excluding
secrets), the Prometheus config and rules and the Grafana dashboards, compress,
store (manifest last), upload, prune, report. Runs weekly and "on change": when
nothing differs from the newest backup, the run records that and stores nothing.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from flows.support.failures import explains_failure, run_name, unchanged
from flows.support.hooks import FLOW_HOOKS
from flows.support.keeping import Destination, keep_backup, with_exposure_warnings
from flows.support.parameter_docs import shared_args
from flows.support.parameters import dr_flow
from flows.support.pushes import backup_failed, backup_succeeded, backup_unchanged, with_hooks
from flows.support.settings import SETTING, resolve, settings
from tasks.common.clock import elapsed
from tasks.common.locks import exclusive, lock_name
from tasks.config.capture import (
    NewestBackup,
    allowlist_names,
    check_newest,
    config_details,
    config_digest,
    config_manifest,
    config_source,
    publish_unchanged_report,
    read_env,
    read_project_files,
    write_config_archive,
)
from tasks.store.archive import Compression, check_compression
from tasks.store.kinds import config_source_id
from tasks.store.local import new_backup_name, prepare_backup_dir, staging_path

FAILED = backup_failed(
    "config", lambda p: config_source_id(p.get("project_dir") or settings().config_project_dir)
)


@dr_flow(
    name="backup-config",
    flow_run_name=run_name("config"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, FAILED),
)
@explains_failure
@shared_args
def backup_config(
    project_dir: str = "",
    env_allowlist: list[str] | None = None,
    env_container: str = SETTING,
    force: bool = False,
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
    """Back up the configuration in `project_dir` and the allow-listed environment to
    `backup_dir/config/config_<UTC>_<tag>.tar.gz` (and S3), then prune this
    project's config backups (`<tag>` names the project folder).

    Secrets are never stored: secret-looking variables are withheld (named in the
    report), secrets in the YAML and JSON files (values of secret keys, command-line
    passwords, in comments too) are replaced. When the content equals the newest
    complete backup's, nothing is stored and the run ends in a Completed state named
    `Unchanged`; `force` stores anyway. A newest backup that fails its checksum is
    never trusted: a new one is stored and the report names the damaged one. Empty
    parameters and `setting` take their PROXILION_DR_* setting. Returns the new
    backup's manifest, or `{"skipped": True, "unchanged_since": <name>, "digest": ...}`.

    Args:
        project_dir: Folder with the compose files, prometheus.yml, alerts.yml and
            grafana/dashboards/. Empty: PROXILION_DR_CONFIG_PROJECT_DIR (default
            /opt/proxilion).
        env_allowlist: Environment variables kept (names; secret-looking ones are
            withheld anyway). None: PROXILION_DR_CONFIG_ENV_ALLOWLIST (default
            MODE, SESSION_STORE, ALERT_THRESHOLD, BLOCK_THRESHOLD, SESSION_TTL_HOURS).
        env_container: Container whose environment is read (the gateway).
            `setting`: PROXILION_DR_CONFIG_ENV_CONTAINER (default proxilion-gateway).
            Empty (here or in the setting): this process's environment.
        force: Store a backup even when nothing changed (the weekly deployment).
        {backup_destination}
        retention_days: Days a backup of this project is kept. None:
            PROXILION_DR_CONFIG_RETENTION_DAYS (default 90).
        {gfs_rules:CONFIG}
    """
    p = resolve(
        locals(),
        project_dir="config_project_dir",
        env_allowlist="config_env_allowlist",
        env_container="config_env_container",
        retention_days="config_retention_days",
    )
    started = time.perf_counter()
    to = Destination.from_parameters(p, "config")
    store = to.backup_dir
    codec: Compression = check_compression(p["compression"])
    source_id = config_source_id(p["project_dir"])
    with exclusive(lock_name("backup-config", str(store))):
        prepare_backup_dir(store, "config", to.modes)
        files = read_project_files(Path(p["project_dir"]))
        env = read_env(
            allowlist_names(p["env_allowlist"]), p["env_container"] or None, Path(p["project_dir"])
        )
        digest = config_digest(files, env)
        source = config_source(files, env, digest)
        newest = NewestBackup() if p["force"] else check_newest(store, digest, source_id)
        if newest.unchanged_since:
            previous = newest.unchanged_since
            publish_unchanged_report(previous, source, with_exposure_warnings(to, "config", {}))
            print(f"Configuration unchanged since {previous}: nothing new stored")
            backup_unchanged("config", source_id)
            result = {"skipped": True, "unchanged_since": previous, "digest": digest}
            return unchanged(f"configuration unchanged since {previous}: nothing stored", result)
        name = new_backup_name(store, "config", codec, source_id)
        staging = staging_path(store, name)
        archive = write_config_archive(files, env, name, staging, codec, to.age_copy)
        manifest = config_manifest(name, archive, source, elapsed(started), source_id)
        details = config_details(source)
        if newest.damaged:
            details["previous backup damaged"] = newest.damaged
        stored, remote = keep_backup(archive, manifest, to, details)
    backup_succeeded(store, manifest, elapsed(started))
    withheld = ", ".join(env.withheld) or "none"
    print(
        f"Config backup stored at {stored}"
        + (f" and {remote}" if remote else "")
        + f" ({len(files.files)} files; env withheld: {withheld})"
        + (" in place of the damaged newest backup" if newest.damaged else "")
    )
    return asdict(manifest)


if __name__ == "__main__":
    backup_config()
