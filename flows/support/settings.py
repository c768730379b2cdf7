"""Settings: environment variables (prefix PROXILION_DR_) with documented defaults.

Read once, at the flow boundary: a flow parameter left empty takes its value
from here; tasks never read the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.common.secrets import carries_credentials

SETTING = "setting"  # the choice, in an enum parameter, that means "take the setting"
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


class Settings(BaseSettings):
    """Every setting, with the default an operator gets when it is not set."""

    model_config = SettingsConfigDict(env_prefix="PROXILION_DR_", extra="ignore")

    backup_dir: Path = Path("/backups")
    compression: Literal["gzip", "zstd"] = "gzip"
    keep_min: int = 3
    s3_bucket: str = ""
    s3_prefix: str = "proxilion"
    s3_endpoint_url: str = ""
    s3_object_lock: Literal["", "governance", "compliance"] = ""
    backup_group_read: bool = False
    age_recipients: str = ""
    age_identity_file: str = ""
    age_encrypt_local: bool = False

    redis_url: str = "redis://localhost:6379/0"
    redis_container: str = "proxilion-redis"
    redis_fetch: Literal["auto", "container", "path", "network"] = "auto"
    redis_data_dir: str = ""
    redis_retention_days: float = 7
    redis_save_timeout_seconds: float = 600
    redis_deep_check: bool = False
    gateway_health_url: str = ""

    prometheus_url: str = "http://localhost:9090"
    prometheus_container: str = "prometheus"
    prometheus_fetch: Literal["auto", "container", "path"] = "auto"
    prometheus_data_dir: str = ""
    prometheus_retention_days: float = 30

    config_project_dir: Path = Path("/opt/proxilion")
    config_env_allowlist: str = (
        "MODE,SESSION_STORE,ALERT_THRESHOLD,BLOCK_THRESHOLD,SESSION_TTL_HOURS"
    )
    config_env_container: str = "proxilion-gateway"
    config_retention_days: float = 90

    gateway_container: str = "proxilion-gateway"
    gateway_url: str = "http://localhost:8787"

    logs_containers: str = "proxilion-gateway"
    logs_window: str = "24h"
    logs_retention_days: float = 30

    pushgateway_url: str = ""
    drill_scratch_dir: Path = Path("/var/tmp/proxilion-dr-drill")
    schedule_timezone: str = "UTC"

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
    notify_webhook_url: SecretStr = SecretStr("")


def settings() -> Settings:
    """The settings as the environment says now."""
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
            raise SecretParameter(
                f"parameter {name} carries a password, and Prefect shows flow-run parameters "
                f"in its UI: put the URL in PROXILION_DR_{name.upper()} instead and leave the "
                "parameter empty (change that password if the run was shared)"
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
        resolved[name] = getattr(current, setting) if unset else value
    return resolved
