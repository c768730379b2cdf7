"""recover-prometheus on a real Prometheus 2 in a throwaway container holding known
history (promtool backfill): blocks deleted and corrupted, recovered from a backup
taken by the real backup-prometheus flow, the history answers again with the known
values; a dry run changes nothing; a retention too short for the backup is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from throwaway_services import Service, prometheus_container, prometheus_ready, wait_for

from flows.backup_prometheus import backup_prometheus
from flows.recover_prometheus import recover_prometheus
from flows.support.failures import StepFailed
from sandbox import constants as stack
from sandbox.stack import backfill_openmetrics
from tasks.prometheus.api import ULID
from tasks.prometheus.setup import (
    PrometheusSetup,
    Retention,
    RetentionTooShort,
    check_retention_covers,
    parse_duration,
    retention_from_flags,
)
from tasks.store.archive import Manifest, manifest_name
from tasks.store.find import FoundBackup

HISTORY = stack.PROMETHEUS_BACKFILL_METRIC
AT = stack.PROMETHEUS_BACKFILL_START + 3 * 3600 + 7  # inside the backfilled window
SAMPLE = AT - (AT - stack.PROMETHEUS_BACKFILL_START) % stack.PROMETHEUS_BACKFILL_STEP


def backfill(data_dir: Path) -> None:
    """The sandbox's known history, written into `data_dir` as blocks by promtool."""
    source = data_dir.parent / "history.om"
    source.write_text(backfill_openmetrics())
    subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(source), str(data_dir)],
        check=True,
        capture_output=True,
    )


def known_history() -> list[tuple[str, str]]:
    return sorted(
        (f"s{n:03d}", str(stack.backfill_value(n, SAMPLE)))
        for n in range(stack.PROMETHEUS_BACKFILL_SERIES)
    )


def history(service: Service) -> list[tuple[str, str]]:
    answer = httpx.get(
        f"{service.url}/api/v1/query", params={"query": HISTORY, "time": AT}, timeout=10
    ).json()
    return sorted((s["metric"]["series"], s["value"][1]) for s in answer["data"]["result"])


def blocks(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.iterdir() if p.is_dir() and ULID.fullmatch(p.name))


def back_up(service: Service, backup_dir: Path) -> Manifest:
    return Manifest(
        **backup_prometheus(
            prometheus_url=service.url,
            container=service.name,
            fetch="container",
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
    )


def test_deleted_and_corrupt_blocks_are_recovered_and_history_answers_again(
    tmp_path: Path, backup_dir: Path
) -> None:
    with prometheus_container(tmp_path, backfill) as service:
        assert history(service) == known_history()
        manifest = back_up(service, backup_dir)
        service.container().stop()
        old = blocks(service.data_dir)
        assert len(old) >= 2
        shutil.rmtree(old[0])
        (old[1] / "index").write_bytes(b"not an index")
        service.container().start()  # runs without its history, or exits on the bad block
        result = recover_prometheus(
            container=service.name,
            prometheus_url=service.url,
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
        assert history(service) == known_history()
        assert result["ok"] and result["backup"]["name"] == manifest.name
        assert not (service.data_dir / "snapshots").exists()
        [aside] = result["moved_aside"]  # the damaged data is kept, as it was
        assert (Path(aside) / old[1].name / "index").read_bytes() == b"not an index"
        step = next(s for s in result["steps"] if s["name"] == "query the oldest restored block")
        assert "series answer" in step["detail"]


def test_dry_run_checks_the_blocks_and_changes_nothing(tmp_path: Path, backup_dir: Path) -> None:
    with prometheus_container(tmp_path, backfill) as service:
        back_up(service, backup_dir)
        before = sorted(p.name for p in service.data_dir.iterdir())
        started = service.container().attrs["State"]["StartedAt"]
        result = recover_prometheus(
            container=service.name,
            prometheus_url=service.url,
            backup_dir=str(backup_dir),
            s3_bucket="",
            dry_run=True,
        )
        assert result["dry_run"] and result["ok"] and result["moved_aside"] == []
        assert sorted(p.name for p in service.data_dir.iterdir()) == before
        assert service.container().attrs["State"]["StartedAt"] == started
        assert history(service) == known_history()


def test_a_retention_shorter_than_the_backup_is_refused() -> None:
    """Prometheus deletes blocks older than its retention (counted back from its newest
    block, soon: now) at its first compaction after it starts."""
    two_years_ago = (stack.PROMETHEUS_BACKFILL_START - 2 * 365 * 86400) * 1000
    block = {"ulid": "01H", "min_time": two_years_ago - 7_200_000, "max_time": two_years_ago}
    manifest = Manifest(
        "prometheus", "prometheus/p.tar.gz", "2026-01-01T00:00:00+00:00", 1, "0" * 64, "gzip",
        2**30, 0.0, source={"block_list": [block]},
    )  # fmt: skip
    found = FoundBackup(manifest, Path("/nonexistent"), "local", Path("/nonexistent"))
    with pytest.raises(RetentionTooShort, match="retention.time="):
        check_retention_covers(found, PrometheusSetup(True, "/prometheus", Retention.parse("15d")))
    keeps = PrometheusSetup(True, "/p", Retention.parse("10y"))
    assert "keeps the oldest restored block" in check_retention_covers(found, keeps)
    small = PrometheusSetup(True, "/p", Retention.parse("10y or 512MiB"))
    with pytest.raises(RetentionTooShort, match="retention.size"):
        check_retention_covers(found, small)
    assert Retention.parse("30d or 10GiB") == Retention(
        "30d or 10GiB", timedelta(days=30), 10 * 2**30
    )
    assert Retention.parse("1GiB").time is None  # a size limit alone: no time limit
    assert retention_from_flags(["/bin/prometheus"]).said == "15d"  # Prometheus's default
    assert retention_from_flags(["p", "--storage.tsdb.retention.size=1GB"]).time is None
    assert parse_duration("1y2w3d4h5m6s") == timedelta(
        days=365 + 14 + 3, hours=4, minutes=5, seconds=6
    )
    assert parse_duration("banana") is None


def test_a_restore_whose_proof_fails_is_rolled_back_and_the_old_data_serves_again(
    tmp_path: Path, backup_dir: Path
) -> None:
    """The restored blocks do not answer where the manifest says (it claims its oldest
    block a year before any data): the proof fails after the data was moved, so the old data goes
    back, what the restore placed is kept for a look, and Prometheus runs on its history."""
    with prometheus_container(tmp_path, backfill) as service:
        manifest = back_up(service, backup_dir)
        sidecar = backup_dir / manifest_name(manifest.name)
        data = json.loads(sidecar.read_text())
        oldest = min(data["source"]["block_list"], key=lambda b: b["min_time"])
        oldest["min_time"] -= 400 * 86_400_000  # a year before any data, within retention
        oldest["max_time"] = oldest["min_time"] + 3_600_000
        sidecar.write_text(json.dumps(data))
        before = sorted(p.name for p in service.data_dir.iterdir())
        with pytest.raises(StepFailed, match="step 'query the oldest restored block' failed"):
            recover_prometheus(
                container=service.name,
                prometheus_url=service.url,
                backup=manifest.name,
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
        assert sorted(p.name for p in service.data_dir.iterdir()) == before
        [kept] = list(service.data_dir.parent.glob(f"{service.data_dir.name}.failed-restore-*"))
        assert sorted(p.name for p in blocks(kept)) == sorted(
            b["ulid"] for b in data["source"]["block_list"]
        )
        wait_for(lambda: prometheus_ready(service), "Prometheus started again", service)
        assert history(service) == known_history()


def test_a_plain_backup_only_in_s3_is_restored(
    tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    s3 = {
        "s3_bucket": stack.S3_BUCKET,
        "s3_prefix": s3_prefix,
        "s3_endpoint_url": stack.S3_ENDPOINT,
    }
    with prometheus_container(tmp_path, backfill) as service:
        manifest = Manifest(
            **backup_prometheus(
                prometheus_url=service.url,
                container=service.name,
                fetch="container",
                backup_dir=str(tmp_path / "lost-host-backups"),
                **s3,
            )
        )
        assert not manifest.encryption  # plain: no age recipients set
        service.container().stop()
        shutil.rmtree(blocks(service.data_dir)[0])
        service.container().start()
        empty = tmp_path / "new-host-backups"
        result = recover_prometheus(
            container=service.name, prometheus_url=service.url, backup_dir=str(empty), **s3
        )
        assert result["ok"] and result["backup"]["from"].startswith(f"s3://{stack.S3_BUCKET}/")
        assert history(service) == known_history()
