"""Point-in-time recovery: the AOF pieces backup-redis-aof shipped, put back together
and cut at a second, or just before a FLUSHALL/FLUSHDB; the restore path that
recover-redis (`target_time`, `undo_flushall`) and the restore drill share.

    load_generations   the source's generations and what each covers (from manifests)
    plan_time / plan_flush   the generation, the pieces and the cut
    fetch_chain        each piece here, else from S3, size and SHA-256 verified
    stage_chain        the AOF folder assembled in a hidden folder, cut, validated with
                       redis-check-aof, the last command kept read back
    place_chain        renamed into the data dir as Redis's AOF folder

Which generation holds a time. A generation's base is the state at one moment: the
fork of the AOF rewrite that wrote it (its RDB `ctime`), or, for an RDB a restore
placed as the base (no `aof-base` field), the restore (its file's mtime). Its INCR
files hold every write after. So a generation covers a time from that moment (never
before the last write of the generation it followed) to the moment the next one took
over when its INCR files were shipped to their end, else to its last piece's read.
A time no generation covers is refused with the ranges that are covered.

A cut at a time keeps every command annotated at or before that second: the first
annotation later than it is where `redis-check-aof --truncate-to-timestamp` cuts the
last file kept (the INCR files after it are dropped, the manifest rewritten first);
the offset the manifests predict is checked against the file it leaves.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.aside import unique_folder
from tasks.common.files import OWNER_ONLY, chown_like, create_file, folder_mode, fsync_dir
from tasks.redis.aof import (
    AofCheck,
    AofError,
    AofFile,
    chain_position,
    check_chain,
    manifest_file,
    manifest_text,
    part_name,
    scan_aof,
    truncate_to_timestamp,
)
from tasks.redis.setup import RedisSetup
from tasks.store.archive import Manifest, iter_chunks, open_decompressed
from tasks.store.find import FoundBackup, fetch_piece
from tasks.store.local import BackupNotFound
from tasks.store.pieces import (
    generations_local,
    generations_remote,
    newest_local,
    newest_remote,
    pieces_local,
    pieces_remote,
    read_local,
    read_remote,
)

KIND = "redis-aof"


def parse_target_time(text: str) -> int:
    """A restore time as an operator types it: UTC `2026-01-01 14:02:05` (a `T` or
    fractions of a second allowed), or ISO 8601 with `Z` or an offset; as Unix seconds."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"target_time {text!r} is not a time: give it in UTC as `2026-01-01 14:02:05` "
            "(or ISO 8601 with an offset, e.g. `2026-01-01T16:02:05+02:00`)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def utc(ts: float | None) -> str:
    """A Redis time as the reports write it."""
    if ts is None:
        return "unknown"
    return f"{datetime.fromtimestamp(ts, UTC):%Y-%m-%d %H:%M:%S} UTC"


@dataclass
class Generation:
    """A base and the pieces after it, as the store holds them (chain order), and the
    times it covers (Redis's clock, whole seconds)."""

    name: str
    pieces: list[Manifest] = field(default_factory=list)
    start: int | None = None
    end: int | None = None
    complete: bool = False  # its INCR files were shipped to their end
    timed: bool = True  # every piece was shipped with aof-timestamp-enabled yes

    @property
    def base(self) -> Manifest:
        return self.pieces[0]

    def covers(self) -> str:
        return f"{utc(self.start)} → {utc(self.end)}"

    def markers(self) -> list[dict[str, Any]]:
        """The marker events of its INCR pieces, in chain order, with their file."""
        return [
            {**event, "file": m.source["file"], "seq": m.source["seq"]}
            for m in self.pieces
            if m.source["part"] == "incr"
            for event in m.source.get("markers") or []
        ]


@dataclass(frozen=True)
class Where:
    """Where the pieces are looked for: the backup dir, else S3."""

    backup_dir: Path
    s3_bucket: str
    s3_prefix: str
    s3_endpoint_url: str | None
    identity_file: Path | None = None


def _read(where: Where, name: str, local: bool) -> Manifest:
    if local:
        return read_local(where.backup_dir, name)
    return read_remote(where.s3_bucket, where.s3_prefix, name, where.s3_endpoint_url)


def _pieces(where: Where, source_id: str, generation: str) -> list[tuple[str, bool]]:
    """The complete pieces of a generation: local ones, and those only S3 has."""
    local = {p.name for p in pieces_local(where.backup_dir, KIND, source_id, generation)}
    remote: set[str] = set()
    if where.s3_bucket:
        found = pieces_remote(
            where.s3_bucket, where.s3_prefix, KIND, source_id, generation, where.s3_endpoint_url
        )
        remote = {p.name for p in found} - local
    return [(n, True) for n in sorted(local)] + [(n, False) for n in sorted(remote)]


@task(cache_policy=NO_CACHE)
def load_generations(where: Where, source_id: str) -> list[Generation]:
    """Every generation of the source (here and in S3), oldest first, with its pieces'
    manifests and what it covers."""
    names = set(generations_local(where.backup_dir, KIND, source_id))
    if where.s3_bucket:
        names |= set(
            generations_remote(
                where.s3_bucket, where.s3_prefix, KIND, source_id, where.s3_endpoint_url
            )
        )
    generations = []
    for name in sorted(names):
        manifests = [_read(where, n, local) for n, local in _pieces(where, source_id, name)]
        manifests.sort(key=lambda m: chain_position(m.source))
        if manifests and manifests[0].source["part"] == "base":
            generations.append(Generation(name, manifests))
    _coverage(generations)
    return generations


def _coverage(generations: list[Generation]) -> None:
    """Set each generation's start, end and completeness (see the module docstring)."""
    for position, g in enumerate(generations):
        base = g.base.source
        start = base.get("base_time")
        if not base.get("base_rewritten") and base.get("base_mtime"):
            start = max(start or 0, int(base["base_mtime"]))  # a restore's RDB as the base
        previous = base.get("previous") or {}
        if previous.get("last_ts"):
            start = max(start or 0, int(previous["last_ts"]))
        first_incr = next((m.source for m in g.pieces if m.source["part"] == "incr"), None)
        if base.get("base_rewritten") and first_incr and first_incr.get("timestamps"):
            first = first_incr["timestamps"][0]
            if first[1] == first_incr["start"]:  # Redis's clock may lag the fork's by a tick
                start = min(start or first[0], first[0])
            else:  # commands without a time come first: the time starts at the first one
                start = max(start or 0, first[0])
        g.start = start
        g.timed = all(m.source.get("timestamps_enabled", True) for m in g.pieces)
        later = generations[position + 1] if position + 1 < len(generations) else None
        following = (later.base.source.get("previous") or {}) if later else {}
        g.complete = bool(following.get("complete"))
        last_read = max(float(m.source["read_at"]) for m in g.pieces)
        g.end = int(last_read) - 1  # writes of the second being read may still follow
    for g, later in zip(generations, generations[1:], strict=False):
        if g.complete and later.start is not None:
            g.end = max(g.end or 0, later.start)


# --------------------------------------------------------------------------- plans


@dataclass
class Cut:
    """Where a chain is cut: in `file` at `offset` (None: nothing cut, every file
    whole), the files after it dropped. `ts`: the time restored to; `flush`: the
    FLUSHALL/FLUSHDB undone."""

    how: str  # "time", "flush" or "newest"
    file: str | None
    offset: int | None
    ts: int | None
    flush: dict[str, Any] | None = None

    @property
    def undone(self) -> str:
        """The command a flush cut undoes (FLUSHALL or FLUSHDB)."""
        return str(self.flush["command"]) if self.flush else ""


@dataclass
class ChainPlan:
    """A generation, the pieces a restore uses, and the cut."""

    generation: Generation
    pieces: list[Manifest]
    cut: Cut

    @property
    def raw_size(self) -> int:
        return sum(m.raw_size for m in self.pieces)

    def describe(self) -> str:
        files = list(dict.fromkeys(m.source["file"] for m in self.pieces))  # chain order
        cut = self.cut
        text = f"generation {self.generation.name} ({len(self.pieces)} pieces: {', '.join(files)})"
        if cut.file is not None:
            text += f"; {cut.file} cut at byte {cut.offset}"
        return text

    def markers(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The generation's marker events (before the cut, after it)."""
        events = self.generation.markers()
        kept = {m.source["file"] for m in self.pieces}
        before, after = [], []
        cut_file = self.cut.file if self.cut.file is not None else ""
        for event in events:
            same = cut_file is not None and event["file"] == cut_file
            dropped = event["file"] not in kept or (
                same and event["offset"] >= (self.cut.offset or 0)
            )
            (after if dropped else before).append(event)
        return before, after


def _ranges(generations: list[Generation]) -> str:
    return "; ".join(f"{g.name}: {g.covers()}" for g in generations) or "none"


def _incr_pieces(g: Generation) -> list[Manifest]:
    return [m for m in g.pieces if m.source["part"] == "incr"]


def _upto(g: Generation, file: str | None, offset: int | None) -> list[Manifest]:
    """The base and the pieces before the cut (the one it falls in included)."""
    if file is None:
        return list(g.pieces)
    seq = next(m.source["seq"] for m in g.pieces if m.source["file"] == file)
    kept = [g.base]
    for m in _incr_pieces(g):
        s = m.source
        if s["seq"] < seq or (s["file"] == file and s["start"] < (offset or 0)):
            kept.append(m)
    return kept


def plan_time(generations: list[Generation], target: int) -> ChainPlan:
    """The newest generation covering the second `target`, cut at the first annotation
    later than it (nothing cut when there is none)."""
    covering = [g for g in generations if g.start is not None and g.start <= target <= (g.end or 0)]
    if not covering:
        raise BackupNotFound(
            f"no AOF shipped covers {utc(target)}: covered are {_ranges(generations)}; pick a "
            "time in one of those (or restore an RDB backup)"
        )
    g = covering[-1]
    if not g.timed:
        raise AofError(
            f"generation {g.name} was shipped with aof-timestamp-enabled no: its AOF records "
            "no times, so it cannot be cut at one (undo_flushall still works)"
        )
    for m in _incr_pieces(g):
        for ts, offset in m.source.get("timestamps") or []:
            if ts > target:
                return _cut_plan(g, Cut("time", m.source["file"], offset, target))
    return ChainPlan(g, list(g.pieces), Cut("time", None, None, target))


def _cut_plan(g: Generation, cut: Cut) -> ChainPlan:
    """The pieces up to a cut; a cut at a file's first byte drops that file whole."""
    pieces = _upto(g, cut.file, cut.offset)
    if cut.offset == 0:
        cut = Cut(cut.how, None, None, cut.ts, cut.flush)
    return ChainPlan(g, pieces, cut)


def plan_flush(generations: list[Generation], since: int | None) -> ChainPlan:
    """Just before the last FLUSHALL or FLUSHDB at or after `since` (any, when None)."""
    for g in reversed(generations):
        if since is not None and (g.end or 0) < since:
            break
        flushes = [
            {**f, "file": m.source["file"]}
            for m in _incr_pieces(g)
            for f in m.source.get("flushes") or []
            if since is None or (f.get("ts") is not None and f["ts"] >= since)
        ]
        if flushes:
            last = flushes[-1]
            return _cut_plan(g, Cut("flush", last["file"], last["offset"], last.get("ts"), last))
    after = f" at or after {utc(since)}" if since is not None else ""
    raise BackupNotFound(
        f"no FLUSHALL or FLUSHDB{after} in the AOF shipped (covered: {_ranges(generations)})"
    )


def plan_newest(generations: list[Generation]) -> ChainPlan:
    """Everything shipped: the newest generation whole."""
    if not generations:
        raise BackupNotFound("no AOF shipped for this server: run backup-redis-aof first")
    g = generations[-1]
    return ChainPlan(g, list(g.pieces), Cut("newest", None, None, g.end))


def plan_drill_cut(generations: list[Generation]) -> ChainPlan:
    """For the drill: the newest generation, cut at the newest marker time that has a
    later marker after it (so both sides of the cut are checked); an older generation
    when the newest has no such pair yet."""
    for g in reversed(generations):
        times = sorted({e["ts"] for e in g.markers() if e.get("ts") and not e.get("deleted")})
        for ts in reversed(times[:-1]):
            if g.timed and g.start is not None and g.start <= ts <= (g.end or 0):
                plan = plan_time(generations, ts)
                before, after = plan.markers()
                if plan.generation is g and before and after:
                    return plan
    raise BackupNotFound(
        "no AOF generation shipped holds two marker keys written at different times yet "
        f"(backup-redis-aof runs once a minute; covered: {_ranges(generations)}): nothing "
        "proves a cut; run the drill again later"
    )


def newest_aof_source(where: Where) -> str | None:
    """The server whose AOF was shipped most recently (here, else in S3); None when
    there is none."""
    newest = newest_local(where.backup_dir, KIND)
    if not newest and where.s3_bucket:
        newest = newest_remote(where.s3_bucket, where.s3_prefix, KIND, where.s3_endpoint_url)
    if not newest:
        return None
    return max(newest, key=lambda m: m.created_at).source_id


@task(cache_policy=NO_CACHE)
def fetch_chain(where: Where, plan: ChainPlan) -> list[FoundBackup]:
    """Each piece of the plan, here else from S3, size and SHA-256 verified."""
    return [
        fetch_piece(
            where.backup_dir,
            m,
            where.s3_bucket,
            where.s3_prefix,
            where.s3_endpoint_url,
            where.identity_file,
        )
        for m in plan.pieces
    ]


# ------------------------------------------------------------------------- staging


@dataclass
class StagedChain:
    """An AOF folder assembled and cut in a hidden folder, proven by redis-check-aof."""

    folder: Path  # holds `aof` (the AOF folder)
    appendfilename: str
    files: list[str]
    size: int  # bytes of all its files (what Redis reports as aof_current_size on load)
    base_keys: int | None  # keys in the RDB base (loaded + expired on load)
    check: str
    last_command: dict[str, Any] | None
    cut_detail: str

    @property
    def aof(self) -> Path:
        return self.folder / "aof"

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _assemble(found: list[FoundBackup], folder: Path, appendfilename: str) -> list[AofFile]:
    """Decompress the pieces into their files, checking each starts where the one
    before it ended (a missing piece is a hole: refused)."""
    files: list[AofFile] = []
    ends: dict[str, int] = {}
    for piece in found:
        s = piece.manifest.source
        fmt = "rdb" if s["file"].endswith(".rdb") else "aof"
        name = part_name(appendfilename, s["seq"], s["part"], fmt)
        if ends.get(name, 0) != s["start"]:
            raise AofError(
                f"piece {piece.manifest.name} starts at byte {s['start']} of {s['file']} but "
                f"the pieces before it end at {ends.get(name, 0)}: a piece is missing"
            )
        if name not in ends:
            files.append(AofFile(name, s["seq"], "b" if s["part"] == "base" else "i"))
        with (
            open_decompressed(piece.path, piece.manifest.compression) as source,
            open(folder / name, "ab") as out,
        ):
            for chunk in iter_chunks(source):
                out.write(chunk)
        ends[name] = s["end"]
    return files


@task(cache_policy=NO_CACHE)
def stage_chain(
    plan: ChainPlan, found: list[FoundBackup], beside: Path, appendfilename: str
) -> StagedChain:
    """Assemble the chain in a new hidden folder of `beside` (the data dir, so placing
    it is a rename; anywhere for a dry run), cut it, validate it whole with
    redis-check-aof and read back the last command it keeps."""
    folder = unique_folder(beside, ".pitr-staging")
    aof = folder / "aof"
    aof.mkdir(OWNER_ONLY.directory, parents=True)
    try:
        files = _assemble(found, aof, appendfilename)
        write_manifest(aof, appendfilename, files)
        detail, check = _cut(plan, aof, appendfilename, files)
        check = check or check_chain(aof, appendfilename)
        last = _last_command(plan, aof, files)
        size = sum((aof / f.name).stat().st_size for f in files)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    names = [f.name for f in files]
    return StagedChain(
        folder, appendfilename, names, size, check.keys, check.summary(), last, detail
    )


def _cut(
    plan: ChainPlan, aof: Path, appendfilename: str, files: list[AofFile]
) -> tuple[str, AofCheck | None]:
    """Cut the last file as planned; return what was done and, for a cut at a time,
    redis-check-aof's verdict on the whole folder (it validates every file as it cuts)."""
    cut = plan.cut
    if cut.file is None:
        return "nothing cut: every file whole", None
    last = files[-1]
    predicted = cut.offset or 0
    verdict = None
    if cut.how == "time":
        assert cut.ts is not None
        verdict = truncate_to_timestamp(aof, appendfilename, cut.ts)
        how = f"redis-check-aof --truncate-to-timestamp {cut.ts}"
    else:
        os.truncate(aof / last.name, predicted)
        how = f"truncated before the {cut.undone or 'flush'}"
    size = (aof / last.name).stat().st_size
    if size != predicted:
        raise AofError(
            f"{how} left {last.name} at {size} bytes, the manifests put the cut at byte "
            f"{predicted}: the pieces and the AOF disagree, nothing was restored"
        )
    return f"{how}: {last.name} cut at byte {predicted} (as the manifests predict)", verdict


def _last_command(plan: ChainPlan, aof: Path, files: list[AofFile]) -> dict[str, Any] | None:
    """The last command the staged chain keeps, read from its last INCR file from the
    last annotation (or piece start) before the file's end: a second of commands."""
    incr = [f for f in files if f.type == "i"]
    if not incr:
        return None
    last = aof / incr[-1].name
    size = last.stat().st_size
    begin, ts, db = 0, None, 0
    for m in plan.pieces:
        s = m.source
        if s["part"] == "incr" and s["seq"] == incr[-1].seq and s["start"] < size:
            begin, ts, db = s["start"], s.get("ts_start"), s.get("db_start", 0)
            for stamp, offset in s.get("timestamps") or []:
                if offset < size:
                    begin, ts = offset, stamp
    return scan_aof(last, 0, ts, db, begin=begin).last_command


@task(cache_policy=NO_CACHE)
def place_chain(staged: StagedChain, data_dir: Path, setup: RedisSetup) -> list[str]:
    """Rename the staged AOF folder into place as Redis's `appenddirname` (the data
    that was there moved aside first), owned like the data dir."""
    if not setup.aof_enabled or not setup.appenddirname:
        raise AofError(
            "the target Redis does not run a Redis 7 AOF (appendonly yes): it would not load "
            "the restored AOF; turn appendonly on in its configuration, or restore an RDB"
        )
    target = data_dir / setup.appenddirname
    mode = folder_mode(OWNER_ONLY.file)
    os.chmod(staged.aof, mode)
    os.replace(staged.aof, target)
    staged.discard()
    chown_like(target, data_dir.stat())
    fsync_dir(data_dir)
    return [setup.appenddirname]


def write_manifest(folder: Path, appendfilename: str, files: list[AofFile]) -> None:
    """A manifest written durably (placing a chain keeps the one staged)."""
    with create_file(manifest_file(folder, appendfilename)) as stream:
        stream.write(manifest_text(files).encode())
        stream.flush()
        os.fsync(stream.fileno())
