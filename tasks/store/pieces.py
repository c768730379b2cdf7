"""Chained backups: a kind whose backups are PIECES that only restore together (the
Redis AOF: a base file and the increments after it), kept in GENERATIONS (a base and
every piece after it until the next base).

Layout, the same under the backup dir and the S3 prefix:

    <folder>/<source tag>/<generation>/<file>.<start offset, 12 digits><.gz|.zst>
    … and beside each piece its `.manifest.json`, written last

e.g. `redis-aof/1a2b3c4d/20261206_102904_5f3e2a1b/appendonly.aof.2.incr.aof.000000004096.gz`.
A generation is named `<UTC when its first piece was stored>_<8 hex of its base>`, so
names sort in time order; a piece without its manifest is incomplete and never used.
Everything a run needs to plan (what was shipped, which generations exist, what
retention may delete) comes from names and a few manifests: a week of pieces a
minute is ten thousand objects, far too many to read each time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from tasks.store.archive import SUFFIXES, Compression, Manifest, manifest_name
from tasks.store.kinds import KINDS, source_tag
from tasks.store.local import RetentionPlan, resolve_name
from tasks.store.s3 import S3Error, client, delete_keys, object_key

PIECE = re.compile(r"^(?P<file>.+)\.(?P<start>\d{12})(?P<suffix>\.gz|\.zst)$")
GENERATION = re.compile(r"^\d{8}_\d{6}_[0-9a-f]{8}$")
STAMP = "%Y%m%d_%H%M%S"


@dataclass(frozen=True, order=True)
class PieceName:
    """A piece's place: its generation, the file it is part of, where in it it starts."""

    generation: str
    file: str
    start: int
    name: str  # the full relative name (`<folder>/<tag>/<generation>/<piece>`)


def generation_name(first_stored: datetime, digest: str) -> str:
    return f"{first_stored.astimezone(UTC).strftime(STAMP)}_{digest[:8]}"


def generation_time(generation: str) -> datetime:
    """When a generation's first piece was stored (from its name)."""
    return datetime.strptime(generation[:15], STAMP).replace(tzinfo=UTC)


def source_folder(kind: str, source_id: str) -> str:
    return f"{KINDS[kind].folder}/{source_tag(source_id)}"


def piece_name(
    kind: str, source_id: str, generation: str, file: str, start: int, compression: Compression
) -> str:
    folder = source_folder(kind, source_id)
    return f"{folder}/{generation}/{file}.{start:012d}{SUFFIXES[compression]}"


def parse_piece(name: str) -> PieceName | None:
    """The parts of a piece's relative name; None for anything else."""
    parts = PurePosixPath(name).parts
    match = PIECE.fullmatch(parts[-1]) if len(parts) == 4 else None
    if match is None or not GENERATION.fullmatch(parts[2]):
        return None
    return PieceName(parts[2], match["file"], int(match["start"]), name)


# --------------------------------------------------------------------- local folder


def generations_local(backup_dir: Path, kind: str, source_id: str) -> list[str]:
    """The source's generations in the backup dir, oldest first."""
    folder = Path(backup_dir) / source_folder(kind, source_id)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if GENERATION.fullmatch(p.name) and p.is_dir())


def pieces_local(backup_dir: Path, kind: str, source_id: str, generation: str) -> list[PieceName]:
    """The complete pieces of a generation (data and manifest present), in name order."""
    folder = Path(backup_dir) / source_folder(kind, source_id) / generation
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    found = []
    for name in names:
        if manifest_name(name) in names:
            parsed = parse_piece(f"{source_folder(kind, source_id)}/{generation}/{name}")
            if parsed is not None:
                found.append(parsed)
    return sorted(found)


def read_local(backup_dir: Path, name: str) -> Manifest:
    return Manifest.from_json(resolve_name(Path(backup_dir), manifest_name(name)).read_bytes())


def delete_local(backup_dir: Path, pieces: list[PieceName]) -> None:
    """Delete pieces, each manifest first; then their generation folders if empty."""
    folders = set()
    for piece in pieces:
        path = resolve_name(Path(backup_dir), piece.name)
        path.with_name(manifest_name(path.name)).unlink(missing_ok=True)
        for encrypted in (path, path.with_name(path.name + ".age")):
            encrypted.unlink(missing_ok=True)
        folders.add(path.parent)
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# ------------------------------------------------------------------------------ S3


def _list(s3: Any, bucket: str, prefix: str, delimiter: str = "") -> tuple[set[str], set[str]]:
    """(keys, common prefixes) under `prefix`."""
    keys: set[str] = set()
    prefixes: set[str] = set()
    extra = {"Delimiter": delimiter} if delimiter else {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, **extra):
        keys.update(item["Key"] for item in page.get("Contents", []))
        prefixes.update(item["Prefix"] for item in page.get("CommonPrefixes", []))
    return keys, prefixes


def _explained(error: Exception, bucket: str) -> S3Error:
    return S3Error(f"S3 bucket {bucket!r}: {error}")


def generations_remote(
    bucket: str, prefix: str, kind: str, source_id: str, endpoint_url: str | None
) -> list[str]:
    """The source's generations in the bucket, oldest first (one listing)."""
    folder = object_key(prefix, source_folder(kind, source_id)) + "/"
    try:
        _keys, prefixes = _list(client(endpoint_url), bucket, folder, "/")
    except (BotoCoreError, ClientError) as error:
        raise _explained(error, bucket) from None
    names = (p.removeprefix(folder).rstrip("/") for p in prefixes)
    return sorted(n for n in names if GENERATION.fullmatch(n))


def pieces_remote(
    bucket: str,
    prefix: str,
    kind: str,
    source_id: str,
    generation: str,
    endpoint_url: str | None,
) -> list[PieceName]:
    """The complete pieces of a generation in the bucket (object and manifest there;
    an `.age` object counts as the piece)."""
    root = object_key(prefix, "")
    folder = object_key(prefix, f"{source_folder(kind, source_id)}/{generation}/")
    try:
        keys, _ = _list(client(endpoint_url), bucket, folder)
    except (BotoCoreError, ClientError) as error:
        raise _explained(error, bucket) from None
    found = []
    for key in keys:
        if not key.endswith(manifest_name("")):
            continue
        data = key.removesuffix(manifest_name(""))
        if data in keys or data + ".age" in keys:
            parsed = parse_piece(data.removeprefix(root) if root else data)
            if parsed is not None:
                found.append(parsed)
    return sorted(found)


def read_remote(bucket: str, prefix: str, name: str, endpoint_url: str | None) -> Manifest:
    key = manifest_name(object_key(prefix, name))
    try:
        body = client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError) as error:
        raise _explained(error, bucket) from None
    return Manifest.from_json(body)


def remote_has(bucket: str, prefix: str, name: str, endpoint_url: str | None) -> bool:
    """Is this piece's manifest in the bucket (uploaded last, after its verified data)?"""
    try:
        client(endpoint_url).head_object(Bucket=bucket, Key=manifest_name(object_key(prefix, name)))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _explained(error, bucket) from None
    return True


def newest_local(backup_dir: Path, kind: str) -> list[Manifest]:
    """Per source folder, the manifest of the newest piece of its newest generation
    (what backup-status shows: how fresh the shipping is)."""
    root = Path(backup_dir) / KINDS[kind].folder
    found = []
    for tag in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        generations = sorted(g.name for g in tag.iterdir() if GENERATION.fullmatch(g.name))
        for generation in reversed(generations):
            folder = tag / generation
            sidecars = [m for m in folder.iterdir() if m.name.endswith(manifest_name(""))]
            if sidecars:
                newest = max(sidecars, key=lambda m: m.stat().st_mtime_ns)
                found.append(Manifest.from_json(newest.read_bytes()))
                break
    return found


def newest_remote(bucket: str, prefix: str, kind: str, endpoint_url: str | None) -> list[Manifest]:
    """The same in the bucket: per source, its newest generation's newest piece (by the
    objects' modification time)."""
    s3 = client(endpoint_url)
    root = object_key(prefix, KINDS[kind].folder) + "/"
    found = []
    try:
        _keys, tags = _list(s3, bucket, root, "/")
        for tag in sorted(tags):
            _keys, generations = _list(s3, bucket, tag, "/")
            if not generations:
                continue
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=max(generations)
            )
            items = [i for page in pages for i in page.get("Contents", [])]
            sidecars = [i for i in items if i["Key"].endswith(manifest_name(""))]
            if sidecars:
                newest = max(sidecars, key=lambda i: (i["LastModified"], i["Key"]))
                body = s3.get_object(Bucket=bucket, Key=newest["Key"])["Body"].read()
                found.append(Manifest.from_json(body))
    except (BotoCoreError, ClientError) as error:
        raise _explained(error, bucket) from None
    return found


# ------------------------------------------------------------------------ retention


def generations_to_delete(
    generations: list[str], cutoff: datetime | None
) -> tuple[list[str], list[str]]:
    """(delete, keep): a generation goes only when the NEXT one was already stored by
    `cutoff`, so every time from `cutoff` on is still covered by a kept generation; the
    newest is always kept. No cutoff: nothing goes."""
    ordered = sorted(generations)
    delete = []
    if cutoff is not None:
        for older, newer in zip(ordered, ordered[1:], strict=False):
            if generation_time(newer) <= cutoff:
                delete.append(older)
    return delete, [g for g in ordered if g not in delete]


SNAPSHOT_STAMP = re.compile(r"_(\d{8}_\d{6})_([0-9a-f]{8})[.]")


def snapshot_cutoff(
    names: list[str], source_id: str, now: datetime, days: float, keep_min: int
) -> datetime | None:
    """How far back the snapshots of a source (names as `dump_<UTC>_<tag>.rdb.gz`)
    reach under their age rules: the oldest of those younger than `days` and of the
    newest `keep_min` (GFS extras do not count). None when there is none."""
    tag = source_tag(source_id)
    times = sorted(
        (
            datetime.strptime(m[1], STAMP).replace(tzinfo=UTC)
            for m in (SNAPSHOT_STAMP.search(n) for n in names)
            if m and m[2] == tag
        ),
        reverse=True,
    )
    kept = [t for i, t in enumerate(times) if i < keep_min or t >= now - timedelta(days=days)]
    return min(kept) if kept else None


def snapshot_names_local(backup_dir: Path, kind: str) -> list[str]:
    folder = Path(backup_dir) / KINDS[kind].folder
    if not folder.is_dir():
        return []
    return [p.name.removesuffix(manifest_name("")) for p in folder.glob(f"*{manifest_name('')}")]


def snapshot_names_remote(
    bucket: str, prefix: str, kind: str, endpoint_url: str | None
) -> list[str]:
    folder = object_key(prefix, KINDS[kind].folder) + "/"
    try:
        keys, _ = _list(client(endpoint_url), bucket, folder, "/")
    except (BotoCoreError, ClientError) as error:
        raise _explained(error, bucket) from None
    suffix = manifest_name("")
    return [k.removeprefix(folder).removesuffix(suffix) for k in keys if k.endswith(suffix)]


@dataclass
class GenerationPlan:
    """Which generations of one source retention keeps and deletes, from what cutoff
    (None: no snapshot to follow, nothing deleted), and which could not be deleted yet
    (Object Lock)."""

    keep: list[str]
    delete: list[str]
    cutoff: datetime | None
    locked: list[str]

    def summary(self) -> str:
        since = f"{self.cutoff:%Y-%m-%d %H:%M:%S} UTC" if self.cutoff else "no snapshot to follow"
        text = f"kept {len(self.keep)} generation(s) (PITR reaches back to {since})"
        text += f", deleted {len(self.delete)}" + (
            f": {', '.join(self.delete)}" if self.delete else ""
        )
        if self.locked:
            text += f"; still under Object Lock: {', '.join(self.locked)}"
        return text


def prune_generations_local(
    backup_dir: Path, kind: str, source_id: str, cutoff: datetime | None, dry_run: bool = False
) -> GenerationPlan:
    """Delete the generations every time from `cutoff` on can do without (see
    `generations_to_delete`), each piece's manifest first."""
    delete, keep = generations_to_delete(generations_local(backup_dir, kind, source_id), cutoff)
    for generation in [] if dry_run else delete:
        delete_local(backup_dir, pieces_local(backup_dir, kind, source_id, generation))
        folder = Path(backup_dir) / source_folder(kind, source_id) / generation
        for leftover in sorted(folder.iterdir()) if folder.is_dir() else []:
            leftover.unlink()  # pieces a killed run left without their manifest
        if folder.is_dir():
            folder.rmdir()
    return GenerationPlan(keep, delete, cutoff, [])


def prune_generations_remote(
    bucket: str,
    prefix: str,
    kind: str,
    source_id: str,
    endpoint_url: str | None,
    cutoff: datetime | None,
    dry_run: bool = False,
) -> GenerationPlan:
    """The same in the bucket: every object of a deleted generation, manifests first
    (for real in a versioned bucket; a generation with a locked object stays)."""
    generations = generations_remote(bucket, prefix, kind, source_id, endpoint_url)
    delete, keep = generations_to_delete(generations, cutoff)
    plan = GenerationPlan(keep, [], cutoff, [])
    if dry_run:
        plan.delete = delete
        return plan
    retention = RetentionPlan()
    for generation in delete:
        folder = object_key(prefix, f"{source_folder(kind, source_id)}/{generation}/")
        try:
            keys, _ = _list(client(endpoint_url), bucket, folder)
        except (BotoCoreError, ClientError) as error:
            raise _explained(error, bucket) from None
        ordered = sorted(keys, key=lambda k: (not k.endswith(manifest_name("")), k))
        if delete_keys(bucket, ordered, generation, endpoint_url, retention):
            plan.delete.append(generation)
        else:
            plan.keep.append(generation)
    plan.locked = retention.locked
    return plan
