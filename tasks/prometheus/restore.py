"""Putting a snapshot backup back into a live Prometheus, and proving it answers.

The blocks go INTO the data dir (`restore_snapshot`), never under `snapshots/`; and
a restored block older than the server's retention is deleted by Prometheus right
after it starts, so that is refused before anything is touched.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import PurePosixPath
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.clock import utc_now
from tasks.common.secrets import redact_url
from tasks.docker import containers
from tasks.docker.containers import wait_started
from tasks.prometheus.capture import (
    BLOCK_FILES,
    ULID,
    PrometheusError,
    PrometheusUnreachable,
    call_api,
    inspect_prometheus,
    query_at,
)
from tasks.store.archive import ArchiveError, open_decompressed
from tasks.store.find import FoundBackup

_DURATION = re.compile(r"(\d+)(ms|y|w|d|h|m|s)")
_UNIT_SECONDS = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}


class RetentionTooShort(PrometheusError):
    """The server would delete the restored blocks right after it starts."""


class HistoryMissing(PrometheusError):
    """Prometheus is up, but does not answer for the restored time range."""


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


@task(cache_policy=NO_CACHE)
def check_archive(found: FoundBackup) -> list[str]:
    """The complete blocks in a stored backup, read as a stream (nothing written):
    each needs meta.json, index and a chunks/ segment. The dry run's proof."""
    seen: dict[str, set[str]] = {}
    with (
        open_decompressed(found.path, found.manifest.compression) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        for member in archive:
            parts = PurePosixPath(member.name).parts
            blocks = [i for i, part in enumerate(parts) if ULID.fullmatch(part)]
            if blocks and member.isfile():
                block = parts[blocks[0]]
                seen.setdefault(block, set()).add("/".join(parts[blocks[0] + 1 :]))
    complete = sorted(
        block
        for block, files in seen.items()
        if all(f in files for f in BLOCK_FILES) and any(f.startswith("chunks/") for f in files)
    )
    if not complete or len(complete) != len(seen):
        broken = sorted(set(seen) - set(complete))
        raise ArchiveError(
            f"backup {found.manifest.name} holds {len(complete)} complete blocks"
            + (f" and incomplete ones ({', '.join(broken)})" if broken else "")
            + "; pick another backup"
        )
    return complete


@task(cache_policy=NO_CACHE)
def wait_until_ready(prometheus_url: str, container: str, timeout_seconds: float) -> None:
    """Poll /-/ready until 200; fail at once if the container exits."""
    url = prometheus_url.rstrip("/") + "/-/ready"

    def ready() -> str | None:
        try:
            response = httpx.get(url, timeout=5)
        except httpx.HTTPError as error:
            return type(error).__name__
        return None if response.status_code == 200 else f"HTTP {response.status_code}"

    wait_started(ready, container, timeout_seconds, f"Prometheus at {redact_url(prometheus_url)}")


@task(cache_policy=NO_CACHE)
def verify_history(prometheus_url: str, found: FoundBackup) -> str:
    """runtimeinfo answers, and at the last moment of the oldest restored block (the
    manifest lists the blocks) Prometheus answers series: the old history is back."""
    runtime = call_api(prometheus_url, "GET", "/api/v1/status/runtimeinfo")
    blocks: list[dict[str, Any]] = found.manifest.source.get("block_list") or []
    if not blocks:
        return f"runtimeinfo answers (retention {runtime.get('storageRetention')})"
    oldest = min(blocks, key=lambda b: b["min_time"])
    at = (oldest["max_time"] - 1) / 1000  # the block's last millisecond
    query = f"/api/v1/query?query=count({{__name__%3D~%22.%2B%22}})&time={at}"
    result = call_api(prometheus_url, "GET", query).get("result") or []
    series = int(float(result[0]["value"][1])) if result else 0
    if series == 0:
        raise HistoryMissing(
            f"Prometheus answers no series at {at:.0f} (inside restored block "
            f"{oldest['ulid']}): the blocks were not loaded; see its log"
        )
    return (
        f"{series} series answer at {at:.0f} (block {oldest['ulid']} holds "
        f"{oldest['series']}); retention {runtime.get('storageRetention')}"
    )


@task(cache_policy=NO_CACHE)
def check_recorded_values(prometheus_url: str, recorded: dict[str, Any]) -> str:
    """Ask the restored server what the live one answered at backup time (the
    manifest's `recorded` values, at a timestamp inside the oldest block): every
    answer must be the same. Raises HistoryMissing naming the first that differs."""
    values = recorded.get("values") or []
    if not values:
        raise HistoryMissing(
            "the backup's manifest records no values to compare (made before backup-prometheus "
            "recorded them): take a new backup, then drill it"
        )
    at = float(recorded["at"])
    for item in values:
        result = query_at(prometheus_url, item["query"], at)
        got = result[0]["value"][1] if len(result) == 1 else f"{len(result)} series"
        if got != item["value"]:
            raise HistoryMissing(
                f"at {at:.3f} {item['query']} answers {got}, the backup recorded {item['value']}"
            )
    return (
        f"{len(values)} recorded answers at {at:.0f} match (e.g. {values[0]['query']} = "
        f"{values[0]['value']})"
    )
