"""Every deployment: name, flow, schedule. The one source of truth for both
`python -m deployments serve` and the generated prefect.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

from tasks.store.kinds import KINDS


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of one flow; `cron` is None for flows launched by hand. At most
    `concurrency_limit` runs of it at once; a further run waits for the slot
    (AwaitingConcurrencySlot in the UI)."""

    name: str
    entrypoint: str
    cron: str | None
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ("proxilion-dr",)
    concurrency_limit: int = 1

    @property
    def flow_name(self) -> str:
        return self.entrypoint.rsplit(":", 1)[1].replace("_", "-")

    @property
    def interval(self) -> timedelta | None:
        """The longest gap between two scheduled runs (None when launched by hand): a
        steady interval's step, else found over a year of the cron's times."""
        if not self.cron:
            return None
        steady = steady_interval(self.cron)
        return steady.every if steady else cron_interval(self.cron)


@cache
def cron_interval(cron: str) -> timedelta:
    """The longest gap between consecutive times of a cron expression over a year
    (`0 3 * * 0` → 7 days): what "2 × its interval" means for an irregular schedule."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    times = croniter(cron, start)
    previous = times.get_next(datetime)
    longest = timedelta(0)
    while previous < start + timedelta(days=366):
        current = times.get_next(datetime)
        longest = max(longest, current - previous)
        previous = current
    return longest


MINUTE_STEP = re.compile(r"\*(?:/(\d+))? \* \* \* \*")  # * * * * *, */N * * * *
HOURLY_STEP = re.compile(r"(\d+) \*(?:/(\d+))? \* \* \*")  # M * * * *, M */N * * *
WEEKLY = re.compile(r"(\d+) (\d+) \* \* ([0-6])")  # M H * * D
A_SUNDAY = datetime(2026, 1, 4)


@dataclass(frozen=True)
class Steady:
    """A cron that is a fixed interval from an anchor (wall-clock time in the schedule's
    time zone). Prefect's deployments page names an interval in a few words ("Every 6
    hours", "Hourly", "Every 7 days") but hides a cron's longer description ("At 0
    minutes past the hour, every 6 hours") behind a "+1" badge."""

    every: timedelta
    anchor: datetime

    def anchor_in(self, timezone: str) -> datetime:
        """The anchor as that wall-clock time in `timezone` (Prefect reads a naive one
        as UTC)."""
        return self.anchor.replace(tzinfo=ZoneInfo(timezone))


def steady_interval(cron: str) -> Steady | None:
    """`cron` as the same times at a fixed interval, or None when it is not one: a
    minute step dividing the hour (`* * * * *`), an hour step dividing the day
    (`7 * * * *`, `0 */6 * * *`) or one weekday (`0 3 * * 0`).
    Sub-day intervals are counted in real hours, so in a zone with daylight saving
    time they keep 6 h apart across the change (a cron would jump by an hour)."""
    if minutely := MINUTE_STEP.fullmatch(cron):
        step = int(minutely.group(1) or 1)
        if 60 % step == 0:
            return Steady(timedelta(minutes=step), datetime(2026, 1, 1))
    if hourly := HOURLY_STEP.fullmatch(cron):
        minute, step = int(hourly.group(1)), int(hourly.group(2) or 1)
        if minute < 60 and 24 % step == 0:
            return Steady(timedelta(hours=step), datetime(2026, 1, 1, 0, minute))
    if weekly := WEEKLY.fullmatch(cron):
        minute, hour, weekday = (int(g) for g in weekly.groups())
        if minute < 60 and hour < 24:
            return Steady(
                timedelta(days=7), A_SUNDAY + timedelta(days=weekday, hours=hour, minutes=minute)
            )
    return None


def backup_intervals() -> dict[str, timedelta]:
    """Per backup kind (`redis`, …), the interval within which a scheduled run stores a
    new backup: the longest of its flow's schedules (the hourly `on-change` config run
    stores only on change; the weekly forced one always stores)."""
    intervals: dict[str, timedelta] = {}
    for spec in DEPLOYMENTS:
        kind = spec.flow_name.removeprefix("backup-")
        if spec.interval and kind in KINDS:
            intervals[kind] = max(intervals.get(kind, timedelta(0)), spec.interval)
    return intervals


DEPLOYMENTS: tuple[DeploymentSpec, ...] = (
    DeploymentSpec(
        name="every-6-hours",
        entrypoint="flows/backup_redis.py:backup_redis",
        cron="0 */6 * * *",
        description="Redis session state: snapshot, store, upload, keep 7 days.",
        tags=("proxilion-dr", "backup", "redis"),
    ),
    DeploymentSpec(
        name="every-minute",
        entrypoint="flows/backup_redis_aof.py:backup_redis_aof",
        cron="* * * * *",
        description="Redis point-in-time recovery: ship what is new in the AOF twice a "
        "minute (appendonly yes; aof-timestamp-enabled yes to restore to a second), kept as "
        "long as the RDB backups reach back.",
        parameters={"rounds": 2},
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
        name="gateway-down",
        entrypoint="flows/recover_gateway.py:recover_gateway",
        cron=None,
        description="Runbook scenario 1, launched by hand: inspect the gateway, keep its "
        "last logs, restart, recreate if still unhealthy, verify /health and /metrics.",
        tags=("proxilion-dr", "recovery", "gateway"),
    ),
    DeploymentSpec(
        name="redis-data-lost",
        entrypoint="flows/recover_redis.py:recover_redis",
        cron=None,
        description="Scenario 2, Redis data loss: restore a backup (latest or named, here "
        "or from S3), or a second (target_time) or the moment before a FLUSHALL "
        "(undo_flushall) from the shipped AOF, safely, verify, report RTO/RPO. Try dry_run first.",
        tags=("proxilion-dr", "recovery", "redis"),
    ),
    DeploymentSpec(
        name="prometheus-corrupt",
        entrypoint="flows/recover_prometheus.py:recover_prometheus",
        cron=None,
        description="Scenario 4, Prometheus corruption: restore snapshot blocks into the "
        "data dir, verify old history answers, report RTO/RPO. Try dry_run first.",
        tags=("proxilion-dr", "recovery", "prometheus"),
    ),
    DeploymentSpec(
        name="host-lost",
        entrypoint="flows/recover_host.py:recover_host",
        cron=None,
        description="Scenario 3, host lost: rebuild the compose project from the config "
        "backup (withheld secrets from secrets_env_file), restore Redis and Prometheus, "
        "start gateway → redis → prometheus → grafana verified; report = the runbook "
        "checklist. Try dry_run first.",
        tags=("proxilion-dr", "recovery", "host"),
    ),
    DeploymentSpec(
        name="dry-run-first",
        entrypoint="flows/prune_backups.py:prune_backups",
        cron=None,
        description="Retention by hand: which backups of a kind the rules (days, keep_min, "
        "GFS keep_*) would delete and which rule keeps the rest; off dry_run, delete them.",
        parameters={"dry_run": True},
        tags=("proxilion-dr", "retention"),
    ),
    DeploymentSpec(
        name="hourly",
        entrypoint="flows/backup_status.py:backup_status",
        cron="30 * * * *",
        description="The at-a-glance table (artifact backup-status): every kind's newest "
        "backup here and in S3, fresh / LATE / MISSING, size trend, last verified restore.",
        tags=("proxilion-dr", "status"),
    ),
    DeploymentSpec(
        name="monthly-1st-0400",
        entrypoint="flows/verify_restore.py:verify_restore",
        cron="0 4 1 * *",
        description="The monthly restore drill: newest backup of each kind restored into "
        "scratch containers (drill-redis, drill-gateway, drill-prometheus) and proven; "
        "report with RPO/RTO per component; fails naming each failed check.",
        tags=("proxilion-dr", "drill"),
    ),
)
