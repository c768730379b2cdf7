"""The Redis 7 append-only file as point-in-time recovery reads it: the manifest of a
multi-part AOF, a scanner of AOF bytes (times, the last safe cut, FLUSHALL/FLUSHDB,
the marker keys), and `redis-check-aof` (validate, cut at a time).

A Redis 7 AOF is a folder (`appenddirname`) holding a BASE file (an RDB with
`aof-use-rdb-preamble yes`, else commands), INCR files of commands appended since,
and a manifest naming them in order: `file appendonly.aof.3.base.rdb seq 3 type b`,
`… type i` (incr; the last one is the file Redis appends to), `… type h` (history,
about to be deleted after a rewrite). With `aof-timestamp-enabled yes`, Redis writes
an annotation `#TS:<unix seconds>` before the first command of each new second:
every command belongs to the second of the annotation before it.

Cut points. A cut must leave a valid AOF: after a whole command, never between
MULTI and EXEC. `redis-check-aof --truncate-to-timestamp T <manifest>` cuts only the
LAST file of the manifest, at the first annotation later than T, and refuses when
that file has nothing before T: the files after the one to cut are dropped and the
manifest rewritten first (`cut_for_time`).
"""

from __future__ import annotations

import mmap
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The hash every backup-redis-aof run writes one field into (field: the Redis time of
# the write, value: a nonce), so a restore to a time can be checked: fields written
# up to that time exist, later ones do not.
MARKER_KEY = "proxilion-dr:pitr-markers"
CHECK_TIMEOUT = 600.0
# A Redis 7 AOF part's name: `<appendfilename>.<seq>.<base|incr>.<rdb|aof>`.
PART_NAME = re.compile(r"^(?P<stem>.+)\.(?P<seq>\d+)\.(?P<type>base|incr)\.(?P<format>rdb|aof)$")


class AofError(ValueError):
    """An AOF (or a piece of one) is not what Redis would load."""


@dataclass(frozen=True)
class AofFile:
    """One line of a multi-part AOF's manifest."""

    name: str
    seq: int
    type: str  # b: base, i: incr, h: history (deleted after a rewrite)


def manifest_file(folder: Path, appendfilename: str) -> Path:
    return Path(folder) / f"{appendfilename}.manifest"


def parse_manifest(text: str) -> list[AofFile]:
    """The files of a Redis 7 AOF manifest, in its order (names may be quoted)."""
    files = []
    for line in text.splitlines():
        words = shlex.split(line)
        if not words:
            continue
        pairs = dict(zip(words[::2], words[1::2], strict=False))
        try:
            files.append(AofFile(pairs["file"], int(pairs["seq"]), pairs["type"]))
        except (KeyError, ValueError):
            raise AofError(f"AOF manifest line {line!r} is not `file … seq … type …`") from None
    return files


def manifest_text(files: list[AofFile]) -> str:
    """A manifest Redis 7 loads: the base first, then the incr files in order."""
    return "".join(f"file {shlex.quote(f.name)} seq {f.seq} type {f.type}\n" for f in files)


def part_name(appendfilename: str, seq: int, kind: str, fmt: str) -> str:
    """`appendonly.aof.3.incr.aof`: how Redis names an AOF part."""
    return f"{appendfilename}.{seq}.{kind}.{fmt}"


def chain_position(piece: dict[str, Any]) -> tuple[bool, int, int]:
    """Where a piece (its manifest's source facts) goes in its chain: the base first,
    then the incr files by sequence number, each by offset."""
    return piece["part"] != "base", int(piece["seq"]), int(piece["start"])


# ------------------------------------------------------------------------- scanning


@dataclass
class Scan:
    """What a scan of AOF bytes found. Offsets are absolute in the AOF file.

    `end`: just after the last whole command (or annotation) outside MULTI/EXEC, the
    last place the file may be cut; `ts`/`db`: the time and database in force there.
    `timestamps`: each `#TS` annotation as (time, offset of its line). `flushes`:
    each FLUSHALL/FLUSHDB with the offset to cut at to undo it (its MULTI's start
    when inside one). `markers`: each write to `MARKER_KEY` (HSET / HDEL fields)."""

    start: int
    end: int
    ts: int | None
    db: int
    commands: int = 0
    timestamps: list[list[int]] = field(default_factory=list)
    flushes: list[dict[str, Any]] = field(default_factory=list)
    markers: list[dict[str, Any]] = field(default_factory=list)
    last_command: dict[str, Any] | None = None

    def facts(self) -> dict[str, Any]:
        """The scan as a manifest records it."""
        return {
            "commands": self.commands,
            "ts_end": self.ts,
            "db_end": self.db,
            "timestamps": self.timestamps,
            "flushes": self.flushes,
            "markers": self.markers,
            "last_command": self.last_command,
        }


def _text(value: bytes, limit: int = 120) -> str:
    return value[:limit].decode("utf-8", errors="replace")


def scan_aof(
    path: Path,
    start: int,
    ts: int | None = None,
    db: int = 0,
    end: int | None = None,
    begin: int | None = None,
) -> Scan:
    """Scan the AOF commands of `path` (whose first byte is at offset `start` of the AOF
    file) from `begin` (default: its first byte) up to `end` (absolute; default: the
    whole file), with `ts` and `db` in force at `begin`. A command cut off by the end
    is left out of the scan (its bytes are after `Scan.end`); bytes that are no AOF
    at all raise AofError."""
    size = Path(path).stat().st_size
    first = (begin if begin is not None else start) - start
    stop = size if end is None else min(size, end - start)
    found = Scan(start=start + first, end=start + first, ts=ts, db=db)
    if stop <= first:
        return found
    with open(path, "rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as m:
        _scan(m, first, stop, found)
    return found


def _scan(m: mmap.mmap, pos: int, stop: int, found: Scan) -> None:  # noqa: C901 - one machine
    base = found.start - pos
    multi_start: int | None = None
    ts, db = found.ts, found.db
    while pos < stop:
        line_end = m.find(b"\r\n", pos, stop)
        if line_end < 0:
            return
        head = m[pos:line_end]
        if head.startswith(b"#"):
            if head.startswith(b"#TS:"):
                ts = int(head[4:])
                found.timestamps.append([ts, base + pos])
            pos = line_end + 2
            if multi_start is None:
                found.end, found.ts = base + pos, ts
            continue
        if not head.startswith(b"*"):
            raise AofError(f"not an AOF command at byte {base + pos}: {_text(head, 40)!r}")
        count, cursor, args = int(head[1:]), line_end + 2, []
        for _ in range(count):
            length_end = m.find(b"\r\n", cursor, stop)
            if length_end < 0:
                return
            if m[cursor : cursor + 1] != b"$":
                raise AofError(f"not an AOF bulk string at byte {base + cursor}")
            length = int(m[cursor + 1 : length_end])
            value_start = length_end + 2
            if value_start + length + 2 > stop:
                return
            if len(args) < 4:
                args.append(m[value_start : value_start + min(length, 512)])
            cursor = value_start + length + 2
        command_start, pos = base + pos, cursor
        name = args[0].decode("ascii", errors="replace").lower() if args else ""
        found.commands += 1
        if name == "select" and len(args) > 1:
            db = int(args[1])
        elif name == "multi":
            multi_start = command_start
        elif name in ("flushall", "flushdb"):
            cut = multi_start if multi_start is not None else command_start
            found.flushes.append({"offset": cut, "ts": ts, "command": name.upper(), "db": db})
        elif name in ("hset", "hdel") and len(args) > 2 and args[1] == MARKER_KEY.encode():
            event = {"ts": ts, "db": db, "offset": command_start, "field": _text(args[2])}
            if name == "hset" and len(args) > 3:
                event["nonce"] = _text(args[3])
            else:
                event["deleted"] = True
            found.markers.append(event)
        if name == "exec":
            multi_start = None
        if multi_start is None:
            key = _text(args[1]) if len(args) > 1 and name not in ("select", "exec") else ""
            found.end, found.ts, found.db = base + pos, ts, db
            found.last_command = {
                "name": name.upper(),
                "key": key,
                "offset": command_start,
                "ts": ts,
            }


# ------------------------------------------------------------------ redis-check-aof


@dataclass(frozen=True)
class AofCheck:
    """redis-check-aof's verdict on a file or a manifest, and what it read of an RDB
    base: its key counts and `ctime`, and whether Redis wrote it as an AOF base
    (`aof-base` aux field; a restore's RDB placed as a base has none)."""

    valid: bool
    output: str
    keys: int | None = None
    already_expired: int | None = None
    ctime: int | None = None
    aof_base: bool = False

    def summary(self) -> str:
        if not self.valid:
            return "redis-check-aof: NOT valid: " + " | ".join(self.output.splitlines()[-3:])
        keys = f", RDB base with {self.keys} keys" if self.keys is not None else ""
        return f"redis-check-aof: valid{keys}"


def _info(output: str, pattern: str) -> int | None:
    match = re.search(pattern, output)
    return int(match.group(1)) if match else None


def redis_check_aof(*args: str, timeout: float = CHECK_TIMEOUT) -> AofCheck:
    """Run `redis-check-aof` with `args` (a file or manifest, after options)."""
    exe = shutil.which("redis-check-aof")
    if exe is None:
        raise AofError(
            "redis-check-aof is not on PATH: install Debian's redis-tools (it validates every "
            "AOF piece and cuts the AOF at a time)"
        )
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, timeout=timeout, check=False, errors="replace"
        )
    except subprocess.TimeoutExpired:
        what = " ".join(args)
        raise AofError(f"redis-check-aof {what} did not finish in {timeout:.0f} s") from None
    output = (done.stdout + done.stderr).strip()
    return AofCheck(
        valid=done.returncode == 0,
        output=output,
        keys=_info(output, r"\[info\] (\d+) keys read"),
        already_expired=_info(output, r"\[info\] (\d+) already expired"),
        ctime=_info(output, r"AUX FIELD ctime = '(\d+)'"),
        aof_base=_info(output, r"AUX FIELD aof-base = '(\d+)'") == 1,
    )


def check_piece(path: Path, what: str, part: str) -> AofCheck:
    """Validate one AOF part, or a piece of one (`part`: base or incr), whole commands;
    an RDB base fully. It is checked through a one-line manifest beside it: given a
    plain file, redis-check-aof 7.0 takes any file with a line starting `file` (a
    value holding "\nfile…") for a manifest, and fails it."""
    folder = Path(tempfile.mkdtemp(prefix=".check-", dir=Path(path).parent))
    try:
        name = f"piece.1.{part}.{'rdb' if _is_rdb(path) else 'aof'}"
        os.link(path, folder / name)
        (folder / "piece.manifest").write_text(manifest_text([AofFile(name, 1, part[0])]))
        verdict = redis_check_aof(str(folder / "piece.manifest"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not verdict.valid:
        raise AofError(f"{what}: {verdict.summary()}")
    return verdict


def _is_rdb(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(5) == b"REDIS"


def check_chain(folder: Path, appendfilename: str) -> AofCheck:
    """Validate a whole multi-part AOF folder through its manifest."""
    verdict = redis_check_aof(str(manifest_file(folder, appendfilename)))
    if not verdict.valid:
        raise AofError(f"the AOF assembled in {folder}: {verdict.summary()}")
    return verdict


def truncate_to_timestamp(folder: Path, appendfilename: str, ts: int) -> AofCheck:
    """`redis-check-aof --truncate-to-timestamp`: cut the manifest's LAST file at the
    first annotation later than `ts`."""
    verdict = redis_check_aof(
        "--truncate-to-timestamp", str(ts), str(manifest_file(folder, appendfilename))
    )
    if not verdict.valid:
        raise AofError(f"redis-check-aof could not cut the AOF at {ts}: {verdict.summary()}")
    return verdict
