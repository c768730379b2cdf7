"""Putting a Redis backup back: only a verified backup replaces data, and the data it
replaces is moved aside, never deleted."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from redis_servers import (
    Snapshot,
    assert_same_keyspace,
    keyspace_snapshot,
    running_redis,
    seed_mixed_data,
)
from restoring import restore_redis_into
from same_second import within_one_second

from flows.backup_redis import backup_redis
from tasks.common.clock import utc_now
from tasks.common.files import write_durably
from tasks.redis.rdb import RdbError
from tasks.redis.restore import RestoredRdb
from tasks.store.archive import ArchiveError, CompressedWriter, Manifest, manifest_name
from tasks.store.local import backup_name

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
    placed = restore_redis_into(backup_dir, "latest", target)
    assert placed.backup == manifest.name and placed.moved_aside is not None
    assert (placed.moved_aside.folder / "dump.rdb").read_bytes() == OLD
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
        restore_redis_into(backup_dir, manifest.name, target)
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
        restore_redis_into(backup_dir, name, target)
    assert sorted(p.name for p in target.iterdir()) == ["dump.rdb"]
    assert (target / "dump.rdb").read_bytes() == OLD


def test_a_name_outside_the_backup_dir_is_refused(tmp_path: Path, backup_dir: Path) -> None:
    with pytest.raises(ValueError, match="is not a redis backup name"):
        restore_redis_into(backup_dir, "../../etc/passwd", target_with_old_data(tmp_path))


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` by relative path, with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_two_restores_in_the_same_second_keep_the_original_byte_for_byte(
    tmp_path: Path, backup_dir: Path
) -> None:
    """The moved-aside name has one-second resolution: the second restore of a second
    must not move the first restored file over the saved original. Real clock: retried
    (each time on a fresh target) until both restores fell in the same second."""
    make_backup(tmp_path, backup_dir)

    def restore_twice(attempt: int) -> tuple[Path, RestoredRdb, RestoredRdb]:
        target = tmp_path / f"target-{attempt}"
        target.mkdir()
        (target / "dump.rdb").write_bytes(OLD)
        return (
            target,
            restore_redis_into(backup_dir, "latest", target),
            restore_redis_into(backup_dir, "latest", target),
        )

    target, first, second = within_one_second(restore_twice)
    assert first.moved_aside is not None and second.moved_aside is not None
    assert first.moved_aside.folder != second.moved_aside.folder
    assert (first.moved_aside.folder / "dump.rdb").read_bytes() == OLD
    second_old = (second.moved_aside.folder / "dump.rdb").read_bytes()
    assert second_old == (target / "dump.rdb").read_bytes() != OLD
    assert sorted(files_under(target).values()).count(OLD) == 1


def backup_of_seeded_server(tmp_path: Path, backup_dir: Path) -> Snapshot:
    """Back up a seeded server; return its keyspace as it was at the backup."""
    with running_redis(tmp_path / "seeded") as server:
        seed_mixed_data(server, n_keys=600)
        expected = keyspace_snapshot(server)
        backup_redis(
            redis_url=server.url,
            container="",
            fetch="path",
            data_dir=str(server.dir),
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
    return expected


def target_with_aof(tmp_path: Path) -> Path:
    """A data dir a real Redis ran in with `appendonly yes`: appendonlydir/, no RDB."""
    target = tmp_path / "aof-target"
    with running_redis(target, appendonly="yes") as live:
        live.client().set("only-in-the-aof", "x")
    assert (target / "appendonlydir").is_dir() and not (target / "dump.rdb").exists()
    return target


def test_a_dump_rdb_placed_beside_an_aof_is_never_loaded(tmp_path: Path, backup_dir: Path) -> None:
    """The trap the restore avoids: Redis with appendonly yes loads its AOF and ignores
    a dump.rdb put beside it."""
    backup_of_seeded_server(tmp_path, backup_dir)
    trap = target_with_aof(tmp_path)
    shutil.copyfile(tmp_path / "seeded" / "dump.rdb", trap / "dump.rdb")
    with running_redis(trap, appendonly="yes") as ignored:
        assert ignored.client().get("only-in-the-aof") == b"x"
        assert ignored.client().dbsize() == 1


@pytest.mark.parametrize("appendonly", ["yes", "no"])
def test_aof_data_in_the_target_is_moved_aside_and_redis_loads_the_backup_either_way(
    tmp_path: Path, backup_dir: Path, appendonly: str
) -> None:
    """A folder a Redis ran in with appendonly yes: its AOF is moved aside (kept, never
    deleted) and the backup becomes the AOF's base too, so Redis loads the backup key
    for key whether it starts with appendonly yes or no."""
    expected = backup_of_seeded_server(tmp_path, backup_dir)
    target = target_with_aof(tmp_path)
    aof_before = files_under(target / "appendonlydir")
    placed = restore_redis_into(backup_dir, "latest", target)
    assert placed.placed == ["dump.rdb", "appendonlydir"] and placed.moved_aside is not None
    assert placed.moved_aside.folder.parent == target
    assert placed.moved_aside.names == ["appendonlydir"]
    assert files_under(placed.moved_aside.folder / "appendonlydir") == aof_before
    with running_redis(target, appendonly=appendonly) as restored:
        assert_same_keyspace(expected, keyspace_snapshot(restored))
        assert restored.client().get("only-in-the-aof") is None


def test_a_legacy_appendonly_aof_file_is_moved_aside_too(tmp_path: Path, backup_dir: Path) -> None:
    make_backup(tmp_path, backup_dir)
    target = target_with_old_data(tmp_path)
    flushall = b"*1\r\n$8\r\nFLUSHALL\r\n"
    (target / "appendonly.aof").write_bytes(flushall)
    placed = restore_redis_into(backup_dir, "latest", target)
    assert placed.moved_aside is not None
    assert sorted(placed.moved_aside.names) == ["appendonly.aof", "dump.rdb"]
    assert (placed.moved_aside.folder / "appendonly.aof").read_bytes() == flushall
    assert (placed.moved_aside.folder / "dump.rdb").read_bytes() == OLD
    with running_redis(target, appendonly="yes") as restored:
        assert redis.Redis(port=restored.port).get("k42") == b"v42"
