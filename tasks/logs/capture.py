"""Container logs in a time window, streamed into a compressed backup.

A log backup holds one line per log entry, `<timestamp> <container> <stream>
<message>`: the timestamp is Docker's (UTC, fixed width, nanoseconds, so lines
sort as text), the stream is stdout or stderr (or tty). Two ways to read:
- "api": the Engine API (`GET /containers/{id}/logs`, multiplexed frames keep the
  streams apart). Works for every log driver and remote engines; dockerd decodes
  every entry itself, which caps it near 20-30 MB/s.
- "file": the json-file log Docker writes on this host (and its rotated files),
  read directly, as log shippers do; ~4-5x faster, and the start of the window is
  found by bisection instead of reading the log from its beginning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import requests
import urllib3
from isal import igzip
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.files import CHUNK
from tasks.common.log import run_logger
from tasks.common.retry import TransientError, retrying_task
from tasks.docker.containers import ContainerError, docker_client, get_container
from tasks.store.archive import CompressedFile, Compression, Manifest
from tasks.store.encryption import AgeCopy, staged_writer
from tasks.store.local import explain_write_error

LOG_LINE_FORMAT = "<timestamp> <container> <stream> <message>"
LOG_READS = ("auto", "api", "file")
_TS_WIDTH = len("2026-01-01T00:00:00.000000000Z")
_TS = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")
_WINDOW = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_STREAMS = {0: "stdin", 1: "stdout", 2: "stderr"}
_SEEK_MARGIN = timedelta(seconds=1)  # stdout and stderr entries interleave by microseconds
# dockerd is silent while it scans a long log up to `since`: wait long, not forever.
_API_READ_TIMEOUT = 600.0


class LogStreamCut(ContainerError, TransientError):
    """The connection to Docker dropped before the log stream ended."""


def parse_window(window: str) -> timedelta:
    """A log window such as `30m`, `24h`, `7d` (also `90s`, `2w`, `1h30m`) as a timedelta."""
    text = str(window).strip().lower()
    parts = _WINDOW.findall(text)
    if not text or "".join(a + u for a, u in parts) != text:
        raise ValueError(
            f"window {window!r} is not a duration: use a number and a unit "
            "(s, m, h, d, w), e.g. 30m, 24h or 7d"
        )
    span = timedelta(seconds=sum(float(amount) * _UNITS[unit] for amount, unit in parts))
    if span <= timedelta(0):
        raise ValueError(f"window {window!r} is empty: give a positive duration, e.g. 24h")
    return span


def container_names(containers: str | list[str]) -> list[str]:
    """Container names from a list or a comma-separated setting, in order, without repeats."""
    items = containers.split(",") if isinstance(containers, str) else containers
    names = list(dict.fromkeys(name.strip() for name in items if name.strip()))
    if not names:
        raise ValueError("containers is empty: name at least one, e.g. proxilion-gateway")
    return names


def fixed_timestamp(moment: datetime | str) -> str:
    """A time as Docker prints log timestamps: UTC, 9 fractional digits, `Z`
    (json-file stores them with trailing zeros trimmed, the local driver in local time)."""
    if isinstance(moment, datetime):
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
    match = _TS.match(moment)
    if match is None:
        return moment
    base, fraction, zone = match.groups()
    if zone != "Z":
        base = datetime.fromisoformat(base + zone).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{(fraction or '').ljust(9, '0')}Z"


@dataclass(frozen=True)
class LogSource:
    """One container's log as we will read it."""

    name: str
    id: str
    tty: bool
    driver: str
    log_path: str | None
    read: str


@dataclass
class LogStats:
    """What one container's part of a log backup holds."""

    read: str
    lines: int = 0
    stdout_lines: int = 0
    stderr_lines: int = 0
    first_timestamp: str | None = None
    last_timestamp: str | None = None
    unreadable_lines: int = 0

    def add(self, lines: int, stderr: int, first: str | None, last: str | None) -> None:
        self.lines += lines
        self.stderr_lines += stderr
        self.stdout_lines = self.lines - self.stderr_lines
        if first is not None:
            self.first_timestamp = self.first_timestamp or first
            self.last_timestamp = last


@dataclass
class CapturedLogs:
    """The staged log backup and what it holds, per container."""

    file: CompressedFile
    containers: dict[str, LogStats]
    since: str
    until: str
    seconds: float

    @property
    def lines(self) -> int:
        return sum(stats.lines for stats in self.containers.values())


@task(cache_policy=NO_CACHE)
def find_log_sources(names: list[str], read: str = "auto") -> list[LogSource]:
    """Look up every container before anything is written (an unknown name fails
    here, listing the existing ones) and choose how to read each log: `file` when
    it is a json-file log readable on this host (`auto`), else `api`."""
    if read not in LOG_READS:
        raise ValueError(f"read must be one of {', '.join(LOG_READS)}, got {read!r}")
    sources = []
    for name in names:
        container = get_container(
            name, "Fix the containers parameter (or PROXILION_DR_LOGS_CONTAINERS)"
        )
        attrs = container.attrs
        driver = attrs.get("HostConfig", {}).get("LogConfig", {}).get("Type", "")
        path = attrs.get("LogPath") or None
        readable = driver == "json-file" and bool(path) and os.access(str(path), os.R_OK)
        if read == "file" and not readable:
            raise ContainerError(
                f"cannot read the log file of {name!r} on this host (log driver {driver!r}, "
                f"path {path or 'none'}): use read='api'"
            )
        method = "file" if read == "file" or (read == "auto" and readable) else "api"
        sources.append(
            LogSource(name, container.id, bool(attrs["Config"].get("Tty")), driver, path, method)
        )
    return sources


def _frames_to_lines(data: bytes, prefixes: dict[int, bytes], out: list[bytes]) -> tuple[int, int]:
    """Turn complete multiplexed frames (8-byte header + `<ts> <message>`) into our lines;
    returns (bytes consumed, stderr lines). A partial frame waits for more data."""
    position, end, stderr = 0, len(data), 0
    while end - position >= 8:
        size = int.from_bytes(data[position + 4 : position + 8], "big")
        start = position + 8
        if end - start < size:
            break
        kind = data[position]
        body = data[start : start + size]
        stamp = body[:_TS_WIDTH]
        if stamp[-1:] != b"Z":
            stamp = fixed_timestamp(stamp.decode()).encode()
        line = stamp + prefixes.get(kind, prefixes[1]) + body[_TS_WIDTH + 1 :]
        # A partial (>16 KiB) entry or a last line without newline still ends a line here.
        out.append(line if line[-1:] == b"\n" else line + b"\n")
        stderr += kind == 2
        position = start + size
    return position, stderr


def _tty_to_lines(data: bytes, prefix: bytes, out: list[bytes]) -> tuple[int, int]:
    """The raw (TTY) log stream: `<ts> <message>\\n` lines, no frames, no stderr."""
    cut = data.rfind(b"\n") + 1
    for line in data[:cut].splitlines(keepends=True):
        out.append(line[:_TS_WIDTH] + prefix + line[_TS_WIDTH + 1 :])
    return cut, 0


def _api_params(since: datetime, until: datetime) -> dict[str, Any]:
    def stamp(moment: datetime) -> str:
        return f"{int(moment.timestamp())}.{moment.microsecond * 1000:09d}"

    return {
        "stdout": 1,
        "stderr": 1,
        "timestamps": 1,
        "follow": 0,
        "since": stamp(since),
        "until": stamp(until),
    }


def _api_batches(
    source: LogSource, since: datetime, until: datetime, stats: LogStats
) -> Iterator[bytes]:
    """One container's log in the window through the Engine API, as batches of lines."""
    api = docker_client().api
    url = f"{api.base_url}/v{api.api_version}/containers/{source.id}/logs"
    response = api.get(
        url, params=_api_params(since, until), stream=True, timeout=_API_READ_TIMEOUT
    )
    if response.status_code == 404:
        raise ContainerError(f"container {source.name!r} disappeared before its logs were read")
    if response.status_code >= 400:
        raise ContainerError(
            f"Docker refused the logs of {source.name!r}: HTTP {response.status_code} "
            f"{response.text.strip()[:200]}"
        )
    name = source.name.encode()
    prefixes = {k: b" %s %s " % (name, v.encode()) for k, v in _STREAMS.items()}
    pending = b""
    try:
        with response:
            while block := response.raw.read(CHUNK):
                data = pending + block
                out: list[bytes] = []
                if source.tty:
                    used, stderr = _tty_to_lines(data, b" %s tty " % name, out)
                else:
                    used, stderr = _frames_to_lines(data, prefixes, out)
                pending = data[used:]
                if out:
                    stats.add(
                        len(out), stderr, out[0][:_TS_WIDTH].decode(), out[-1][:_TS_WIDTH].decode()
                    )
                    yield b"".join(out)
    except (OSError, urllib3.exceptions.HTTPError, requests.RequestException) as error:
        raise _cut(source, stats, f"{type(error).__name__}: {error}") from None
    if pending:
        raise _cut(source, stats, f"the stream ended inside an entry ({len(pending)} bytes left)")


def _cut(source: LogSource, stats: LogStats, reason: str) -> LogStreamCut:
    return LogStreamCut(
        f"the log stream of container {source.name!r} was cut off after {stats.lines} "
        f"lines ({reason}); nothing was stored, run the backup again"
    )


def _rotated_files(log_path: str) -> list[Path]:
    """The json-file log and its rotations (`.1`, `.2.gz`...), oldest first."""
    current = Path(log_path)
    rotated: dict[int, Path] = {}
    for candidate in sorted(current.parent.glob(current.name + ".*")):
        number = candidate.name[len(current.name) + 1 :].removesuffix(".gz")
        if number.isdigit():  # `.1` beside `.1.gz`: Docker is still compressing it
            rotated.setdefault(int(number), candidate)
    return [rotated[number] for number in sorted(rotated, reverse=True)] + [current]


def _entry_time(line: bytes) -> str | None:
    try:
        return fixed_timestamp(json.loads(line)["time"])
    except (ValueError, KeyError, TypeError):
        return None


def _seek_to(stream: IO[bytes], size: int, since: str) -> None:
    """Position a chronological json-file log shortly before `since` by bisection,
    so a 24 h window of a months-long log does not read it all."""
    low, high = 0, size
    while high - low > CHUNK:
        middle = (low + high) // 2
        stream.seek(middle)
        stream.readline()  # the rest of a line cut in the middle
        stamp = _entry_time(stream.readline())
        if stamp is not None and stamp < since:
            low = middle
        else:
            high = middle
    stream.seek(low)
    if low:
        stream.readline()


def _json_entries(lines: bytes, stats: LogStats) -> list[dict[str, Any]]:
    """Decode a block of json-file lines in one call; line by line if one is damaged."""
    try:
        return json.loads(b"[" + lines[:-1].replace(b"\n", b",") + b"]")
    except ValueError:
        entries = []
        for line in lines.splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                stats.unreadable_lines += 1
        return entries


def _format_entries(
    entries: list[dict[str, Any]], name: str, since: str, until: str, stats: LogStats
) -> tuple[str, bool]:
    """Our lines for the entries inside [since, until]; True once past `until`."""
    out: list[str] = []
    stderr = 0
    past = False
    for entry in entries:
        stamp = entry.get("time", "")
        if len(stamp) != _TS_WIDTH or stamp[-1] != "Z":
            stamp = fixed_timestamp(stamp)
        if stamp < since:
            continue
        if stamp > until:
            past = True
            continue
        stream = entry.get("stream") or "stdout"
        stderr += stream == "stderr"
        message = entry.get("log", "")
        line = f"{stamp} {name} {stream} {message}"
        out.append(line if message[-1:] == "\n" else line + "\n")
    if out:
        stats.add(len(out), stderr, out[0][:_TS_WIDTH], out[-1][:_TS_WIDTH])
    return "".join(out), past


def _file_batches(
    source: LogSource, since: datetime, until: datetime, stats: LogStats
) -> Iterator[bytes]:
    """One container's log in the window from its json-file log on this host."""
    assert source.log_path is not None
    first, last = fixed_timestamp(since), fixed_timestamp(until)
    seek_before = fixed_timestamp(since - _SEEK_MARGIN)
    with contextlib.ExitStack() as stack:
        # Open every file first: a rotation while we read renames, it cannot hide lines.
        streams = []
        for path in _rotated_files(source.log_path):
            try:
                opened = igzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                continue  # rotated away between listing and opening
            streams.append((stack.enter_context(opened), path))
        for stream, path in streams:
            if path.suffix != ".gz":
                _seek_to(stream, os.fstat(stream.fileno()).st_size, seek_before)
            pending = b""
            while block := stream.read(CHUNK):
                data = pending + block
                cut = data.rfind(b"\n") + 1
                pending = data[cut:]
                if not cut:
                    continue
                entries = _json_entries(data[:cut], stats)
                text, past = _format_entries(entries, source.name, first, last, stats)
                if text:
                    yield text.encode()
                if past:
                    return
            # A last line without newline is still being written: it is newer than `until`.


def _log_batches(
    source: LogSource, since: datetime, until: datetime, stats: LogStats
) -> Iterator[bytes]:
    if source.read == "file":
        return _file_batches(source, since, until, stats)
    return _api_batches(source, since, until, stats)


@retrying_task(2, 10)
def capture_logs(
    sources: list[LogSource],
    since: datetime,
    until: datetime,
    staging: Path,
    compression: Compression,
    encrypt: AgeCopy | None = None,
) -> CapturedLogs:
    """Stream the containers' logs in [since, until] into one compressed, hashed file
    (age-encrypted in the same pass as `encrypt` says),
    one container after the other (each in time order), every line prefixed with its
    timestamp, container and stream. Memory stays flat whatever the log size; on any
    failure (stream cut off, disk full) the partial file is removed."""
    started = time.perf_counter()
    writer = staged_writer(staging, compression, encrypt)
    stats: dict[str, LogStats] = {}
    try:
        for source in sources:
            stats[source.name] = LogStats(read=source.read)
            for batch in _log_batches(source, since, until, stats[source.name]):
                writer.write(batch)
        compressed = writer.close()
    except OSError as error:
        writer.abort()
        raise explain_write_error(error, staging) from None
    except BaseException:
        writer.abort()
        raise
    captured = CapturedLogs(
        compressed,
        stats,
        fixed_timestamp(since),
        fixed_timestamp(until),
        round(time.perf_counter() - started, 3),
    )
    run_logger().info(
        "Captured %d log lines of %s (%d bytes → %d %s) in %.2f s",
        captured.lines,
        ", ".join(f"{s.name} via {s.read}" for s in sources),
        compressed.raw_size,
        compressed.size,
        compression,
        captured.seconds,
    )
    return captured


def logs_manifest(
    name: str, captured: CapturedLogs, window: str, duration: float, source_id: str
) -> Manifest:
    """The manifest of a log backup: the stored file plus, per container, what it holds."""
    per_container = {key: asdict(stats) for key, stats in captured.containers.items()}
    firsts = [s.first_timestamp for s in captured.containers.values() if s.first_timestamp]
    lasts = [s.last_timestamp for s in captured.containers.values() if s.last_timestamp]
    return Manifest.describe(
        "logs",
        name,
        captured.file,
        duration,
        source={
            "container": ",".join(captured.containers),
            "window": window,
            "since": captured.since,
            "until": captured.until,
            "lines": captured.lines,
            "first_timestamp": min(firsts) if firsts else None,
            "last_timestamp": max(lasts) if lasts else None,
            "line_format": LOG_LINE_FORMAT,
            "containers": per_container,
        },
        steps={"capture": captured.seconds},
        source_id=source_id,
    )
