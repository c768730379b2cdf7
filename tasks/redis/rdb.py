"""Validation of Redis RDB files, streaming-friendly.

`RdbChecker` is fed the bytes of an RDB in chunks (as they are read, downloaded
or compressed) and checks the header, the version and the CRC-64 trailer
without holding more than 9 bytes back. `deep_check_rdb` runs `redis-check-rdb`
(a full parse) on the same stream through a pipe, where it is installed.
`validate_rdb_file` does both for a file in one read pass.

Layout checked: ``REDIS`` + 4 ASCII digits (the RDB version), the body, then
(since RDB 5) the EOF opcode 0xFF and the CRC-64/Jones (as Redis computes it,
init 0, reflected) of every preceding byte, little-endian. A stored CRC of 0
means the file was written with ``rdbchecksum no``.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

import anycrc

__all__ = [
    "MAX_RDB_VERSION",
    "DeepCheck",
    "RdbChecker",
    "RdbError",
    "RdbInfo",
    "StreamValidation",
    "crc64",
    "deep_check_rdb",
    "max_rdb_for_redis",
    "min_redis_for_rdb",
    "read_aux_fields",
    "validate_rdb_file",
    "validate_stream",
    "validating",
]

MAGIC = b"REDIS"
HEADER_LEN = 9  # b"REDIS" + 4 digits
TRAILER_LEN = 9  # EOF opcode 0xFF + 8-byte CRC-64
EOF_OPCODE = 0xFF
FIRST_CHECKSUMMED_VERSION = 5  # RDB < 5 (Redis < 2.6) end with 0xFF and no CRC
MIN_RDB_VERSION = 1
MAX_RDB_VERSION = 12
READ_CHUNK = 1 << 20
AUX_OPCODE = 0xFA
AUX_WINDOW = 4096  # the aux fields (redis-ver, ctime, ...) sit in the first few hundred bytes

# First Redis release that writes (and therefore needs to load) each RDB version.
_MIN_REDIS = {5: "2.6", 6: "2.8", 7: "3.2", 8: "4.0", 9: "5.0", 10: "7.0", 11: "7.2", 12: "7.4"}
_GZIP_MAGIC = b"\x1f\x8b"

_CRC64 = anycrc.Model("CRC64-REDIS")  # CRC-64/Jones, the variant Redis uses


def crc64(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Redis's CRC-64 of `data`, continuing from `crc` (≈10 GB/s)."""
    return _CRC64.calc(data, crc)


class RdbError(ValueError):
    """The bytes are not a complete, intact RDB file."""


def min_redis_for_rdb(version: int) -> str:
    """Return the oldest Redis release that can load an RDB of `version`."""
    if version < FIRST_CHECKSUMMED_VERSION:
        return "any"
    return _MIN_REDIS.get(version, f"newer than {_MIN_REDIS[MAX_RDB_VERSION]}")


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def max_rdb_for_redis(redis_version: str) -> int:
    """The newest RDB version a Redis release loads (7.0 → 10, 7.2 → 11, 7.4 → 12);
    a release newer than any we know loads at least what the newest known one does."""
    release = _release(redis_version)
    loadable = [v for v, first in _MIN_REDIS.items() if _release(first) <= release]
    return max(loadable, default=FIRST_CHECKSUMMED_VERSION - 1)


@dataclass(frozen=True)
class RdbInfo:
    """Facts about a validated RDB.

    `checksum` is the CRC-64 stored in the trailer; `checksum_verified` is False
    when it is 0 (saved with ``rdbchecksum no``) or the version has no checksum.
    `deep_check` says what `redis-check-rdb` concluded, or why it did not run.
    """

    rdb_version: int
    size: int
    checksum: int
    checksum_verified: bool
    deep_check: str = "not run"
    created_at: int | None = None  # the `ctime` aux field: server clock when the save began

    @property
    def checksum_detail(self) -> str:
        """What the CRC-64 check proved, for a report: "ok" only when it ran."""
        if self.checksum_verified:
            return "CRC-64 ok"
        if self.rdb_version < FIRST_CHECKSUMMED_VERSION:
            return f"no CRC-64 (RDB v{self.rdb_version} has none)"
        return "CRC-64 not checked (saved with rdbchecksum no)"

    @property
    def min_redis_version(self) -> str:
        """Oldest Redis release that can load this file."""
        return min_redis_for_rdb(self.rdb_version)


class RdbChecker:
    """Incremental RDB validator: call `update` per chunk, then `finish`.

    The trailer is only known at the end, so the last 9 bytes seen are held
    back (copied, never the chunk) and everything before them goes into the
    running CRC. Chunks may be any size and are not retained after `update`
    returns, so a caller may reuse its buffer. Header problems raise as soon
    as the first 9 bytes are in; pass `expected_size` when the length is known
    (e.g. announced by the sender) to report truncation precisely.
    """

    def __init__(self, expected_size: int | None = None, *, name: str = "RDB") -> None:
        self.expected_size = expected_size
        self.name = name
        self.version: int | None = None
        self.size = 0
        self._crc = 0
        self._head = b""
        self._tail = b""

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes of the file."""
        view = memoryview(chunk).cast("B")
        if not view.nbytes:
            return
        self.size += view.nbytes
        if self.expected_size is not None and self.size > self.expected_size:
            raise RdbError(
                f"{self.name} is longer than the announced {self.expected_size} bytes "
                f"(got at least {self.size}); the transfer is garbled: take a new backup"
            )
        if len(self._head) < AUX_WINDOW:
            self._collect_header(view)
        self._hold_back_trailer(view)

    def finish(self) -> RdbInfo:
        """Check size and trailer once all bytes are in; return the facts."""
        self._check_size()
        assert self.version is not None  # set once HEADER_LEN bytes were seen
        if self.version < FIRST_CHECKSUMMED_VERSION:
            return self._finish_unchecksummed()
        tail = self._tail
        if tail[0] != EOF_OPCODE:
            raise RdbError(
                f"{self.name} does not end with the EOF opcode 0xFF and an 8-byte checksum "
                f"(byte at offset {self.size - TRAILER_LEN} is 0x{tail[0]:02x}): the file is "
                "truncated (incomplete copy or interrupted save) or corrupt at the end; "
                "take a new backup"
            )
        stored = int.from_bytes(tail[1:], "little")
        if stored == 0:
            return self._info(checksum=0, verified=False)
        computed = _CRC64.calc(tail[:1], self._crc)
        if stored != computed:
            raise RdbError(
                f"RDB checksum mismatch: {self.name} is corrupt (stored 0x{stored:016x}, "
                f"computed 0x{computed:016x}); take a new backup"
            )
        return self._info(checksum=stored, verified=True)

    def _collect_header(self, view: memoryview) -> None:
        """Keep the first AUX_WINDOW bytes: the header, then the aux fields."""
        self._head += bytes(view[: AUX_WINDOW - len(self._head)])
        if self.version is None and len(self._head) >= HEADER_LEN:
            self.version = _parse_header(self._head[:HEADER_LEN], self.name)

    def _hold_back_trailer(self, view: memoryview) -> None:
        """CRC everything except the last TRAILER_LEN bytes of the stream so far."""
        n = view.nbytes
        if n >= TRAILER_LEN:
            if self._tail:
                self._crc = _CRC64.calc(self._tail, self._crc)
            self._crc = _CRC64.calc(view[: n - TRAILER_LEN], self._crc)
            self._tail = bytes(view[n - TRAILER_LEN :])
            return
        joined = self._tail + bytes(view)
        cut = len(joined) - TRAILER_LEN
        if cut > 0:
            self._crc = _CRC64.calc(joined[:cut], self._crc)
            joined = joined[cut:]
        self._tail = joined

    def _check_size(self) -> None:
        if self.expected_size is not None and self.size < self.expected_size:
            raise RdbError(
                f"{self.name} is truncated: got {self.size} of the announced "
                f"{self.expected_size} bytes; take a new backup"
            )
        if self.size == 0:
            raise RdbError(f"{self.name} is empty (0 bytes); take a new backup")
        minimum = HEADER_LEN + TRAILER_LEN
        if self.version is not None and self.version < FIRST_CHECKSUMMED_VERSION:
            minimum = HEADER_LEN + 1
        if self.size < minimum:
            raise RdbError(
                f"{self.name} is too short: {self.size} bytes, a complete RDB has at least "
                f"{minimum} (header, EOF opcode, checksum); it is truncated: take a new backup"
            )

    def _finish_unchecksummed(self) -> RdbInfo:
        if self._tail[-1] != EOF_OPCODE:
            raise RdbError(
                f"{self.name} (RDB version {self.version}) does not end with the EOF opcode "
                "0xFF: the file is truncated or corrupt; take a new backup"
            )
        return self._info(checksum=0, verified=False)

    def _info(self, *, checksum: int, verified: bool) -> RdbInfo:
        assert self.version is not None
        created = read_aux_fields(self._head[HEADER_LEN:]).get("ctime")
        return RdbInfo(
            self.version,
            self.size,
            checksum,
            verified,
            created_at=created if isinstance(created, int) else None,
        )


def _read_length(data: bytes, at: int) -> tuple[int, bool, int]:
    """An RDB length at `at`: (value, is_special_encoding, next offset). IndexError if cut."""
    first = data[at]
    kind = first >> 6
    if kind == 0:
        return first & 0x3F, False, at + 1
    if kind == 1:
        return ((first & 0x3F) << 8) | data[at + 1], False, at + 2
    if kind == 3:
        return first & 0x3F, True, at + 1
    width = {0x80: 4, 0x81: 8}.get(first)
    if width is None or at + 1 + width > len(data):
        raise IndexError("length cut off or unknown")
    return int.from_bytes(data[at + 1 : at + 1 + width], "big"), False, at + 1 + width


def _read_string(data: bytes, at: int) -> tuple[str | int | None, int]:
    """An RDB string at `at`: text, an int (int encodings) or None (LZF-compressed)."""
    value, special, at = _read_length(data, at)
    if special:
        widths = {0: 1, 1: 2, 2: 4}
        if value in widths:
            end = at + widths[value]
            if end > len(data):
                raise IndexError("integer cut off")
            return int.from_bytes(data[at:end], "little", signed=True), end
        if value == 3:  # LZF: compressed length, plain length, bytes
            compressed, _, at = _read_length(data, at)
            _plain, _, at = _read_length(data, at)
            return None, at + compressed
        raise IndexError("unknown string encoding")
    end = at + value
    if end > len(data):
        raise IndexError("string cut off")
    return data[at:end].decode("utf-8", "replace"), end


def read_aux_fields(body: bytes) -> dict[str, str | int | None]:
    """The aux fields (opcode 0xFA: key, value) at the start of an RDB body, as far
    as `body` holds them complete; an unreadable field ends the list."""
    fields: dict[str, str | int | None] = {}
    at = 0
    try:
        while at < len(body) and body[at] == AUX_OPCODE:
            key, at = _read_string(body, at + 1)
            value, at = _read_string(body, at)
            if at > len(body):
                break
            fields[str(key)] = value
    except IndexError:
        pass
    return fields


def _parse_header(head: bytes, name: str) -> int:
    """Return the RDB version from the 9-byte header, or raise RdbError."""
    if head[:5] != MAGIC:
        hint = " (it looks gzip-compressed: decompress it first)" if head[:2] == _GZIP_MAGIC else ""
        raise RdbError(
            f"{name} is not an RDB file: it starts with {head!r} instead of b'REDIS' + "
            f"4-digit version{hint}; check that the right file was backed up"
        )
    digits = head[5:]
    if not digits.isdigit():
        raise RdbError(
            f"{name} has a malformed RDB header {head!r}: the version must be 4 ASCII digits; "
            "the file is corrupt: take a new backup"
        )
    version = int(digits)
    if version > MAX_RDB_VERSION:
        raise RdbError(
            f"{name} has RDB version {version}, newer than the newest this tool knows "
            f"({MAX_RDB_VERSION}, written by Redis {_MIN_REDIS[MAX_RDB_VERSION]}+): it was "
            "written by a newer Redis and loads only on a Redis at least that new; "
            "upgrade this tool and restore into a matching Redis"
        )
    if version < MIN_RDB_VERSION:
        raise RdbError(f"{name} has invalid RDB version {version}; the file is corrupt")
    return version


def validate_rdb_file(
    path: str | Path,
    deep: bool = True,
    *,
    check_timeout_seconds: float = 600,
) -> RdbInfo:
    """Validate the RDB at `path`: header, version and CRC, streamed in 1 MiB reads.

    With `deep`, the same bytes also go to `redis-check-rdb` (which parses every
    key) when it is on PATH; its verdict is in `RdbInfo.deep_check`. Raises
    RdbError if the file is invalid, TimeoutError if redis-check-rdb overruns
    `check_timeout_seconds`.
    """
    path = Path(path)

    def chunks() -> Iterator[memoryview]:
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                yield view[:n]

    return validate_stream(
        chunks(), deep, name=f"RDB file {path}", check_timeout_seconds=check_timeout_seconds
    )


class StreamValidation:
    """Validation fed by the producer (push): `feed` each chunk, then `finish`.

    Made by `validating`; for a source that calls back with its chunks (the
    replication stream) instead of being iterated."""

    def __init__(
        self,
        checker: RdbChecker,
        deep_check: DeepCheck,
        sink: Callable[[bytes | memoryview], object] | None,
    ) -> None:
        self.checker = checker
        self.deep_check = deep_check
        self.sink = sink

    def feed(self, chunk: bytes | memoryview) -> None:
        """Check the next bytes and hand them on to the sink."""
        self.checker.update(chunk)
        self.deep_check.feed(chunk)
        if self.sink is not None:
            self.sink(chunk)

    def finish(self) -> RdbInfo:
        """All bytes are in: raise RdbError unless the RDB is complete and intact."""
        info = self.checker.finish()
        verdict = self.deep_check.finish(info.rdb_version)
        return replace(info, deep_check=verdict)


@contextlib.contextmanager
def validating(
    deep: bool,
    sink: Callable[[bytes | memoryview], object] | None = None,
    *,
    name: str = "RDB",
    check_timeout_seconds: float = 600,
) -> Iterator[StreamValidation]:
    """A `StreamValidation` (with redis-check-rdb alongside when `deep`) for one stream."""
    with deep_check_rdb(deep, timeout_seconds=check_timeout_seconds, name=name) as deep_check:
        yield StreamValidation(RdbChecker(name=name), deep_check, sink)


def validate_stream(
    chunks: Iterable[bytes | memoryview],
    deep: bool,
    sink: Callable[[bytes | memoryview], object] | None = None,
    *,
    name: str = "RDB",
    check_timeout_seconds: float = 600,
) -> RdbInfo:
    """Validate RDB bytes as they stream past, handing each chunk on to `sink`
    (a compressor, a file) in the same pass. Raises RdbError when invalid."""
    with validating(
        deep, sink, name=name, check_timeout_seconds=check_timeout_seconds
    ) as validation:
        for chunk in chunks:
            validation.feed(chunk)
        return validation.finish()


KEYS_READ = re.compile(r"^\[info\] (\d+) keys read$", re.MULTILINE)


class DeepCheck:
    """`redis-check-rdb` reading the RDB from a pipe, fed chunk by chunk.

    Made by `deep_check_rdb`. Without a process (disabled or not installed),
    `feed` does nothing and `finish` returns why no check ran.
    """

    def __init__(
        self,
        proc: subprocess.Popen[bytes] | None,
        output: IO[bytes] | None,
        *,
        verdict: str,
        timeout: float,
        name: str,
    ) -> None:
        self.proc = proc
        self._output = output
        self.verdict = verdict
        self.timeout = timeout
        self.name = name
        self.keys_read: int | None = None  # what it counted in the file, once it passed

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Pass the next bytes on; stops quietly once the checker has exited."""
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.closed:
            return
        try:
            self.proc.stdin.write(chunk)
        except (BrokenPipeError, ValueError):
            with contextlib.suppress(OSError):  # it stopped reading: finish() reports why
                self.proc.stdin.close()

    def finish(self, rdb_version: int | None = None) -> str:
        """Wait for the verdict; raise RdbError if redis-check-rdb rejects the RDB."""
        if self.proc is None:
            return self.verdict
        output = self._wait()
        if self.proc.returncode == 0:
            if counted := KEYS_READ.search(output):
                self.keys_read = int(counted.group(1))
            return "passed: redis-check-rdb"
        if "Can't handle RDB format version" in output:
            version = "this" if rdb_version is None else str(rdb_version)
            needs = (
                "" if rdb_version is None else f" (needs Redis {min_redis_for_rdb(rdb_version)}+)"
            )
            return (
                f"skipped: the installed redis-check-rdb cannot read RDB version {version}{needs}"
            )
        raise RdbError(
            f"redis-check-rdb rejected {self.name} (exit {self.proc.returncode}): "
            f"{'; '.join(_relevant_lines(output))}; the file is corrupt: take a new backup"
        )

    def _wait(self) -> str:
        assert self.proc is not None and self._output is not None
        if self.proc.stdin is not None:  # None: it reads a file (deep_check_rdb's `path`)
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(
                f"redis-check-rdb did not finish checking {self.name} within "
                f"{self.timeout:g} s; raise the timeout or skip the deep check"
            ) from exc
        self._output.seek(0)
        return self._output.read().decode("utf-8", "replace")

    def close(self) -> None:
        """Stop the checker if it still runs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


@contextlib.contextmanager
def deep_check_rdb(
    enabled: bool = True,
    *,
    timeout_seconds: float = 600,
    name: str = "RDB",
    path: Path | None = None,
) -> Iterator[DeepCheck]:
    """Run `redis-check-rdb` alongside a stream of RDB bytes (one pass, no temp copy).

    Feed it the same chunks as an `RdbChecker`, then call `finish()`; leaving
    the block early kills the checker. A no-op when disabled or not installed.
    With `path`, it reads that file instead (opened here: renaming the file while
    it is checked is safe) and `feed` does nothing.
    """
    exe = shutil.which("redis-check-rdb") if enabled else None
    if exe is None:
        verdict = "skipped: redis-check-rdb not on PATH" if enabled else "not run"
        yield DeepCheck(None, None, verdict=verdict, timeout=timeout_seconds, name=name)
        return
    with (
        tempfile.TemporaryFile() as output,
        open(path, "rb") if path is not None else contextlib.nullcontext() as source,
    ):
        proc = subprocess.Popen(
            [exe, "/dev/stdin"],
            stdin=subprocess.PIPE if source is None else source,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        check = DeepCheck(proc, output, verdict="", timeout=timeout_seconds, name=name)
        try:
            yield check
        finally:
            check.close()


def _relevant_lines(output: str, limit: int = 6) -> list[str]:
    """Pick redis-check-rdb's error lines (after its error banner) from `output`."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    banner = "--- RDB ERROR DETECTED ---"
    if banner in lines:
        lines = lines[lines.index(banner) + 1 :]
    picked = [line for line in lines if not line.startswith("[info]")]
    return picked[:limit] or lines[-limit:]
