"""What a restore must know about the target Prometheus before touching it: where its
TSDB lives and how long it keeps data (a restored block older than that is deleted
once it starts), from the running server or, when it does not answer, from its
container's command line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import PurePosixPath

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.clock import utc_now
from tasks.docker import containers
from tasks.prometheus.api import PrometheusError, PrometheusUnreachable, inspect_prometheus
from tasks.store.find import FoundBackup

_DURATION = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")
_UNIT_SECONDS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


class RetentionTooShort(PrometheusError):
    """The server would delete the restored blocks right after it starts."""


@dataclass
class PrometheusSetup:
    """What the restore must know about the target Prometheus, read before it is touched."""

    answered: bool
    tsdb_path: str  # inside the container
    retention: str  # e.g. "15d"; "" when unknown (Prometheus's default is 15d)


def parse_duration(text: str) -> timedelta | None:
    """A Prometheus duration (`15d`, `1y`, `2w3d`, `0s`); None when empty or unreadable."""
    text = text.strip()
    if not text or _DURATION.sub("", text):
        return None
    seconds = 0.0
    for amount, unit in _DURATION.findall(text):
        seconds += int(amount) / 1000 if unit == "ms" else int(amount) * _UNIT_SECONDS[unit]
    return timedelta(seconds=seconds)


def _flag(argv: list[str], name: str) -> str | None:
    for position, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and position + 1 < len(argv):
            return argv[position + 1]
    return None


@task(cache_policy=NO_CACHE)
def read_prometheus_setup(prometheus_url: str, container: str) -> PrometheusSetup:
    """TSDB path and retention from the running Prometheus; when it does not answer
    (crashed on a corrupt block, stopped), from its container's command line."""
    try:
        facts = inspect_prometheus.fn(prometheus_url)
        return PrometheusSetup(True, facts.tsdb_path, facts.retention)
    except PrometheusUnreachable:
        attrs = containers.get_container(container).attrs
        argv = [attrs.get("Path", ""), *attrs.get("Args", [])]
        workdir = attrs.get("Config", {}).get("WorkingDir") or "/"
        tsdb = str(PurePosixPath(workdir) / (_flag(argv, "storage.tsdb.path") or "data/"))
        retention = _flag(argv, "storage.tsdb.retention.time") or ""
        return PrometheusSetup(False, tsdb, retention)


def check_retention_covers(found: FoundBackup, setup: PrometheusSetup) -> str:
    """Refuse when the oldest restored block is older than the retention: Prometheus
    would delete it as soon as it starts."""
    oldest_ms = found.manifest.source.get("min_time_ms")
    if oldest_ms is None:
        return "the backup does not record its time range"
    age = utc_now().timestamp() - oldest_ms / 1000
    retention = parse_duration(setup.retention or "15d")
    if retention is None or retention.total_seconds() == 0:
        return f"retention {setup.retention!r} (no time limit)"
    if retention.total_seconds() < age:
        needed = int(age // 86400) + 1
        raise RetentionTooShort(
            f"the backup reaches back {age / 86400:.1f} days, but Prometheus keeps "
            f"{setup.retention or '15d (default)'}: it would delete the restored blocks at "
            f"start. Run it with --storage.tsdb.retention.time={needed}d or more, then restore"
        )
    return f"retention {setup.retention} covers {age / 86400:.1f} days of history"
