"""Putting a Prometheus backup back: only a sound, complete backup replaces data, only
into a stopped Prometheus, and the data it replaces is moved aside, never deleted.

The backup comes from a throwaway Prometheus that scrapes itself and cuts a block
every 3 s (`--storage.tsdb.min-block-duration`), so it holds persisted blocks of
scraped data within seconds: no backfill, no shared sandbox.
"""

from __future__ import annotations

import dataclasses
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_servers import Throwaway, back_up, compare_blocks, running_prometheus
from restoring import restore_prometheus_into
from same_second import within_one_second

from tasks.common.files import write_durably
from tasks.prometheus.api import ULID, PrometheusError
from tasks.prometheus.restore import RestoredSnapshot
from tasks.store.archive import (
    ArchiveError,
    CompressedWriter,
    Manifest,
    manifest_name,
    open_decompressed,
    tar_stream,
)

BLOCKS = ["--storage.tsdb.min-block-duration=3s", "--storage.tsdb.max-block-duration=3s"]
PERSISTED_BLOCKS = 2
WAIT_SECONDS = 120.0


def persisted_blocks(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if ULID.fullmatch(p.name))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Throwaway]:
    """A Prometheus scraping itself every second, with persisted blocks of that data."""
    data = tmp_path_factory.mktemp("source") / "data"
    with running_prometheus(data, scrape_self_every="1s", extra_args=BLOCKS) as server:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(persisted_blocks(data)) < PERSISTED_BLOCKS:
            if time.monotonic() > deadline:
                pytest.fail(f"no {PERSISTED_BLOCKS} blocks in {data} after {WAIT_SECONDS} s")
            time.sleep(0.5)
        yield server


@pytest.fixture(scope="module")
def stored(
    source: Throwaway, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], list[str]]:
    """(backup dir, manifest, blocks the source had persisted before the backup)."""
    backup_dir = tmp_path_factory.mktemp("stored") / "backups"
    on_disk = persisted_blocks(source.data_dir)
    return backup_dir, back_up(source, backup_dir), on_disk


@pytest.fixture
def backup(stored: tuple[Path, dict[str, Any], list[str]], tmp_path: Path) -> tuple[Path, Manifest]:
    """A private copy of the stored backup, free to damage."""
    backup_dir = tmp_path / "backups"
    shutil.copytree(stored[0], backup_dir)
    return backup_dir, Manifest(**stored[1])


OLD_WAL = b"the wal that was there before the restore"


def data_dir_with_old_data(tmp_path: Path) -> Path:
    data = tmp_path / "target" / "data"
    (data / "wal").mkdir(parents=True)
    (data / "wal" / "00000000").write_bytes(OLD_WAL)
    return data


def state(data_dir: Path) -> dict[str, bytes | None]:
    """Everything in the data dir's parent (so also any moved-aside or staging folder),
    but a test Prometheus's own log there."""
    root = data_dir.parent
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob("*"))
        if p.suffix != ".log"
    }


def rewrite_archive(backup_dir: Path, manifest: Manifest, drop: Callable[[str], bool]) -> None:
    """Store the backup again without the members `drop` picks, with a manifest that
    matches the new bytes (as a buggy writer would have made it): only the content
    checks can refuse it."""
    stored = backup_dir / manifest.name
    rewritten = stored.with_name(stored.name + ".new")
    writer = CompressedWriter(rewritten, manifest.compression)
    with (
        open_decompressed(stored, manifest.compression) as stream,
        tarfile.open(fileobj=stream, mode="r|") as old,
        tar_stream(writer) as new,
    ):
        for member in old:
            if not drop(member.name):
                new.addfile(member, old.extractfile(member) if member.isfile() else None)
    written = writer.close()
    rewritten.replace(stored)
    fixed = dataclasses.replace(manifest, size=written.size, sha256=written.sha256)
    write_durably(backup_dir / manifest_name(manifest.name), fixed.to_json().encode())


# ------------------------------------------------------------------------ round trip


def test_scraped_values_of_persisted_blocks_come_back(
    source: Throwaway, stored: tuple[Path, dict[str, Any], list[str]], tmp_path: Path
) -> None:
    backup_dir, manifest, on_disk = stored
    blocks = manifest["source"]["block_list"]
    persisted = [b for b in blocks if b["ulid"] in on_disk]
    assert len(persisted) >= PERSISTED_BLOCKS  # blocks the source had cut, not its head
    data = tmp_path / "fresh" / "data"
    restored = restore_prometheus_into(backup_dir, "latest", data)
    assert sorted(restored.blocks) == sorted(b["ulid"] for b in blocks)
    with running_prometheus(data) as fresh:
        assert compare_blocks(fresh.url, source.url, persisted) == len(persisted)


# ------------------------------------------------------------------------------ safety


def test_a_running_prometheus_holding_its_lock_is_refused(
    backup: tuple[Path, Manifest], tmp_path: Path
) -> None:
    backup_dir, manifest = backup
    data = tmp_path / "live" / "data"
    with running_prometheus(data, extra_args=["--storage.tsdb.use-lockfile"]) as live:
        assert (data / "lock").is_file()
        before = state(data)
        with pytest.raises(PrometheusError, match="a running Prometheus holds .*lock: stop it"):
            restore_prometheus_into(backup_dir, manifest.name, data)
        assert state(data) == before
        # Killed (a clean stop removes it), its lock file stays but nobody holds it:
        # a stale lock file does not block the restore.
        live.process.kill()
        live.process.wait()
    assert (data / "lock").is_file()
    restored = restore_prometheus_into(backup_dir, manifest.name, data)
    assert restored.moved_aside is not None and (restored.moved_aside.folder / "lock").is_file()


def test_a_corrupt_stored_archive_is_refused_and_the_data_dir_untouched(
    backup: tuple[Path, Manifest], tmp_path: Path
) -> None:
    backup_dir, manifest = backup
    stored = backup_dir / manifest.name
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    target = data_dir_with_old_data(tmp_path)
    before = state(target)
    with pytest.raises(ArchiveError, match="fails its checksum"):
        restore_prometheus_into(backup_dir, manifest.name, target)
    assert state(target) == before


def test_an_archive_missing_a_block_is_refused_and_the_data_dir_untouched(
    backup: tuple[Path, Manifest], tmp_path: Path
) -> None:
    backup_dir, manifest = backup
    gone = manifest.source["block_list"][0]["ulid"]
    rewrite_archive(backup_dir, manifest, lambda name: f"/{gone}" in f"/{name}")
    target = data_dir_with_old_data(tmp_path)
    before = state(target)
    with pytest.raises(ArchiveError, match=f"does not hold the blocks .*missing: {gone}"):
        restore_prometheus_into(backup_dir, manifest.name, target)
    assert state(target) == before


@pytest.mark.parametrize("part", ["index", "meta.json", "chunks/000001"])
def test_an_archive_with_an_incomplete_block_is_refused_and_the_data_dir_untouched(
    part: str, backup: tuple[Path, Manifest], tmp_path: Path
) -> None:
    backup_dir, manifest = backup
    broken = manifest.source["block_list"][-1]["ulid"]
    rewrite_archive(backup_dir, manifest, lambda name: name.endswith(f"/{broken}/{part}"))
    target = data_dir_with_old_data(tmp_path)
    before = state(target)
    with pytest.raises(ArchiveError, match=f"block {broken} in the backup is incomplete"):
        restore_prometheus_into(backup_dir, manifest.name, target)
    assert state(target) == before


def test_two_restores_in_the_same_second_keep_the_original(
    backup: tuple[Path, Manifest], tmp_path: Path
) -> None:
    """Real clock: retried (each time on a fresh data dir) until both restores fell
    in the same second, when their moved-aside folders would share a name."""
    backup_dir, manifest = backup

    def restore_twice(attempt: int) -> tuple[Path, RestoredSnapshot, RestoredSnapshot]:
        target = data_dir_with_old_data(tmp_path / f"try-{attempt}")
        first = restore_prometheus_into(backup_dir, manifest.name, target)
        return target, first, restore_prometheus_into(backup_dir, manifest.name, target)

    target, first, second = within_one_second(restore_twice)
    assert first.moved_aside is not None and second.moved_aside is not None
    assert first.moved_aside != second.moved_aside
    assert (first.moved_aside.folder / "wal" / "00000000").read_bytes() == OLD_WAL
    assert sorted(p.name for p in second.moved_aside.folder.iterdir()) == sorted(first.blocks)
    assert sorted(p.name for p in target.iterdir()) == sorted(second.blocks)
