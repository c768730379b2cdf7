"""Settings: environment variables (prefix PROXILION_DR_) with documented defaults.

Read once, at the flow boundary: a flow parameter left empty takes its value
from here; tasks never read the environment.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.common.secrets import carries_credentials
from tasks.store.local import parse_keep

SETTING = "setting"  # the choice, in an enum parameter, that means "take the setting"
SETTINGS_PREFIX = "PROXILION_DR_"
# Text parameters whose empty value also means "take the setting" (the run form then
# shows a plain text box). A container name's empty value means "no container", so
# those parameters default to SETTING instead.
EMPTY_MEANS_SETTING = frozenset(
    {
        "redis_url",
        "prometheus_url",
        "gateway_url",
        "gateway_health_url",
        "backup_dir",
        "s3_bucket",
        "s3_prefix",
        "s3_endpoint_url",
        "data_dir",
        "window",
        "containers",
        "project_dir",
        "scratch_dir",
        "target_dir",
        "age_identity_file",
    }
)


def _keep_field(what: str) -> Any:
    """A kind's `*_KEEP` setting: GFS rules on top of its days and KEEP_MIN."""
    return Field(
        "",
        description=f"GFS rules for {what} on top of the days and KEEP_MIN: `daily=7 "
        "weekly=4` (hourly, daily, weekly, monthly, yearly), `compliance` (366 days).",
    )


class Settings(BaseSettings):
    """Every setting, with the default an operator gets when it is not set."""

    model_config = SettingsConfigDict(env_prefix=SETTINGS_PREFIX, extra="ignore", frozen=True)

    backup_dir: Path = Field(
        Path("/backups"),
        description="Local backup directory: a folder per kind below it (`redis/`, "
        "`prometheus/`, `config/`, `logs/`), the same layout as under the S3 prefix.",
    )
    compression: Literal["gzip", "zstd"] = Field(
        "gzip",
        description="`gzip` (isal, opens with `gunzip`) or `zstd` (`.zst`, opens with `zstd -dc`).",
    )
    keep_min: int = Field(
        3,
        description="Retention never keeps fewer complete backups of a source than this "
        "(and never deletes the newest).",
    )
    s3_bucket: str = Field(
        "", description="Upload every backup to this S3 bucket; empty = local only."
    )
    s3_prefix: str = Field(
        "proxilion",
        description="Key prefix in the bucket (the local layout below it); give each host "
        "its own when several share a bucket.",
    )
    s3_endpoint_url: str = Field(
        "",
        description="S3-compatible endpoint (SeaweedFS, MinIO…); empty = AWS. Credentials: "
        "boto3's chain (`AWS_*`), never parameters.",
    )
    s3_object_lock: Literal["", "governance", "compliance"] = Field(
        "",
        description="`governance` or `compliance`: each upload is locked until the backup's "
        "creation + its kind's retention (bucket with Object Lock); empty = none.",
    )
    backup_group_read: bool = Field(
        False,
        description="`false`: backup folders and files are owner-only (0700/0600); `true`: "
        "the group may read them (0750/0640).",
    )
    age_recipients: str = Field(
        "",
        description="age public keys (`age1…`, comma- or space-separated) S3 copies are "
        "encrypted to (name + `.age`); empty = plain S3 copies.",
    )
    age_identity_file: str = Field(
        "",
        description="Path of the age private key file recoveries and the drill decrypt "
        "encrypted backups with (never the key itself).",
    )
    age_encrypt_local: bool = Field(
        False,
        description="`true`: the local copy is age-encrypted too (needs AGE_RECIPIENTS); "
        "`false`: it stays plain gzip/zstd.",
    )

    redis_url: str = Field(
        "redis://localhost:6379/0",
        description="Redis to back up (`redis://user:password@host:port/db`, `rediss://`, "
        "`unix:///path?db=0`); percent-encode the credentials.",
    )
    redis_container: str = Field(
        "proxilion-redis",
        description="Container running Redis (`fetch=container`, save-failure reasons, "
        "recoveries); empty = none.",
    )
    redis_fetch: Literal["auto", "container", "path", "network"] = Field(
        "auto",
        description="How the RDB leaves Redis: `container` (Docker archive API), `path` "
        "(host folder), `network` (replication stream) or `auto`.",
    )
    redis_data_dir: str = Field(
        "",
        description="Host folder holding Redis's RDB, for `fetch=path`; empty = Redis's own `dir`.",
    )
    redis_retention_days: float = Field(
        7, description="Delete a source's Redis backups older than this, in days."
    )
    redis_keep: str = _keep_field("Redis backups")
    redis_save_timeout_seconds: float = Field(
        600, description="Deadline for BGSAVE to finish, in seconds."
    )
    redis_deep_check: bool = Field(
        False,
        description="Also run `redis-check-rdb` on every backup (restores always do).",
    )
    gateway_health_url: str = Field(
        "",
        description="The gateway's `/health`, checked by recover-redis after the restore; "
        "empty = no check.",
    )

    prometheus_url: str = Field(
        "http://localhost:9090",
        description="Prometheus to back up (started with `--web.enable-admin-api`).",
    )
    prometheus_container: str = Field(
        "prometheus",
        description="Its container (`fetch=container`, deleting the snapshot, recoveries); "
        "empty = none.",
    )
    prometheus_fetch: Literal["auto", "container", "path"] = Field(
        "auto",
        description="`container` (Docker archive API), `path` (TSDB folder on this host) "
        "or `auto`.",
    )
    prometheus_data_dir: str = Field(
        "",
        description="Host folder of the TSDB, for `fetch=path` (and `promtool` facts).",
    )
    prometheus_retention_days: float = Field(
        30, description="Delete a source's Prometheus backups older than this, in days."
    )

    prometheus_keep: str = _keep_field("Prometheus backups")
    config_project_dir: Path = Field(
        Path("/opt/proxilion"),
        description="The compose project backup-config keeps; recover-host restores into "
        "it when `target_dir` is empty.",
    )
    config_env_allowlist: str = Field(
        "MODE,SESSION_STORE,ALERT_THRESHOLD,BLOCK_THRESHOLD,SESSION_TTL_HOURS",
        description="Environment variables to keep (comma-separated); secret-looking ones "
        "are withheld.",
    )
    config_env_container: str = Field(
        "proxilion-gateway",
        description="Read the environment from this container's config; empty = this process.",
    )
    config_retention_days: float = Field(
        90, description="Delete a source's config backups older than this, in days."
    )

    config_keep: str = _keep_field("config backups")
    gateway_container: str = Field(
        "proxilion-gateway", description="The gateway's container, for recover-gateway."
    )
    gateway_url: str = Field(
        "http://localhost:8787",
        description="The gateway's base URL (`/health`, `/metrics` below it), for "
        "recover-gateway and recover-host.",
    )

    logs_containers: str = Field(
        "proxilion-gateway",
        description="Containers whose logs backup-logs keeps (comma-separated; one file, a "
        "block per container).",
    )
    logs_window: str = Field(
        "24h", description="How far back backup-logs reads (`30m`, `24h`, `7d`)."
    )
    logs_retention_days: float = Field(
        30, description="Delete a source's log backups older than this, in days."
    )

    logs_keep: str = _keep_field("log backups")
    pushgateway_url: str = Field(
        "",
        description="Pushgateway every backup, recovery and drill pushes its outcome to "
        "(a failed push is a warning); empty = no push.",
    )
    drill_scratch_dir: Path = Field(
        Path("/var/tmp/proxilion-dr-drill"),
        description="Where verify-restore keeps its scratch data (a `drill-<run id>` "
        "folder, removed after the drill).",
    )
    schedule_timezone: str = Field(
        "UTC",
        description="IANA time zone (`Europe/Berlin`) of every deployment's cron, for "
        "`serve` and `python -m deployments yaml`.",
    )

    @field_validator("redis_keep", "prometheus_keep", "config_keep", "logs_keep")
    @classmethod
    def _known_rules(cls, value: str) -> str:
        parse_keep(value)  # raises naming the rules and presets it accepts
        return value

    @field_validator("schedule_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as UTC or Europe/Berlin"
            ) from None
        return value

    # A credential (Slack and Mattermost webhook URLs are): hidden from repr and logs.
    notify_webhook_url: SecretStr = Field(
        SecretStr(""),
        description="Webhook failed, crashed and late runs are posted to (`python -m "
        "deployments apply`); a credential, never logged; empty = nobody is notified.",
    )


def settings() -> Settings:
    """The settings as the environment says now (parsed again only when a PROXILION_DR_*
    variable changed: a run asks for them several times)."""
    ours = (item for item in os.environ.items() if item[0].upper().startswith(SETTINGS_PREFIX))
    return _settings(tuple(sorted(ours)))


@functools.lru_cache(maxsize=8)
def _settings(_environment: tuple[tuple[str, str], ...]) -> Settings:
    return Settings()


class SecretParameter(ValueError):
    """A credential given as a flow parameter, which Prefect stores and shows."""


def refuse_secret_parameters(parameters: dict[str, Any], *names: str) -> None:
    """Refuse a parameter that carries credentials, before any work: Prefect stores
    flow-run parameters as given and shows them in its UI. The PROXILION_DR_*
    environment variable keeps them out of sight."""
    for name in names:
        value = parameters.get(name)
        if isinstance(value, str) and carries_credentials(value):
            setting = f"PROXILION_DR_{name.upper()}" if name in Settings.model_fields else None
            where = setting or "its PROXILION_DR_* setting (docs/settings.md)"
            raise SecretParameter(
                f"parameter {name} carries a password, and Prefect shows flow-run parameters "
                f"in its UI: put the URL in {where} instead and leave the parameter empty "
                "(change that password if the run was shared)"
            )


def resolve(parameters: dict[str, Any], **setting_names: str) -> dict[str, Any]:
    """Flow parameters with every `None` or `"setting"` (or `""`, for the parameters
    in EMPTY_MEANS_SETTING) replaced by its setting: the setting of the same name, or
    the one `setting_names` maps it to (`container="redis_container"`). A flag left off
    (`False`) takes its setting."""
    current = settings()
    resolved = {}
    for name, value in parameters.items():
        setting = setting_names.get(name, name)
        flag_off = value is False and isinstance(getattr(current, setting, None), bool)
        empty = value == "" and name in EMPTY_MEANS_SETTING
        unset = value is None or value == SETTING or flag_off or empty
        if unset and hasattr(current, setting):  # keep_daily=None has no setting of its own
            value = getattr(current, setting)
        resolved[name] = value
    return resolved
