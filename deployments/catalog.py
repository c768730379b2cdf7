"""Every deployment: name, flow, schedule. The one source of truth for both
`python -m deployments serve` and the generated prefect.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of one flow; `cron` is None for flows launched by hand."""

    name: str
    entrypoint: str
    cron: str | None
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ("proxilion-dr",)

    @property
    def flow_name(self) -> str:
        return self.entrypoint.rsplit(":", 1)[1].replace("_", "-")


TIMEZONE = "UTC"

DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        name="every-6-hours",
        entrypoint="flows/backup_redis.py:backup_redis",
        cron="0 */6 * * *",
        description="Redis session state: snapshot, store, upload, keep 7 days.",
        tags=("proxilion-dr", "backup", "redis"),
    ),
    DeploymentSpec(
        name="daily-0200",
        entrypoint="flows/backup_prometheus.py:backup_prometheus",
        cron="0 2 * * *",
        description="Prometheus TSDB: snapshot, archive, upload, keep 30 days.",
        tags=("proxilion-dr", "backup", "prometheus"),
    ),
    DeploymentSpec(
        name="weekly-sunday-0300",
        entrypoint="flows/backup_config.py:backup_config",
        cron="0 3 * * 0",
        description="Compose files, Prometheus config, dashboards, allow-listed env, stored "
        "even when unchanged (the seed's weekly backup); 90 days.",
        parameters={"force": True},
        tags=("proxilion-dr", "backup", "config"),
    ),
    DeploymentSpec(
        name="on-change",
        entrypoint="flows/backup_config.py:backup_config",
        cron="7 * * * *",
        description="Hourly look at the configuration: a new backup only when its content "
        "digest differs from the newest backup's, else an 'unchanged' report.",
        tags=("proxilion-dr", "backup", "config"),
    ),
    DeploymentSpec(
        name="daily-0100",
        entrypoint="flows/backup_logs.py:backup_logs",
        cron="0 1 * * *",
        description="Last 24 h of gateway logs, streamed and compressed; 30 days.",
        tags=("proxilion-dr", "backup", "logs"),
    ),
    DeploymentSpec(
        name="manual",
        entrypoint="flows/recover_redis.py:recover_redis",
        cron=None,
        description="Scenario 2, Redis data loss: restore a backup (latest or named, here "
        "or from S3) safely, verify, report RTO/RPO. Try dry_run first.",
        tags=("proxilion-dr", "recovery", "redis"),
    ),
    DeploymentSpec(
        name="manual",
        entrypoint="flows/recover_prometheus.py:recover_prometheus",
        cron=None,
        description="Scenario 4, Prometheus corruption: restore snapshot blocks into the "
        "data dir, verify old history answers, report RTO/RPO. Try dry_run first.",
        tags=("proxilion-dr", "recovery", "prometheus"),
    ),
    DeploymentSpec(
        name="manual",
        entrypoint="flows/recover_host.py:recover_host",
        cron=None,
        description="Scenario 3, host lost: rebuild the compose project from the config "
        "backup (withheld secrets from secrets_env_file), restore Redis and Prometheus, "
        "start gateway → redis → prometheus → grafana verified; report = the runbook "
        "checklist. Try dry_run first.",
        tags=("proxilion-dr", "recovery", "host"),
    ),
)
