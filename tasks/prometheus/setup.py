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
    """The server would delete the restored blocks soon after it starts."""


# Prometheus's own default when neither a time nor a size limit is set.
DEFAULT_RETENTION = "15d"
# New data is cut into a block and compacted about this long after start; then
# retention, counted back from that newest block, deletes what is older.
FIRST_COMPACTION = timedelta(hours=2)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?i?B)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


@dataclass(frozen=True)
class Retention:
    """How long and how much Prometheus keeps, as it says itself (`storageRetention` of
    /api/v1/status/runtimeinfo: "15d", "1GiB", "30d or 10GiB"); None: no such limit."""

    said: str
    time: timedelta | None
    size: int | None

    @classmethod
    def parse(cls, said: str) -> Retention:
        time = size = None
        for part in said.split(" or "):
            part = part.strip()
            if (match := _SIZE.fullmatch(part)) is not None:
                size = int(
                    float(match[1]) * _SIZE_UNITS[match[2][0].lower() if len(match[2]) > 1 else ""]
                )
            elif (duration := parse_duration(part)) is not None and duration.total_seconds():
                time = duration
        return cls(said, time, size)


@dataclass
class PrometheusSetup:
    """What the restore must know about the target Prometheus, read before it is touched."""

    answered: bool
    tsdb_path: str  # inside the container
    retention: Retention


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


def retention_from_flags(argv: list[str]) -> Retention:
    """The retention a stopped Prometheus would start with, by its own rule: the time
    flag (or the deprecated `--storage.tsdb.retention`), the size flag; 15d when
    neither is set (a size limit alone means no time limit)."""
    time = _flag(argv, "storage.tsdb.retention.time") or _flag(argv, "storage.tsdb.retention")
    size = _flag(argv, "storage.tsdb.retention.size")
    if not time and not size:
        time = DEFAULT_RETENTION
    return Retention.parse(" or ".join(part for part in (time, size) if part))


@task(cache_policy=NO_CACHE)
def read_prometheus_setup(prometheus_url: str, container: str) -> PrometheusSetup:
    """TSDB path and the retention it applies (runtimeinfo's `storageRetention`: the
    flags say `0s` when Prometheus keeps its default 15 days) from the running
    Prometheus; when it does not answer (crashed on a corrupt block, stopped), from its
    container's command line."""
    try:
        facts = inspect_prometheus.fn(prometheus_url)
        return PrometheusSetup(True, facts.tsdb_path, Retention.parse(facts.retention))
    except PrometheusUnreachable:
        attrs = containers.get_container(container).attrs
        argv = [attrs.get("Path", ""), *attrs.get("Args", [])]
        workdir = attrs.get("Config", {}).get("WorkingDir") or "/"
        tsdb = str(PurePosixPath(workdir) / (_flag(argv, "storage.tsdb.path") or "data/"))
        return PrometheusSetup(False, tsdb, retention_from_flags(argv))


def check_retention_covers(found: FoundBackup, setup: PrometheusSetup) -> str:
    """Refuse when Prometheus would delete restored blocks soon after it starts, by its
    own rule: at its first compaction (about 2 h after new data arrives) a block whose
    end lies more than the retention time before the newest block's (then: now) is
    deleted, and so are the oldest blocks beyond the size limit."""
    manifest = found.manifest
    ends = [int(b["max_time"]) for b in manifest.source.get("block_list") or []]
    if not ends and manifest.source.get("max_time_ms") is not None:
        ends = [int(manifest.source["max_time_ms"])]
    retention = setup.retention
    if not ends:
        return f"retention {retention.said}; the backup does not record its blocks' times"
    oldest_end = min(ends) / 1000
    age = utc_now().timestamp() - oldest_end
    problems = []
    if (
        retention.time is not None
        and age + FIRST_COMPACTION.total_seconds() > retention.time.total_seconds()
    ):
        days = int((age + FIRST_COMPACTION.total_seconds()) // 86400) + 2
        problems.append(
            f"its oldest restored block ends {age / 86400:.1f} days ago and Prometheus keeps "
            f"{retention.said}: set --storage.tsdb.retention.time={days}d or more"
        )
    if retention.size is not None and manifest.raw_size > retention.size:
        problems.append(
            f"the restored blocks take {manifest.raw_size / 2**30:.2f} GiB and Prometheus keeps "
            f"{retention.said}: set --storage.tsdb.retention.size above that"
        )
    if problems:
        raise RetentionTooShort(
            f"Prometheus would delete restored blocks within {FIRST_COMPACTION.seconds // 3600} h "
            f"of starting ({'; '.join(problems)}), then restore (nothing was changed)"
        )
    return f"retention {retention.said} keeps the oldest restored block ({age / 86400:.1f} days)"
