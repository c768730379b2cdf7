"""backup-redis-aof's capture: the AOF of a running Redis, shipped piece by piece.

Each run ships what the store lacks of the Redis's multi-part AOF (tasks/redis/aof.py):
the BASE file once per generation, each INCR file as it grows (a closed one to its end,
the open one up to its last whole command outside MULTI/EXEC), each piece copied from
the files Redis writes, validated with `redis-check-aof`, scanned (times, flushes,
markers), compressed and hashed. What was shipped before comes from the store
(tasks/store/pieces.py): the newest piece of each file names where it ended.

Never stalls Redis: no rewrite is asked for, nothing is paused; the files are only
read. A rewrite may finish at any moment and delete the files being read: they are
opened before the manifest is read again (an open file stays readable), and the
run plans again when the manifest changed meanwhile. Between runs, the INCR file
Redis appends to is kept as a hard link in `<data dir>/.proxilion-dr-aof/`: when a
rewrite deletes it before the next run, that run still ships its last bytes, so no
write falls between two generations.

Each run first writes a marker (a field of `MARKER_KEY`: the Redis time, a nonce) and
ships until that marker is in a piece: this proves the files read are the AOF of the
Redis at redis_url (not another's in the same folder), and gives restores to a time
keys written at known times to check.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.clock import utc_now
from tasks.common.files import OWNER_ONLY, create_file, make_dirs
from tasks.common.secrets import redact_url
from tasks.docker.containers import find_data_dir
from tasks.redis.aof import (
    MARKER_KEY,
    PART_NAME,
    AofError,
    AofFile,
    chain_position,
    check_piece,
    manifest_file,
    parse_manifest,
    scan_aof,
)
from tasks.redis.server import connect, explain
from tasks.store.archive import SUFFIXES, CompressedFile, Compression, Manifest, iter_chunks
from tasks.store.encryption import AgeCopy, staged_writer
from tasks.store.kinds import KINDS, source_tag
from tasks.store.pieces import (
    PieceName,
    generation_name,
    generations_local,
    generations_remote,
    piece_name,
    pieces_local,
    pieces_remote,
    read_local,
    read_remote,
)

KIND = "redis-aof"
LINKS = ".proxilion-dr-aof"  # in Redis's data dir: hard links of the INCR files being shipped
MARKER_DEADLINE = 10.0  # seconds for the marker to reach the AOF file (appendfsync always/everysec)
MANIFEST_TRIES = 5


class WrongAof(RuntimeError):
    """The AOF read is not the one of the Redis at redis_url; not retried."""


@dataclass(frozen=True)
class AofSetup:
    """Where and how the Redis at redis_url keeps its AOF. `unavailable`: why there is no
    AOF to ship; `no_pitr`: why its pieces cannot be restored to a time."""

    redis_version: str
    folder: Path | None  # the AOF folder on this host
    data_dir: Path | None
    appendfilename: str
    unavailable: str = ""
    no_pitr: str = ""


@task(cache_policy=NO_CACHE)
def inspect_aof(redis_url: str, container: str | None, data_dir: str | None) -> AofSetup:
    """appendonly, aof-timestamp-enabled and where the AOF folder is on this host: the
    container's mount of Redis's `dir`, `data_dir`, or Redis's own `dir` when it runs
    on this host."""
    client = connect(redis_url)
    try:
        version = str(client.info("server")["redis_version"])
        config = dict(client.config_get("append*"))
        config.update(client.config_get("aof-timestamp-enabled"))
        config.update(client.config_get("dir"))
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    name = config.get("appendfilename") or "appendonly.aof"
    if config.get("appendonly") != "yes":
        why = (
            f"Redis at {redact_url(redis_url)} runs with appendonly no: it writes no AOF, so "
            "there is nothing to ship and no point-in-time recovery (turn it on: `CONFIG SET "
            "appendonly yes`, then `CONFIG REWRITE` or `appendonly yes` in redis.conf)"
        )
        return AofSetup(version, None, None, name, unavailable=why)
    if not config.get("appenddirname"):
        why = f"Redis {version} keeps a single-file AOF: point-in-time shipping needs Redis 7"
        return AofSetup(version, None, None, name, unavailable=why)
    if data_dir or container:
        folder = find_data_dir(container or None, config.get("dir"), data_dir or None)
    else:
        folder = Path(config.get("dir") or ".")
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Redis's dir {folder} is not a folder on this host: name its container or "
                "set data_dir to the host folder holding its appendonlydir"
            )
    no_pitr = ""
    if config.get("aof-timestamp-enabled") != "yes":
        no_pitr = (
            "aof-timestamp-enabled is no, so the AOF records no times and cannot be cut at "
            "one: the pieces restore the newest shipped state and undo_flushall still "
            "works; turn it on with `CONFIG SET aof-timestamp-enabled yes` (and in redis.conf)"
        )
    return AofSetup(version, folder / config["appenddirname"], folder, name, no_pitr=no_pitr)


@dataclass(frozen=True)
class Marker:
    """The marker this run wrote: field (Redis time, seconds) and its nonce."""

    field: str
    nonce: str
    written_at: float  # Redis's time of the write


@task(cache_policy=NO_CACHE)
def write_marker(redis_url: str, keep_days: float) -> Marker:
    """HSET a fresh marker (Redis time → nonce) and drop the markers older than
    `keep_days` (the hash stays small; the deletions are in the AOF too)."""
    client = connect(redis_url)
    try:
        seconds, micros = client.time()
        marker = Marker(str(seconds), uuid.uuid4().hex[:16], seconds + micros / 1e6)
        client.hset(MARKER_KEY, marker.field, marker.nonce)
        old = [
            f
            for f in client.hkeys(MARKER_KEY)
            if f.isdigit() and int(f) < seconds - keep_days * 86400
        ]
        if old:
            client.hdel(MARKER_KEY, *old)
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    return marker


def redis_time(redis_url: str) -> float:
    client = connect(redis_url)
    try:
        seconds, micros = client.time()
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    return seconds + micros / 1e6


# ----------------------------------------------------------------- what was shipped


@dataclass
class FileShipped:
    """How far one AOF file of a generation was shipped (its newest piece's manifest)."""

    end: int
    closed: bool
    inode: int
    ts: int | None
    db: int


@dataclass
class Shipped:
    """What the store holds of the newest generation of a source."""

    generation: str
    base: dict[str, Any]  # the base file's fingerprint: name, size, inode, mtime_ns
    files: dict[str, FileShipped] = field(default_factory=dict)
    last_ts: int | None = None  # the last time annotation shipped
    complete: bool = False  # its last INCR file was shipped to its end after it closed
    newest: list[str] = field(default_factory=list)  # the newest piece of each file
    newest_at: str = ""  # when the newest of those was stored

    @classmethod
    def from_manifests(cls, generation: str, manifests: list[Manifest]) -> Shipped:
        """From the newest piece manifest of each file of the generation."""
        base: dict[str, Any] = {}
        files: dict[str, FileShipped] = {}
        last_ts = None
        for m in sorted(manifests, key=lambda m: chain_position(m.source)):
            s = m.source
            if s["part"] == "base":
                base = s["fingerprint"]
            files[s["file"]] = FileShipped(
                s["end"], s["closed"], s["inode"], s.get("ts_end"), s.get("db_end", 0)
            )
            last_ts = s.get("ts_end") or last_ts
        incr = [m for m in manifests if m.source["part"] == "incr"]
        complete = bool(incr) and all(files[m.source["file"]].closed for m in incr)
        newest = [m.name for m in manifests]
        newest_at = max((m.created_at for m in manifests), default="")
        return cls(generation, base, files, last_ts, complete, newest, newest_at)


# --------------------------------------------------------------------- the pieces


@dataclass
class StagedPiece:
    """A piece compressed and hashed in the kind's folder, with its manifest."""

    file: CompressedFile
    manifest: Manifest

    def discard(self) -> None:
        """Remove the staged files (a piece that is not stored)."""
        self.file.path.unlink(missing_ok=True)
        if self.file.encrypted is not None:
            self.file.encrypted.path.unlink(missing_ok=True)


@dataclass
class ShipRun:
    """One run's plan and results: the pieces staged in order, and what the report says."""

    generation: str
    new_generation: bool
    pieces: list[StagedPiece] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    marker_piece: str = ""
    link: str = ""


def _open_all(folder: Path, files: list[AofFile]) -> dict[str, IO[bytes]]:
    opened: dict[str, IO[bytes]] = {}
    try:
        for f in files:
            opened[f.name] = open(folder / f.name, "rb")  # noqa: SIM115 - closed by the caller
    except FileNotFoundError:
        for stream in opened.values():
            stream.close()
        raise
    return opened


@contextlib.contextmanager
def stable_files(
    folder: Path, appendfilename: str
) -> Iterator[tuple[list[AofFile], dict[str, IO[bytes]]]]:
    """The manifest's base and incr files, each opened, with a manifest that did not
    change while they were opened (a rewrite finishing meanwhile: read it again)."""
    path = manifest_file(folder, appendfilename)
    for _ in range(MANIFEST_TRIES):
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise AofError(
                f"no AOF manifest at {path} yet: Redis is writing its first AOF (appendonly "
                "just turned on?), or the data dir is not its; the next run ships it"
            ) from None
        files = [f for f in parse_manifest(text) if f.type in ("b", "i")]
        try:
            opened = _open_all(folder, files)
        except FileNotFoundError:
            continue  # deleted by a rewrite between the two reads
        if path.read_text() == text:
            try:
                yield files, opened
            finally:
                for stream in opened.values():
                    stream.close()
            return
        for stream in opened.values():
            stream.close()
    raise AofError(f"the AOF manifest {path} kept changing ({MANIFEST_TRIES} reads): try again")


def _fingerprint(name: str, stream: IO[bytes]) -> dict[str, Any]:
    st = os.fstat(stream.fileno())
    return {"name": name, "size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}


def _part(name: str) -> tuple[int, str]:
    match = PART_NAME.fullmatch(name)
    if match is None:
        raise AofError(f"AOF file {name!r} is not named like a Redis 7 AOF part")
    return int(match["seq"]), match["type"]


@dataclass
class Piece:
    """What one piece is cut from: a file (open stream), a byte range, its context."""

    file: str
    stream: IO[bytes]
    start: int
    closed: bool
    ts: int | None = None
    db: int = 0


class Shipper:
    """Stages the pieces of one run in the kind's folder of the backup dir."""

    def __init__(
        self,
        backup_dir: Path,
        source_id: str,
        compression: Compression,
        encrypt: AgeCopy | None,
        facts: dict[str, Any],
    ) -> None:
        self.folder = Path(backup_dir) / KINDS[KIND].folder
        self.source_id = source_id
        self.compression = compression
        self.encrypt = encrypt
        self.facts = facts  # what every piece's manifest records (server, versions, read_at)
        make_dirs(self.folder, OWNER_ONLY.directory)

    def _staging(self, what: str) -> Path:
        stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
        tag = source_tag(self.source_id)
        suffix = ".raw" if what == "raw" else SUFFIXES[self.compression]
        return self.folder / f".aof_{stamp}_{tag}.piece{suffix}.{uuid.uuid4().hex[:8]}.partial"

    def copy_raw(self, piece: Piece) -> tuple[Path, Any]:
        """The file's bytes from `piece.start` to its end (as it is now) into a raw
        staging file, hashed (SHA-256) on the way."""
        raw = self._staging("raw")
        digest = hashlib.sha256()
        piece.stream.seek(piece.start)
        with create_file(raw) as out:
            for chunk in iter_chunks(piece.stream):
                out.write(chunk)
                digest.update(chunk)
        return raw, digest

    def stage(
        self, generation: str, piece: Piece, raw: Path, facts: dict[str, Any], started: float
    ) -> StagedPiece:
        """Compress and hash the raw bytes (validated by the caller) into a staged piece."""
        name = piece_name(
            KIND, self.source_id, generation, piece.file, piece.start, self.compression
        )
        writer = staged_writer(self._staging("data"), self.compression, self.encrypt)
        try:
            with open(raw, "rb") as source:
                for chunk in iter_chunks(source):
                    writer.write(chunk)
            compressed = writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            raw.unlink(missing_ok=True)
        seq, part = _part(piece.file)
        source = {
            **self.facts,
            "generation": generation,
            "file": piece.file,
            "seq": seq,
            "part": part,
            "start": piece.start,
            "end": piece.start + compressed.raw_size,
            "closed": piece.closed,
            "inode": os.fstat(piece.stream.fileno()).st_ino,
            **facts,
        }
        manifest = Manifest.describe(
            KIND,
            name,
            compressed,
            round(time.perf_counter() - started, 3),
            source,
            source_id=self.source_id,
        )
        return StagedPiece(compressed, manifest)

    def base(self, piece: Piece, prior: dict[str, Any], now: datetime) -> StagedPiece:
        """The BASE file whole, starting a generation named after `now` and its digest:
        validated (an RDB base fully, with its key count), its time (RDB `ctime`, or
        its first annotation) and fingerprint recorded, with `prior` (the generation
        before it: its name, whether it was shipped to its end, its last time)."""
        started = time.perf_counter()
        raw, digest = self.copy_raw(piece)
        try:
            check = check_piece(raw, f"AOF base {piece.file}", "base")
            first_ts = None
            if piece.file.endswith(".aof"):
                stamps = scan_aof(raw, 0).timestamps
                first_ts = stamps[0][0] if stamps else None
        except BaseException:
            raw.unlink(missing_ok=True)
            raise
        fingerprint = _fingerprint(piece.file, piece.stream)
        facts = {
            "fingerprint": fingerprint,
            "base_time": check.ctime if check.ctime is not None else first_ts,
            # written by an AOF rewrite (its state: the fork's moment), or an RDB a
            # restore placed as the base (its state: the backup's, from the restore on)
            "base_rewritten": check.aof_base or piece.file.endswith(".aof"),
            "base_mtime": fingerprint["mtime_ns"] / 1e9,
            "base_keys": check.keys,
            "base_already_expired": check.already_expired,
            "check": check.summary(),
            "previous": prior,
        }
        return self.stage(generation_name(now, digest.hexdigest()), piece, raw, facts, started)

    def incr(self, generation: str, piece: Piece) -> StagedPiece | None:
        """An INCR file from `start` to its last whole command outside MULTI/EXEC (a
        closed file must end on one). None when there is nothing new."""
        started = time.perf_counter()
        raw, _digest = self.copy_raw(piece)
        try:
            scan = scan_aof(raw, piece.start, piece.ts, piece.db)
            size = piece.start + raw.stat().st_size
            if piece.closed and scan.end != size:
                raise AofError(
                    f"closed AOF file {piece.file} ends in a partial command at byte {scan.end} "
                    f"of {size}: it is damaged (redis-check-aof --fix would cut it)"
                )
            if scan.end == piece.start:
                raw.unlink()
                return None
            os.truncate(raw, scan.end - piece.start)
            check = check_piece(raw, f"AOF {piece.file} bytes {piece.start}-{scan.end}", "incr")
        except BaseException:
            raw.unlink(missing_ok=True)
            raise
        facts = {
            "ts_start": piece.ts,
            "db_start": piece.db,
            **scan.facts(),
            "check": check.summary(),
        }
        return self.stage(generation, piece, raw, facts, started)


def _same_base(shipped: Shipped | None, fingerprint: dict[str, Any]) -> bool:
    return shipped is not None and shipped.base == fingerprint


def _tail_source(shipped: Shipped, data_dir: Path, folder: Path) -> tuple[str, IO[bytes]] | None:
    """The INCR file the shipped generation was still appending to, if it can still be
    read whole: our hard link of it, else the file itself (a `history` file a rewrite
    has not deleted yet); the same inode as shipped."""
    for name, state in shipped.files.items():
        if state.closed or not name.endswith(".incr.aof"):
            continue
        for path in (data_dir / LINKS / shipped.generation / name, folder / name):
            with contextlib.suppress(FileNotFoundError):
                stream = open(path, "rb")  # noqa: SIM115 - closed by the caller
                if os.fstat(stream.fileno()).st_ino == state.inode:
                    return name, stream
                stream.close()
        return None
    return None


def keep_link(data_dir: Path, generation: str, folder: Path, name: str) -> str:
    """Hard-link the INCR file Redis appends to into `<data dir>/.proxilion-dr-aof/`, so
    its last bytes outlive a rewrite until the next run ships them. Returns a note when
    that is impossible (then such a rewrite loses the writes since the last run)."""
    target = data_dir / LINKS / generation / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and target.stat().st_ino == (folder / name).stat().st_ino:
            return ""
        target.unlink(missing_ok=True)
        os.link(folder / name, target)
    except OSError as error:
        return (
            f"could not keep a hard link of {name} in {target.parent} ({error.strerror}): an AOF "
            "rewrite between two runs loses the writes since the last run"
        )
    return ""


@task(cache_policy=NO_CACHE)
def release_links(data_dir: Path, generation: str, name: str) -> None:
    """Remove every hard link but the one of the file being appended to: their bytes are
    stored now."""
    root = Path(data_dir) / LINKS
    if not root.is_dir():
        return
    for folder in root.iterdir():
        for link in list(folder.iterdir()) if folder.is_dir() else []:
            if (folder.name, link.name) != (generation, name):
                link.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@task(cache_policy=NO_CACHE)
def ship_aof(
    setup: AofSetup,
    redis_url: str,
    marker: Marker,
    shipped: Shipped | None,
    shipper: Shipper,
) -> ShipRun:
    """Stage every piece the store lacks, in order: the end of the previous
    generation (when a rewrite started a new one), the new base, each INCR file from
    where it was shipped; until a piece holds this run's `marker`."""
    assert setup.folder is not None and setup.data_dir is not None
    deadline = time.monotonic() + MARKER_DEADLINE
    with stable_files(setup.folder, setup.appendfilename) as (files, opened):
        bases = [f for f in files if f.type == "b"]
        incrs = [f for f in files if f.type == "i"]
        if len(bases) != 1 or not incrs:
            raise AofError(f"AOF manifest in {setup.folder} lists {len(bases)} base and "
                           f"{len(incrs)} incr files: not a Redis 7 AOF to ship")  # fmt: skip
        fingerprint = _fingerprint(bases[0].name, opened[bases[0].name])
        run = ShipRun(shipped.generation if shipped else "", not _same_base(shipped, fingerprint))
        if run.new_generation:
            prior: dict[str, Any] = {}
            if shipped is not None:
                prior = _finish_previous(shipper, shipped, setup, run)
            base = Piece(bases[0].name, opened[bases[0].name], 0, closed=True)
            run.pieces.append(shipper.base(base, prior, utc_now()))
            run.generation = run.pieces[-1].manifest.source["generation"]
        for position, aof in enumerate(incrs):
            state = None if run.new_generation or shipped is None else shipped.files.get(aof.name)
            if state is not None and state.closed:
                continue
            closed = position < len(incrs) - 1
            piece = Piece(aof.name, opened[aof.name], state.end if state else 0, closed,
                          state.ts if state else None, state.db if state else 0)  # fmt: skip
            while True:
                staged = shipper.incr(run.generation, piece)
                if staged is not None:
                    run.pieces.append(staged)
                    s = staged.manifest.source
                    piece = Piece(
                        aof.name, piece.stream, s["end"], closed, s["ts_end"], s["db_end"]
                    )
                if closed or _holds(run, marker) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # polling the file Redis appends to, with a deadline
        if not _holds(run, marker):
            raise WrongAof(
                f"the AOF in {setup.folder} does not hold the marker this run wrote to the Redis "
                f"at {redact_url(redis_url)} ({MARKER_KEY} {marker.field}) after "
                f"{MARKER_DEADLINE:.0f} s: it is another Redis's AOF (check data_dir and the "
                "container), or this Redis does not write its AOF"
            )
        note = keep_link(setup.data_dir, run.generation, setup.folder, incrs[-1].name)
        run.link = incrs[-1].name
        if note:
            run.notes.append(note)
    return run


def _holds(run: ShipRun, marker: Marker) -> bool:
    for staged in run.pieces:
        for event in staged.manifest.source.get("markers") or []:
            if event.get("nonce") == marker.nonce:
                run.marker_piece = staged.manifest.name
                return True
    return False


def _finish_previous(
    shipper: Shipper, shipped: Shipped, setup: AofSetup, run: ShipRun
) -> dict[str, Any]:
    """Ship the last bytes of the generation a rewrite (or a restore) ended; say what
    the new base follows and whether nothing of the old one was lost."""
    assert setup.data_dir is not None and setup.folder is not None
    source = _tail_source(shipped, setup.data_dir, setup.folder)
    complete, last_ts = shipped.complete, shipped.last_ts
    if source is not None:
        name, stream = source
        state = shipped.files[name]
        with stream:
            piece = Piece(name, stream, state.end, True, state.ts, state.db)
            staged = shipper.incr(shipped.generation, piece)
        if staged is not None:
            run.pieces.append(staged)
            last_ts = staged.manifest.source["ts_end"] or last_ts
        complete = True
    elif not complete:
        run.notes.append(
            f"generation {shipped.generation} ended before its last bytes were shipped (no hard "
            "link kept): times after its last piece and before the new base cannot be restored"
        )
    return {"generation": shipped.generation, "complete": complete, "last_ts": last_ts}


@task(cache_policy=NO_CACHE)
def load_shipped(
    backup_dir: Path,
    source_id: str,
    s3_bucket: str,
    s3_prefix: str,
    s3_endpoint_url: str | None,
) -> Shipped | None:
    """What the store holds of the source's newest generation: from the backup dir, or,
    when it has none (a new host), from S3; None when neither has any."""
    found = _newest_shipped(
        generations_local(backup_dir, KIND, source_id),
        lambda g: pieces_local(backup_dir, KIND, source_id, g),
        lambda n: read_local(backup_dir, n),
    )
    if found is not None or not s3_bucket:
        return found
    return _newest_shipped(
        generations_remote(s3_bucket, s3_prefix, KIND, source_id, s3_endpoint_url),
        lambda g: pieces_remote(s3_bucket, s3_prefix, KIND, source_id, g, s3_endpoint_url),
        lambda n: read_remote(s3_bucket, s3_prefix, n, s3_endpoint_url),
    )


def _newest_shipped(
    generations: list[str],
    pieces: Callable[[str], list[PieceName]],
    read: Callable[[str], Manifest],
) -> Shipped | None:
    for generation in reversed(generations):
        newest = {p.file: p for p in pieces(generation)}  # sorted: the last starts latest
        if newest:
            return Shipped.from_manifests(generation, [read(p.name) for p in newest.values()])
    return None
