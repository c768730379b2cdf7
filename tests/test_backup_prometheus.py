"""backup-prometheus on the real sandbox Prometheus and on throwaway `prometheus`
processes: round trips through a restore into a fresh Prometheus, and faults that must
fail clearly, store nothing that could pass for a good backup and never leak a snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import docker
import httpx
import pytest
from conftest import require
from mounts import mounted_tmpfs
from prefect_records import log_messages
from prometheus_servers import Throwaway, back_up, compare_blocks, query, running_prometheus
from restoring import restore_prometheus_into

from flows.backup_prometheus import backup_prometheus
from sandbox import constants as stack
from sandbox import images
from tasks.prometheus import capture as prometheus_tasks
from tasks.prometheus.api import AdminApiDisabled, PrometheusUnreachable
from tasks.prometheus.capture import (
    EmptySnapshot,
    Snapshot,
    SnapshotCopyError,
    Tsdb,
    delete_snapshot,
)
from tasks.store.archive import CompressedWriter, open_decompressed, sha256_file
from tasks.store.local import list_local
from tasks.store.s3 import S3Unreachable

SECRET = "pr0m-Pa55word"
HISTORY = stack.PROMETHEUS_BACKFILL_METRIC
# Inside the backfilled window, in a persisted block (not head data): stable answers.
HISTORY_AT = stack.PROMETHEUS_BACKFILL_START + 3 * 3600 + 7
HISTORY_END = stack.PROMETHEUS_BACKFILL_START + stack.PROMETHEUS_BACKFILL_SECONDS


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def sandbox_prometheus() -> str:
    """The sandbox's `prometheus` container, ready, with its backfilled history."""
    require(stack.PROMETHEUS_HOST, stack.PROMETHEUS_PORT, "Prometheus (container prometheus)")
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        pytest.fail("Debian's prometheus package is missing: run scripts/setup.sh", pytrace=False)
    if not query(stack.PROMETHEUS_URL, HISTORY, HISTORY_AT):
        pytest.fail(
            f"the sandbox Prometheus has no {HISTORY} history: recreate it with "
            "`.venv/bin/python -m sandbox up`",
            pytrace=False,
        )
    return stack.PROMETHEUS_URL


@pytest.fixture
def our_snapshots(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the snapshots this test's backups asked Prometheus for, recorded by a
    spy around the real API call. The sandbox TSDB is shared (the demo, other
    checkouts): a test checks and touches only the snapshots it made."""
    names: list[str] = []
    call_api = prometheus_tasks.call_api

    def spy(prometheus_url: str, method: str, path: str, *args: Any) -> dict[str, Any]:
        answer = call_api(prometheus_url, method, path, *args)
        if path == "/api/v1/admin/tsdb/snapshot":
            names.append(str(answer.get("name", "")))
        return answer

    monkeypatch.setattr(prometheus_tasks, "call_api", spy)
    return names


@contextmanager
def killing_proxy(target: Throwaway) -> Iterator[str]:
    """A TCP relay to `target` that kills it (SIGKILL) when the snapshot request
    arrives: Prometheus dies mid-request and later connections find nobody there."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def handle(client: socket.socket) -> None:
        head = client.recv(65536)
        if head.startswith(b"POST /api/v1/admin/tsdb/snapshot"):
            target.process.kill()
            target.process.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", target.port), timeout=2)
        except OSError:
            client.close()  # Prometheus is gone: the client sees the connection dropped
            return
        upstream.sendall(head)
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(client,), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        server.join(5)
        listener.close()


def sandbox_snapshots() -> list[str]:
    """Snapshot folders left in the sandbox TSDB (each one holds disk)."""
    folder = stack.PROMETHEUS_HOST_DATA_DIR / "snapshots"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def left_behind(ours: list[str]) -> list[str]:
    """Those of `ours` still in the sandbox TSDB (other runs' snapshots are not ours)."""
    assert ours, "the backup never asked Prometheus for a snapshot"
    return sorted(set(ours) & set(sandbox_snapshots()))


def no_backups(backup_dir: Path) -> None:
    assert list_local(backup_dir, "prometheus") == []
    leftovers = [p for p in backup_dir.rglob("*") if p.is_file()]
    assert leftovers == [], f"partial files left behind: {leftovers}"


def all_log_text() -> str:
    return "\n".join(log_messages())


def archive_members(path: Path, compression: str) -> list[tarfile.TarInfo]:
    with (
        open_decompressed(path, compression) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        return list(archive)


def archived_meta(path: Path, compression: str) -> list[dict[str, Any]]:
    """The meta.json of every block inside a stored backup."""
    metas = []
    with (
        open_decompressed(path, compression) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        for member in archive:
            if member.name.endswith("/meta.json"):
                metas.append(json.loads(archive.extractfile(member).read()))  # type: ignore[union-attr]
    return metas


def assert_same_answers(restored_url: str, manifest: dict[str, Any]) -> None:
    """The restored Prometheus answers like the sandbox one for times before the backup."""
    history = query(restored_url, HISTORY, HISTORY_AT)
    assert len(history) == stack.PROMETHEUS_BACKFILL_SERIES
    assert history == query(stack.PROMETHEUS_URL, HISTORY, HISTORY_AT)
    for labels, value in history:
        series = int(dict(labels)["series"][1:])
        assert float(value) == stack.backfill_value(series, HISTORY_AT)
    total = f"sum(sum_over_time({HISTORY}[6h]))"
    assert query(restored_url, total, HISTORY_END) == query(
        stack.PROMETHEUS_URL, total, HISTORY_END
    )
    assert compare_scraped_values(restored_url, stack.PROMETHEUS_URL, manifest) >= 1


def compare_scraped_values(restored_url: str, source_url: str, manifest: dict[str, Any]) -> int:
    """Compare the scraped (not backfilled) data of every restored block with the
    source; fail unless one was compared. The newest block holds what was in the head
    at the snapshot: a persisted block once restored."""
    scraped = [b for b in manifest["source"]["block_list"] if b["min_time"] > HISTORY_END * 1000]
    return compare_blocks(restored_url, source_url, scraped)


# ---------------------------------------------------------------------- round trips


def test_container_backup_uploads_and_restores_into_a_fresh_prometheus(
    sandbox_prometheus: str, backup_dir: Path, s3_prefix: str, tmp_path: Path
) -> None:
    manifest = backup_prometheus(
        prometheus_url=sandbox_prometheus,
        container=stack.PROMETHEUS_CONTAINER,
        fetch="container",
        data_dir="",
        backup_dir=str(backup_dir),
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=s3_prefix,
        s3_endpoint_url=stack.S3_ENDPOINT,
    )
    name, source = manifest["name"], manifest["source"]
    assert name.startswith("prometheus/prometheus_") and name.endswith(".tar.gz")
    stored = backup_dir / name
    assert stored.stat().st_size == manifest["size"]
    assert sha256_file(stored) == manifest["sha256"]
    build = httpx.get(f"{sandbox_prometheus}/api/v1/status/buildinfo").json()["data"]
    assert source["prometheus_version"] == build["version"]
    assert source["fetch"] == "container"
    assert source["block_facts_from"] == "meta.json in the archive"
    assert source["blocks"] >= 4  # three backfilled blocks and the head
    assert source["min_time_ms"] == stack.PROMETHEUS_BACKFILL_START * 1000
    assert source["max_time_ms"] > (time.time() - 600) * 1000  # head data is in it
    assert source["series"] >= stack.PROMETHEUS_BACKFILL_SERIES
    assert source["samples"] >= stack.PROMETHEUS_BACKFILL_SERIES * 1440
    members = archive_members(stored, "gzip")  # a plain .tar.gz: operators can untar it
    assert all(m.name.split("/")[0] == source["snapshot"] for m in members)
    assert not any(m.name.startswith("/") or ".." in m.name.split("/") for m in members)
    assert not any(part in ("wal", "chunks_head") for m in members for part in m.name.split("/"))
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    key = f"{s3_prefix}/{name}"
    assert s3.head_object(Bucket=stack.S3_BUCKET, Key=key)["ContentLength"] == manifest["size"]
    remote = json.loads(
        s3.get_object(Bucket=stack.S3_BUCKET, Key=key + ".manifest.json")["Body"].read()
    )
    assert remote["sha256"] == manifest["sha256"]
    assert source["snapshot"] not in sandbox_snapshots()

    fresh = tmp_path / "fresh" / "data"
    restored = restore_prometheus_into(backup_dir, "latest", fresh)
    assert restored.moved_aside is None and len(restored.blocks) == source["blocks"]
    assert sorted(os.listdir(fresh)) == sorted(restored.blocks)  # blocks only: no wal/
    with running_prometheus(fresh) as prometheus:
        assert_same_answers(prometheus.url, manifest)


def test_host_path_backup_is_listed_by_promtool_and_restores_over_old_data(
    sandbox_prometheus: str, backup_dir: Path, tmp_path: Path
) -> None:
    manifest = backup_prometheus(
        prometheus_url=sandbox_prometheus,
        container="",
        fetch="path",
        data_dir=str(stack.PROMETHEUS_HOST_DATA_DIR),
        backup_dir=str(backup_dir),
        s3_bucket="",
        compression="zstd",
    )
    source = manifest["source"]
    assert manifest["name"].endswith(".tar.zst") and source["fetch"] == "path"
    assert source["block_facts_from"] == "promtool tsdb list"
    metas = archived_meta(backup_dir / manifest["name"], "zstd")
    assert sorted(b["ulid"] for b in source["block_list"]) == sorted(m["ulid"] for m in metas)
    assert source["samples"] == sum(m["stats"]["numSamples"] for m in metas)
    assert source["snapshot"] not in sandbox_snapshots()

    data = tmp_path / "old" / "data"
    (data / "wal").mkdir(parents=True)
    (data / "wal" / "00000000").write_bytes(b"old wal")
    restored = restore_prometheus_into(backup_dir, manifest["name"], data)
    assert restored.moved_aside is not None
    assert (restored.moved_aside.folder / "wal" / "00000000").read_bytes() == b"old wal"
    assert sorted(os.listdir(data)) == sorted(restored.blocks)
    with running_prometheus(data) as prometheus:
        assert_same_answers(prometheus.url, manifest)


# --------------------------------------------------------------------------- faults


def test_unreachable_prometheus_is_clear_and_hides_credentials(
    backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"http://admin:{SECRET}@127.0.0.1:1"
    monkeypatch.setenv("PROXILION_DR_PROMETHEUS_URL", url)  # credentials: environment only
    with pytest.raises(
        PrometheusUnreachable, match=r"cannot reach Prometheus at http://\*\*\*@127.0.0.1:1"
    ):
        backup_prometheus(
            container="",
            fetch="path",
            data_dir=str(tmp_path),
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
    assert SECRET not in all_log_text()
    no_backups(backup_dir)


def test_prometheus_killed_during_the_snapshot(backup_dir: Path, tmp_path: Path) -> None:
    with running_prometheus(tmp_path / "data") as prometheus, killing_proxy(prometheus) as url:
        with pytest.raises(PrometheusUnreachable, match="cannot reach Prometheus .*is it running"):
            backup_prometheus(
                prometheus_url=url,
                container="",
                fetch="path",
                data_dir=str(prometheus.data_dir),
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
        assert prometheus.process.poll() is not None, "the proxy did not kill Prometheus"
    no_backups(backup_dir)


def test_admin_api_disabled_says_how_to_fix_it(backup_dir: Path, tmp_path: Path) -> None:
    with (
        running_prometheus(tmp_path / "data", admin=False) as prometheus,
        pytest.raises(AdminApiDisabled, match="admin APIs disabled.*--web.enable-admin-api"),
    ):
        back_up(prometheus, backup_dir)
    no_backups(backup_dir)


def test_a_tsdb_without_any_block_is_a_failed_backup(backup_dir: Path, tmp_path: Path) -> None:
    """A fresh Prometheus (empty data dir, scraping nothing) has no persisted block and
    an empty head: its snapshot holds no block. That must fail, store nothing (no
    manifest, so nothing counts toward keep_min) and say why and what to do."""
    with running_prometheus(tmp_path / "data") as prometheus:
        with pytest.raises(EmptySnapshot, match=r"no persisted block yet.*min-block-duration"):
            back_up(prometheus, backup_dir)
        assert os.listdir(prometheus.data_dir / "snapshots") == []  # deleted all the same
    no_backups(backup_dir)


@pytest.mark.parametrize("fetch", ["container", "path"])
def test_snapshot_removed_while_copying(
    fetch: str,
    sandbox_prometheus: str,
    backup_dir: Path,
    our_snapshots: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real snapshot folder is deleted as soon as the first archive bytes are
    written: the Docker archive API then ends its tar early, between files without an
    error (checked by listing the snapshot afterwards) or inside one (the copy broke
    off: which one depends on how far Docker got), the host walk hits vanished files."""
    removed: list[str] = []
    write = CompressedWriter.write

    def write_then_remove(self: CompressedWriter, chunk: bytes | memoryview) -> None:
        if not removed:
            for name in our_snapshots:
                shutil.rmtree(stack.PROMETHEUS_HOST_DATA_DIR / "snapshots" / name)
                removed.append(name)
        write(self, chunk)

    monkeypatch.setattr(CompressedWriter, "write", write_then_remove)
    refused = "(changed|vanished) .*while it was copied|broke off"
    with pytest.raises(SnapshotCopyError, match=refused):
        backup_prometheus(
            prometheus_url=sandbox_prometheus,
            container=stack.PROMETHEUS_CONTAINER,
            fetch=fetch,
            data_dir="" if fetch == "container" else str(stack.PROMETHEUS_HOST_DATA_DIR),
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
    assert removed, "the copy never started"
    no_backups(backup_dir)
    assert left_behind(our_snapshots) == []


def test_disk_full_removes_the_partial_file_and_the_snapshot(
    sandbox_prometheus: str, tmp_path: Path, our_snapshots: list[str]
) -> None:
    with mounted_tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        with pytest.raises(OSError, match="no space left in .*choose another backup_dir"):
            backup_prometheus(
                prometheus_url=sandbox_prometheus,
                container=stack.PROMETHEUS_CONTAINER,
                fetch="container",
                data_dir="",
                backup_dir=str(tiny),
                s3_bucket="",
            )
        no_backups(tiny)
    assert left_behind(our_snapshots) == []


def test_a_snapshot_that_cannot_be_removed_does_not_hide_why_the_backup_failed(
    sandbox_prometheus: str,
    tmp_path: Path,
    our_snapshots: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills during the copy and then the snapshot cannot be removed: the run
    fails with the disk-full reason, and the leftover snapshot is a warning naming it.
    The removal failure is faked (raised where `rm` would fail): as root, the real
    Prometheus never refuses a removal."""

    def refuse(snapshot: Snapshot, here: Path) -> str:
        raise prometheus_tasks.SnapshotCopyError(f"could not remove snapshot {here} (faked)")

    monkeypatch.setattr(prometheus_tasks, "_remove_on_host", refuse)
    with mounted_tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        with pytest.raises(OSError, match="no space left in .*choose another backup_dir"):
            backup_prometheus(
                prometheus_url=sandbox_prometheus,
                container=stack.PROMETHEUS_CONTAINER,
                fetch="path",
                data_dir=str(stack.PROMETHEUS_HOST_DATA_DIR),
                backup_dir=str(tiny),
                s3_bucket="",
            )
        no_backups(tiny)
    [name] = our_snapshots
    assert any(f"Snapshot {name} was not removed" in m and "by hand" in m for m in log_messages())
    assert left_behind(our_snapshots) == [name]  # as the warning says: removed by hand
    shutil.rmtree(stack.PROMETHEUS_HOST_DATA_DIR / "snapshots" / name)


def test_read_only_backup_dir_fails_before_any_snapshot(
    sandbox_prometheus: str, tmp_path: Path, our_snapshots: list[str]
) -> None:
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as readonly:
        with pytest.raises(PermissionError, match="is not writable.*choose another backup_dir"):
            backup_prometheus(
                prometheus_url=sandbox_prometheus,
                fetch="container",
                backup_dir=str(readonly),
                s3_bucket="",
            )
        assert os.listdir(readonly) == []
    assert our_snapshots == []


def test_s3_down_after_the_copy_still_deletes_the_snapshot(
    sandbox_prometheus: str, backup_dir: Path, s3_prefix: str, our_snapshots: list[str]
) -> None:
    with pytest.raises(S3Unreachable, match="S3 endpoint http://127.0.0.1:1 is unreachable"):
        backup_prometheus(
            prometheus_url=sandbox_prometheus,
            container=stack.PROMETHEUS_CONTAINER,
            fetch="container",
            data_dir=str(stack.PROMETHEUS_HOST_DATA_DIR),
            backup_dir=str(backup_dir),
            s3_bucket=stack.S3_BUCKET,
            s3_prefix=s3_prefix,
            s3_endpoint_url="http://127.0.0.1:1",
        )
    assert left_behind(our_snapshots) == []
    [kept] = list_local(backup_dir, "prometheus")  # the local copy is complete, as designed
    assert (backup_dir / kept.name).stat().st_size == kept.size


def test_snapshot_of_a_stopped_container_is_deleted_through_a_throwaway_one(
    tmp_path: Path,
) -> None:
    client = docker.from_env()
    data = tmp_path / "tsdb"
    block = data / "snapshots" / "20260101T000000Z-0123456789abcdef" / "01JGXQ5S5Z0000000000000000"
    block.mkdir(parents=True)
    (block / "meta.json").write_text("{}")
    image = images.ensure_hostfs_image(client)
    mounts = [docker.types.Mount("/prometheus", str(data), type="bind")]
    name = f"proxilion-dr-test-{uuid.uuid4().hex[:8]}"
    container = client.containers.create(
        image, ["/usr/bin/sleep", "60"], name=name, mounts=images.host_mounts() + mounts
    )
    try:
        snapshot = Snapshot(block.parent.name, Tsdb("container", name, "/prometheus", None), 0.0)
        assert "throwaway container" in delete_snapshot(snapshot)
        assert not block.parent.exists() and (data / "snapshots").is_dir()
    finally:
        container.remove(force=True)


def test_auto_fetch_takes_the_container_route_and_restores(
    sandbox_prometheus: str, backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What every scheduled deployment runs: fetch and container left to their defaults."""
    monkeypatch.delenv("PROXILION_DR_PROMETHEUS_FETCH", raising=False)
    monkeypatch.delenv("PROXILION_DR_PROMETHEUS_CONTAINER", raising=False)
    monkeypatch.delenv("PROXILION_DR_PROMETHEUS_DATA_DIR", raising=False)
    assert stack.PROMETHEUS_CONTAINER == "prometheus"  # the setting's default
    manifest = backup_prometheus(
        prometheus_url=sandbox_prometheus, backup_dir=str(backup_dir), s3_bucket=""
    )
    assert manifest["source"]["fetch"] == "container"
    assert manifest["source"]["snapshot"] not in sandbox_snapshots()
    fresh = tmp_path / "fresh" / "data"
    restore_prometheus_into(backup_dir, manifest["name"], fresh)
    with running_prometheus(fresh) as prometheus:
        assert_same_answers(prometheus.url, manifest)
