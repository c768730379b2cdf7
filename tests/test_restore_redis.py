"""Putting a Redis backup back: only a verified backup replaces data, and the data it
replaces is moved aside, never deleted."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import redis
from redis_servers import running_redis

from flows.backup_redis import backup_redis
from tasks.archive import ArchiveError, CompressedWriter, Manifest, manifest_name
from tasks.rdb import RdbError
from tasks.redis import place_rdb
from tasks.storage import backup_name, utc_now, write_durably

OLD = b"REDIS0010 the data that was there before the restore"


def make_backup(tmp_path: Path, backup_dir: Path) -> Manifest:
    with running_redis(tmp_path / "src") as server:
        redis.Redis(port=server.port).mset({f"k{i}": f"v{i}" for i in range(100)})
        return Manifest(
            **backup_redis(
                redis_url=server.url,
                container="",
                fetch="path",
                data_dir=str(server.dir),
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
        )


def target_with_old_data(tmp_path: Path) -> Path:
    target = tmp_path / "target"
    target.mkdir()
    (target / "dump.rdb").write_bytes(OLD)
    return target


def test_restore_moves_the_old_rdb_aside_and_loads(tmp_path: Path, backup_dir: Path) -> None:
    manifest = make_backup(tmp_path, backup_dir)
    target = target_with_old_data(tmp_path)
    placed = place_rdb(backup_dir, "latest", target)
    assert placed.backup == manifest.name and placed.moved_aside is not None
    assert placed.moved_aside.read_bytes() == OLD
    with running_redis(target) as restored:
        assert redis.Redis(port=restored.port).get("k42") == b"v42"


def test_a_corrupt_stored_backup_is_refused_and_old_data_stays(
    tmp_path: Path, backup_dir: Path
) -> None:
    manifest = make_backup(tmp_path, backup_dir)
    stored = backup_dir / manifest.name
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    target = target_with_old_data(tmp_path)
    with pytest.raises(ArchiveError, match="fails its checksum"):
        place_rdb(backup_dir, manifest.name, target)
    assert sorted(p.name for p in target.iterdir()) == ["dump.rdb"]
    assert (target / "dump.rdb").read_bytes() == OLD


def test_an_invalid_rdb_with_a_matching_checksum_is_refused(
    tmp_path: Path, backup_dir: Path
) -> None:
    """A backup whose stored bytes are intact but hold a broken RDB (as a buggy writer
    would make): the RDB validation refuses it while decompressing."""
    make_backup(tmp_path, backup_dir)  # leaves a real dump.rdb in the source dir
    raw = (tmp_path / "src" / "dump.rdb").read_bytes()
    broken = raw[:-20] + bytes([raw[-20] ^ 0xFF]) + raw[-19:]
    name = backup_name("redis", utc_now() - timedelta(hours=1), "gzip", "test:0")
    writer = CompressedWriter(backup_dir / name, "gzip")
    writer.write(broken)
    stored = writer.close()
    bad = Manifest.describe("redis", name, stored, 0.0, source={})
    write_durably(backup_dir / manifest_name(name), bad.to_json().encode())
    target = target_with_old_data(tmp_path)
    with pytest.raises(RdbError):
        place_rdb(backup_dir, name, target)
    assert sorted(p.name for p in target.iterdir()) == ["dump.rdb"]
    assert (target / "dump.rdb").read_bytes() == OLD


def test_a_name_outside_the_backup_dir_is_refused(tmp_path: Path, backup_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a plain relative name"):
        place_rdb(backup_dir, "../../etc/passwd", target_with_old_data(tmp_path))
