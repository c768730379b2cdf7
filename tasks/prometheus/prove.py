"""Proving a restored Prometheus holds the backup: the archive's blocks are complete,
the oldest restored block answers, and the values the live server answered at
backup time are answered the same."""

from __future__ import annotations

import tarfile
from pathlib import PurePosixPath
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.certificates import verified
from tasks.common.checks import Check
from tasks.common.http_health import derive_url
from tasks.prometheus.api import (
    BLOCK_FILES,
    ULID,
    PrometheusError,
    call_api,
    query_at,
)
from tasks.store.archive import (
    ArchiveError,
    Manifest,
    open_decompressed,
)
from tasks.store.find import FoundBackup


class HistoryMissing(PrometheusError):
    """Prometheus is up, but does not answer for the restored time range."""


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
def verify_history(prometheus_url: str, manifest: Manifest) -> str:
    """runtimeinfo answers, and at the last moment of the oldest restored block (the
    manifest lists the blocks) Prometheus answers series: the old history is back."""
    runtime = call_api(prometheus_url, "GET", "/api/v1/status/runtimeinfo")
    blocks: list[dict[str, Any]] = manifest.source.get("block_list") or []
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


def prove_prometheus(prometheus_url: str, manifest: Manifest) -> list[Check]:
    """The checks that prove the Prometheus at `prometheus_url`, just started on the
    restored blocks, holds the backup `manifest` describes."""
    checks = [
        Check(
            "query the oldest restored block", lambda: verify_history.fn(prometheus_url, manifest)
        )
    ]
    recorded = manifest.source.get("recorded") or {}
    if recorded.get("values"):
        run = lambda: check_recorded_values.fn(prometheus_url, recorded)  # noqa: E731
    else:
        run = lambda: "not checked: the backup records none (made before it did)"  # noqa: E731
    checks.append(Check("values recorded at backup time", run))
    return checks


def check_alert_rules(prometheus_url: str) -> str:
    response = httpx.get(derive_url(prometheus_url, "/api/v1/rules"), timeout=10, verify=verified())
    groups = response.json().get("data", {}).get("groups", [])
    rules = sum(len(g.get("rules", [])) for g in groups)
    if not rules:
        raise RuntimeError("Prometheus loaded no alerting rule: check rule_files")
    return f"{rules} rules in {len(groups)} groups loaded by Prometheus"
