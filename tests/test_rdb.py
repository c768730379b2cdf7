"""RDB validation on real dump.rdb files written by a real redis-server."""

from __future__ import annotations

import gzip
import random
import subprocess
from pathlib import Path

import pytest
from redis_servers import running_redis, seed_mixed_data

from tasks.redis.capture import COARSE_CLOCK_SLACK_US
from tasks.redis.rdb import (
    RdbChecker,
    RdbError,
    RdbInfo,
    crc64,
    deep_check_rdb,
    read_aux_fields,
    validate_rdb_file,
)

MARKER = b"\x00\x0amarker-key\x0cmarker-value"  # string type, len 10 key, len 12 value


def save_rdb(work_dir: Path, **config: str) -> bytes:
    """Seed a real server, SAVE, and return its dump.rdb bytes."""
    with running_redis(work_dir, **config) as server:
        seed_mixed_data(server, n_keys=600)
        server.client().set("marker-key", "marker-value")
        server.client().save()
        return (server.dir / "dump.rdb").read_bytes()


@pytest.fixture(scope="module")
def rdb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return save_rdb(tmp_path_factory.mktemp("saved"))


@pytest.fixture(scope="module")
def unchecksummed_rdb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return save_rdb(tmp_path_factory.mktemp("nocrc"), rdbchecksum="no")


def write(tmp_path: Path, data: bytes, name: str = "dump.rdb") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def with_new_crc(data: bytes | bytearray) -> bytes:
    """The same RDB with its trailer CRC recomputed (to forge valid-looking files)."""
    body = bytes(data[:-8])
    return body + crc64(body).to_bytes(8, "little")


def check_bytes(data: bytes, chunk: int = 1 << 20) -> RdbInfo:
    checker = RdbChecker()
    for i in range(0, len(data), chunk):
        checker.update(data[i : i + chunk])
    return checker.finish()


def redis_check_rdb(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["redis-check-rdb", str(path)], capture_output=True, text=True)


def test_crc_model_is_redis_crc64() -> None:
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA


def test_saved_rdb_is_valid_and_redis_check_rdb_agrees(rdb: bytes, tmp_path: Path) -> None:
    path = write(tmp_path, rdb)
    info = validate_rdb_file(path)
    assert info.rdb_version == 10  # Redis 7.0
    assert info.min_redis_version == "7.0"
    assert info.size == len(rdb)
    assert info.checksum == int.from_bytes(rdb[-8:], "little") != 0
    assert info.checksum_verified and info.checksum_detail == "CRC-64 ok"
    assert info.deep_check == "passed: redis-check-rdb"
    result = redis_check_rdb(path)
    assert result.returncode == 0 and "Checksum OK" in result.stdout
    assert validate_rdb_file(path, deep=False).deep_check == "not run"


def test_chunking_does_not_change_the_result(rdb: bytes) -> None:
    expected = check_bytes(rdb)
    rng = random.Random(1)
    checker = RdbChecker()
    pos = 0
    while pos < len(rdb):  # 1..20-byte chunks straddle header and trailer boundaries
        size = rng.choice([1, 2, 8, 9, 10, 17, 20, 4096, 65537])
        piece = rdb[pos : pos + size]
        checker.update(rng.choice([bytes, bytearray, memoryview])(piece))
        pos += size
    assert checker.finish() == expected
    for size in (10, 18, 4097, len(rdb) - 1, len(rdb)):
        assert check_bytes(rdb, size) == expected


def test_bit_flip_is_a_checksum_mismatch(rdb: bytes, tmp_path: Path) -> None:
    data = bytearray(rdb)
    data[len(data) // 2] ^= 0x10
    path = write(tmp_path, bytes(data))
    with pytest.raises(RdbError, match=r"RDB checksum mismatch: .* is corrupt \(stored 0x"):
        validate_rdb_file(path)
    assert redis_check_rdb(path).returncode != 0


def test_truncated_file_is_rejected(rdb: bytes, tmp_path: Path) -> None:
    path = write(tmp_path, rdb[: len(rdb) - 1000])
    with pytest.raises(RdbError, match="truncated"):
        validate_rdb_file(path, deep=False)
    checker = RdbChecker(expected_size=len(rdb))
    checker.update(rdb[:-1000])
    with pytest.raises(RdbError, match=f"got {len(rdb) - 1000} of the announced {len(rdb)}"):
        checker.finish()


def test_longer_than_announced_is_rejected(rdb: bytes) -> None:
    checker = RdbChecker(expected_size=100)
    with pytest.raises(RdbError, match="longer than the announced 100 bytes"):
        checker.update(rdb[:101])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty"),
        (b"REDIS", "too short: 5 bytes"),
        (b"REDIS0010\xff" + bytes(7), "too short: 17 bytes"),
    ],
)
def test_too_short(data: bytes, message: str) -> None:
    with pytest.raises(RdbError, match=message):
        check_bytes(data)


def test_bad_magic(rdb: bytes) -> None:
    with pytest.raises(RdbError, match="is not an RDB file: it starts with b'RADIS0010'"):
        check_bytes(b"RADIS" + rdb[5:])
    with pytest.raises(RdbError, match="gzip-compressed"):
        check_bytes(gzip.compress(rdb))
    with pytest.raises(RdbError, match="malformed RDB header"):
        check_bytes(b"REDIS00x0" + rdb[9:])


def test_bad_magic_fails_on_the_first_chunk(rdb: bytes) -> None:
    checker = RdbChecker()
    with pytest.raises(RdbError, match="not an RDB file"):
        checker.update(b"*2\r\n$6\r\nSELECT\r\n")  # an AOF, say


def test_bad_trailer_byte(rdb: bytes) -> None:
    data = bytearray(rdb)
    data[-9] = 0x00
    with pytest.raises(RdbError, match="does not end with the EOF opcode 0xFF"):
        check_bytes(bytes(data))


def test_checksums_disabled_is_valid_but_unverified(
    unchecksummed_rdb: bytes, tmp_path: Path
) -> None:
    assert unchecksummed_rdb[-8:] == bytes(8)
    info = validate_rdb_file(write(tmp_path, unchecksummed_rdb))
    assert info.rdb_version == 10
    assert info.checksum == 0 and not info.checksum_verified
    assert info.checksum_detail == "CRC-64 not checked (saved with rdbchecksum no)"  # not "ok"
    assert info.deep_check == "passed: redis-check-rdb"


def test_deep_check_catches_what_the_trailer_cannot(
    unchecksummed_rdb: bytes, tmp_path: Path
) -> None:
    """Without a CRC only redis-check-rdb can see damage inside the file."""
    at = unchecksummed_rdb.index(MARKER)
    data = bytearray(unchecksummed_rdb)
    data[at] = 0x77  # not an object type
    path = write(tmp_path, bytes(data))
    assert not validate_rdb_file(path, deep=False).checksum_verified  # passes shallow
    with pytest.raises(RdbError, match=r"redis-check-rdb rejected .*\[offset \d+\]") as err:
        validate_rdb_file(path)
    assert "[info]" not in str(err.value)


def test_future_version_names_the_version(rdb: bytes, tmp_path: Path) -> None:
    path = write(tmp_path, with_new_crc(b"REDIS0099" + rdb[9:]))
    with pytest.raises(
        RdbError, match=r"RDB version 99, newer than .* \(12, written by Redis 7.4\+\)"
    ):
        validate_rdb_file(path)


def test_newer_version_than_local_redis_check_rdb_is_skipped_not_failed(
    rdb: bytes, tmp_path: Path
) -> None:
    """Redis 7.2 writes RDB 11; Debian's 7.0 redis-check-rdb cannot parse it."""
    info = validate_rdb_file(write(tmp_path, with_new_crc(b"REDIS0011" + rdb[9:])))
    assert info.rdb_version == 11 and info.checksum_verified
    assert info.min_redis_version == "7.2"
    assert info.deep_check.startswith("skipped: the installed redis-check-rdb cannot read")
    assert "needs Redis 7.2+" in info.deep_check


def test_old_unchecksummed_format_is_accepted() -> None:
    info = check_bytes(b"REDIS0004\xfe\x00\x00\x01a\x01b\xff")  # RDB < 5 has no CRC
    assert info.rdb_version == 4 and not info.checksum_verified


def test_deep_check_streams_and_is_killed_when_abandoned(rdb: bytes) -> None:
    with deep_check_rdb() as deep:
        for i in range(0, len(rdb), 4096):
            deep.feed(rdb[i : i + 4096])
        assert deep.finish() == "passed: redis-check-rdb"
    with pytest.raises(KeyboardInterrupt), deep_check_rdb() as deep:
        deep.feed(rdb[:1000])
        raise KeyboardInterrupt
    assert deep.proc is not None and deep.proc.poll() is not None
    with deep_check_rdb(enabled=False) as deep:
        deep.feed(rdb)
        assert deep.finish() == "not run"


def test_deep_check_of_a_file_renamed_while_it_runs(rdb: bytes, tmp_path: Path) -> None:
    """The drill renames the staged RDB into place while redis-check-rdb reads it."""
    path = write(tmp_path, rdb, "staged.rdb")
    with deep_check_rdb(path=path) as deep:
        path.rename(tmp_path / "dump.rdb")
        assert deep.finish(10) == "passed: redis-check-rdb"
    data = bytearray(rdb)
    data[len(data) // 2] ^= 0x10
    bad = write(tmp_path, bytes(data), "bad.rdb")
    rejected = pytest.raises(RdbError, match="redis-check-rdb rejected backup b")
    with deep_check_rdb(path=bad, name="backup b") as deep, rejected:
        deep.finish(10)


def test_deep_check_reports_a_missing_tool(rdb: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tasks.redis.rdb.shutil.which", lambda _name: None)
    with deep_check_rdb() as deep:
        deep.feed(rdb)
        assert deep.finish().startswith("skipped: redis-check-rdb not on PATH")


def test_ctime_aux_field_is_the_save_time(tmp_path: Path) -> None:
    """The `ctime` aux field (whatever the chunking) is the server's clock at the save:
    it is how a backup proves its RDB came from the save it waited for. Redis writes it
    from the kernel's coarse clock, up to a tick behind TIME: across a second boundary
    it reads the second before (seen once in a full run), which the backup allows for
    (COARSE_CLOCK_SLACK_US) and so does this test."""
    with running_redis(tmp_path / "r", rdbcompression="yes") as server:
        server.client().set("k", "v" * 100)
        seconds, micros = server.client().time()
        before = (seconds * 1_000_000 + micros - COARSE_CLOCK_SLACK_US) // 1_000_000
        server.client().save()
        after = int(server.client().time()[0])
        data = (server.dir / "dump.rdb").read_bytes()
    fields = read_aux_fields(data[9:])
    assert fields["redis-ver"] and fields["redis-bits"] == 64
    for chunk in (1, 7, 1 << 20):
        assert before <= check_bytes(data, chunk).created_at <= after  # type: ignore[operator]
    assert read_aux_fields(data[9:20]) == {}  # cut inside the first field: nothing made up
