"""Prometheus: inspect the server, snapshot its TSDB, copy the snapshot out, put one back.

Talks to the HTTP API with httpx; snapshots need the admin API
(`--web.enable-admin-api`). A snapshot is a folder of hard links under
`<tsdb>/snapshots/<name>`: it holds disk until deleted and no API deletes it, so
`delete_snapshot` runs after every copy, whatever failed. URLs may carry basic-auth
credentials: only `redact_url` forms of them reach a log line, artifact or error.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import docker.errors
import requests
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.files import CHUNK
from tasks.common.log import run_logger
from tasks.common.retry import retrying_task
from tasks.docker import containers
from tasks.prometheus.api import (
    BLOCK_FILES,
    ULID,
    PrometheusError,
    PrometheusFacts,
    PrometheusTimeout,
    call_api,
    query_at,
    selector,
)
from tasks.store.archive import CompressedFile, CompressedWriter, Compression, Manifest, tar_stream
from tasks.store.encryption import AgeCopy, staged_writer

Fetch = Literal["auto", "container", "path"]
FETCH_METHODS = ("auto", "container", "path")
SNAPSHOT_TIMEOUT = 600.0  # a snapshot writes the head block: minutes on a big server
PROMTOOL_TIMEOUT = 300.0
SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class EmptySnapshot(PrometheusError):
    """The snapshot holds no block: nothing persisted yet and an empty head."""


class SnapshotCopyError(RuntimeError):
    """The snapshot changed, vanished or broke off while it was copied."""


# ----------------------------------------------------------------------- the HTTP API


# ------------------------------------------------------------- where the TSDB is


@dataclass(frozen=True)
class Tsdb:
    """Where a Prometheus TSDB can be reached: in a container and/or on this host."""

    method: str  # "container" (Docker archive API) or "path" (host folder)
    container: str | None
    container_dir: str | None  # the TSDB path inside the container
    host_dir: Path | None  # the TSDB folder on this host, when known


def choose_fetch(fetch: str, container: str | None, data_dir: str | None) -> str:
    """Resolve `auto`: the container when one is named and exists, else the host path."""
    if fetch not in FETCH_METHODS:
        raise ValueError(f"fetch must be one of {', '.join(FETCH_METHODS)}, got {fetch!r}")
    if fetch == "container" and not container:
        raise ValueError("fetch='container' needs the container parameter (e.g. prometheus)")
    if fetch != "auto":
        return fetch
    return "container" if container and containers.container_exists(container) else "path"


def _container_tsdb(container: str, tsdb_path: str) -> str:
    """The TSDB path inside a running container (a relative path is from its workdir)."""
    found = containers.get_container(container)
    if found.status != "running":
        raise containers.ContainerError(
            f"container {container!r} is {found.status}, but Prometheus answered: is the "
            "container parameter the one running this Prometheus?"
        )
    if not tsdb_path:
        raise PrometheusError("Prometheus did not report its --storage.tsdb.path")
    workdir = found.attrs.get("Config", {}).get("WorkingDir") or "/"
    return str(PurePosixPath(workdir) / tsdb_path)


@task(cache_policy=NO_CACHE)
def locate_tsdb(
    fetch: str, container: str | None, data_dir: str | None, facts: PrometheusFacts
) -> Tsdb:
    """Decide how the snapshot leaves Prometheus and check that way works, before
    any snapshot is taken (a snapshot we cannot reach would leak disk)."""
    method = choose_fetch(fetch, container, data_dir)
    if method == "container":
        assert container is not None
        inner = _container_tsdb(container, facts.tsdb_path)
        return Tsdb("container", container, inner, Path(data_dir) if data_dir else None)
    host = Path(data_dir or facts.tsdb_path)
    if not host.is_absolute():
        raise ValueError(
            f"Prometheus keeps its TSDB in {facts.tsdb_path!r}, relative to its own working "
            "directory: set data_dir to that folder on this host"
        )
    if not (host / "wal").is_dir():
        raise FileNotFoundError(
            f"{host} is not a Prometheus TSDB on this host (no wal/ in it): set data_dir to "
            "the host folder of Prometheus's --storage.tsdb.path, or use fetch='container'"
        )
    return Tsdb("path", None, None, host)


# ----------------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    """A snapshot Prometheus made, and where to find it."""

    name: str
    tsdb: Tsdb
    seconds: float

    @property
    def container_dir(self) -> str | None:
        if self.tsdb.container_dir is None:
            return None
        return str(PurePosixPath(self.tsdb.container_dir) / "snapshots" / self.name)

    def host_path(self) -> Path | None:
        """The snapshot folder on this host, when it is there."""
        if self.tsdb.host_dir is None:
            return None
        path = self.tsdb.host_dir / "snapshots" / self.name
        return path if path.is_dir() else None


@retrying_task(1, 5)
def take_snapshot(
    prometheus_url: str, tsdb: Tsdb, timeout_seconds: float = SNAPSHOT_TIMEOUT
) -> Snapshot:
    """Ask Prometheus for a TSDB snapshot (head included) and take its name from the
    answer (`data.name`), never from a directory listing."""
    started = time.perf_counter()
    try:
        data = call_api(prometheus_url, "POST", "/api/v1/admin/tsdb/snapshot", timeout_seconds)
    except PrometheusTimeout as error:
        raise PrometheusTimeout(
            f"{error}: it may still finish a snapshot under snapshots/ in its TSDB; remove "
            "that folder by hand once it stops growing"
        ) from None
    name = str(data.get("name", ""))
    if not SNAPSHOT_NAME.fullmatch(name):
        raise PrometheusError(f"Prometheus answered an unexpected snapshot name {name!r}")
    seconds = round(time.perf_counter() - started, 3)
    run_logger().info("Prometheus wrote snapshot %s in %.2f s", name, seconds)
    return Snapshot(name=name, tsdb=tsdb, seconds=seconds)


@dataclass(frozen=True)
class Block:
    """One TSDB block as its meta.json (or `promtool tsdb list`) describes it."""

    ulid: str
    min_time: int  # milliseconds since the epoch
    max_time: int
    samples: int
    series: int
    chunks: int

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Block:
        stats = meta.get("stats") or {}
        return cls(
            ulid=str(meta["ulid"]),
            min_time=int(meta["minTime"]),
            max_time=int(meta["maxTime"]),
            samples=int(stats.get("numSamples", 0)),
            series=int(stats.get("numSeries", 0)),
            chunks=int(stats.get("numChunks", 0)),
        )


class _BlockCollector:
    """Checks archive entries as they stream past and remembers each block's files."""

    def __init__(self, top: str) -> None:
        self.top = top
        self.files: dict[str, set[str]] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def add(self, name: str, is_dir: bool, is_file: bool, read: Callable[[], bytes]) -> None:
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or not parts or parts[0] != self.top:
            raise SnapshotCopyError(f"unexpected entry {name!r} in snapshot {self.top}")
        if not (is_dir or is_file):
            raise SnapshotCopyError(f"{name!r} in snapshot {self.top} is not a file or folder")
        if len(parts) < 2 or not ULID.fullmatch(parts[1]):
            return
        inside = self.files.setdefault(parts[1], set())
        if len(parts) > 2 and is_file:
            inside.add("/".join(parts[2:]))
            if parts[2:] == ("meta.json",):
                try:
                    self.meta[parts[1]] = json.loads(read())
                except ValueError as error:
                    raise SnapshotCopyError(f"{name} is not valid JSON ({error})") from None

    def blocks(self) -> dict[str, Block]:
        """Every block seen, refusing one that lacks its meta.json, index or chunks."""
        found: dict[str, Block] = {}
        for ulid, names in sorted(self.files.items()):
            missing = [f for f in BLOCK_FILES if f not in names]
            if not any(n.startswith("chunks/") for n in names):
                missing.append("chunks/")
            if missing:
                raise SnapshotCopyError(
                    f"block {ulid} of snapshot {self.top} came out without "
                    f"{', '.join(missing)}: the snapshot changed while it was copied"
                )
            found[ulid] = Block.from_meta(self.meta[ulid])
        return found


class _TeeReader(io.RawIOBase):
    """A readable file over byte chunks that hands each chunk to `sink` as it is
    pulled: a tar stream is parsed and its exact bytes stored in the same pass."""

    def __init__(self, chunks: Iterable[bytes], sink: Callable[[bytes], None]) -> None:
        self._chunks = iter(chunks)
        self._sink = sink
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def _pull(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        self._sink(chunk)
        self._pending = memoryview(chunk)
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            if not self._pull():
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def drain(self) -> None:
        """Pass on what the parser did not read (the tar's end padding)."""
        while self._pull():
            pass


def _tar_from_container(snapshot: Snapshot, writer: CompressedWriter) -> dict[str, Block]:
    """The Docker archive API's tar of the snapshot, stored byte for byte while parsed."""
    assert snapshot.tsdb.container and snapshot.container_dir
    chunks = containers.stream_archive(snapshot.tsdb.container, snapshot.container_dir)
    tee = _TeeReader(chunks, writer.write)
    seen = _BlockCollector(snapshot.name)
    # Closed here, whatever the writer raised (disk full): an error's traceback would
    # keep the stream open, and dockerd locks the container while it is.
    try:
        with (
            contextlib.closing(chunks),
            tarfile.open(fileobj=io.BufferedReader(tee, CHUNK), mode="r|") as archive,
        ):
            for member in archive:
                seen.add(
                    member.name,
                    member.isdir(),
                    member.isfile(),
                    lambda m=member: archive.extractfile(m).read(),  # type: ignore[union-attr]
                )
        tee.drain()
    except (tarfile.TarError, requests.RequestException, docker.errors.APIError) as error:
        raise SnapshotCopyError(
            f"the copy of snapshot {snapshot.name} from container {snapshot.tsdb.container!r} "
            f"broke off ({error})"
        ) from None
    return seen.blocks()


def _walk(root: Path, name: str) -> Iterator[tuple[Path, str]]:
    """Every path under `root` (itself first) with its archive name, sorted; a folder
    that vanishes raises (os.walk would skip it silently)."""
    yield root, name
    with os.scandir(root) as entries:
        ordered = sorted(entries, key=lambda e: e.name)
    for entry in ordered:
        path, arcname = Path(entry.path), f"{name}/{entry.name}"
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path, arcname)
        else:
            yield path, arcname


def _tar_from_host(snapshot: Snapshot, writer: CompressedWriter) -> dict[str, Block]:
    """Tar the snapshot folder on this host straight into the compressed writer."""
    source = snapshot.host_path()
    if source is None:
        raise SnapshotCopyError(
            f"snapshot {snapshot.name} is not under {snapshot.tsdb.host_dir}/snapshots: "
            "data_dir must be the host folder of Prometheus's --storage.tsdb.path"
        )
    seen = _BlockCollector(snapshot.name)
    try:
        with tar_stream(writer) as archive:
            archive.copybufsize = CHUNK
            for path, arcname in _walk(source, snapshot.name):
                info = archive.gettarinfo(str(path), arcname)
                seen.add(arcname, info.isdir(), info.isfile(), path.read_bytes)
                if info.isfile():
                    with open(path, "rb") as stream:
                        archive.addfile(info, stream)
                else:
                    archive.addfile(info)
    except OSError as error:
        if error.errno not in (None, errno.ENOENT):
            raise  # e.g. no space left in the backup dir
        raise SnapshotCopyError(
            f"snapshot {snapshot.name} changed while it was copied ({error})"
        ) from None
    return seen.blocks()


def promtool_list(snapshot_dir: Path) -> list[Block]:
    """`promtool tsdb list` of a TSDB folder: opens every block's meta and index."""
    result = subprocess.run(
        ["promtool", "tsdb", "list", str(snapshot_dir)],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip()[-300:]
        raise SnapshotCopyError(f"promtool cannot read snapshot {snapshot_dir}: {said}")
    blocks = []
    for line in result.stdout.splitlines()[1:]:
        cells = line.split()  # ULID, min time, max time, duration, samples, chunks, series, size
        if len(cells) != 8 or not ULID.fullmatch(cells[0]):
            raise PrometheusError(f"unexpected `promtool tsdb list` line: {line!r}")
        ulid, low, high, _duration, samples, chunks, series, _size = cells
        blocks.append(
            Block(
                ulid=ulid,
                min_time=int(low),
                max_time=int(high),
                samples=int(samples),
                series=int(series),
                chunks=int(chunks),
            )
        )
    return blocks


def _container_listing(snapshot: Snapshot) -> set[str]:
    """The block folders of the snapshot as the container sees them now."""
    assert snapshot.tsdb.container and snapshot.container_dir
    container = containers.get_container(snapshot.tsdb.container)
    try:
        code, output = container.exec_run(["ls", "-1", snapshot.container_dir])
    except docker.errors.APIError as error:
        raise SnapshotCopyError(
            f"cannot look at snapshot {snapshot.name} in container {snapshot.tsdb.container!r} "
            f"after copying it ({error.explanation or error}): did the container stop?"
        ) from None
    if code != 0:
        raise SnapshotCopyError(
            f"snapshot {snapshot.name} vanished from container {snapshot.tsdb.container!r} "
            f"while it was copied ({output.decode(errors='replace').strip()})"
        )
    return {name for name in output.decode().split() if ULID.fullmatch(name)}


def _check_complete(snapshot: Snapshot, archived: dict[str, Block]) -> tuple[list[Block], str]:
    """Compare what was archived with what the snapshot holds now; return the block
    facts (from promtool where the snapshot is on this host) and their source."""
    here = snapshot.host_path()
    if here is not None and shutil.which("promtool"):
        blocks, source = promtool_list(here), "promtool tsdb list"
        now = {block.ulid for block in blocks}
    else:
        blocks, source = list(archived.values()), "meta.json in the archive"
        if here is not None:
            now = {p.name for p in here.iterdir() if ULID.fullmatch(p.name)}
        elif snapshot.tsdb.method == "container":
            now = _container_listing(snapshot)
        else:
            raise SnapshotCopyError(f"snapshot {snapshot.name} vanished while it was copied")
    if now != set(archived):
        raise SnapshotCopyError(
            f"snapshot {snapshot.name} changed while it was copied: {len(archived)} blocks "
            f"archived, {len(now)} there now"
        )
    return sorted(blocks, key=lambda b: b.min_time), source


@dataclass
class CapturedSnapshot:
    """The snapshot as staged: compressed tar, its blocks, timings."""

    file: CompressedFile
    blocks: list[Block]
    facts_from: str
    method: str
    seconds: float


@retrying_task(2)
def copy_snapshot(
    snapshot: Snapshot, staging: Path, compression: Compression, encrypt: AgeCopy | None = None
) -> CapturedSnapshot:
    """Tar, compress and hash (and age-encrypt as `encrypt` says) the snapshot in one
    streaming pass, then check it was
    complete and holds a block (EmptySnapshot otherwise). Member names are relative:
    `<snapshot>/<block ULID>/…`. The output is removed unless everything checks out."""
    started = time.perf_counter()
    writer = staged_writer(staging, compression, encrypt)
    try:
        if snapshot.tsdb.method == "container":
            archived = _tar_from_container(snapshot, writer)
        else:
            archived = _tar_from_host(snapshot, writer)
        blocks, facts_from = _check_complete(snapshot, archived)
        if not blocks:
            raise EmptySnapshot(
                f"snapshot {snapshot.name} holds no TSDB block, so there is nothing to back "
                "up: Prometheus has no persisted block yet (it writes its first one about 2 h "
                "after start, or after --storage.tsdb.min-block-duration) and its in-memory "
                "head holds no samples (a snapshot includes the head once it has data). Check "
                "that Prometheus scrapes its targets (its /targets page), then run the backup "
                "again; nothing was stored"
            )
        compressed = writer.close()
    except BaseException as error:
        writer.abort()
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                error.errno,
                f"no space left in {staging.parent} while writing the backup (partial file "
                "removed): free space there or choose another backup_dir",
            ) from None
        raise
    seconds = round(time.perf_counter() - started, 3)
    run_logger().info(
        "Copied snapshot %s: %d blocks, %d bytes → %d %s via %s in %.2f s",
        snapshot.name,
        len(blocks),
        compressed.raw_size,
        compressed.size,
        compression,
        snapshot.tsdb.method,
        seconds,
    )
    return CapturedSnapshot(compressed, blocks, facts_from, snapshot.tsdb.method, seconds)


def _remove_in_container(container_name: str, path: str) -> str:
    """`rm -rf` inside the container; when it is not running, in a throwaway container
    with the same mounts (`volumes_from`)."""
    container = containers.get_container(container_name)
    try:
        if container.status == "running":
            code, output = container.exec_run(["rm", "-rf", "--", path])
            if code != 0:
                raise containers.ContainerError(
                    f"could not remove snapshot {path} in container {container_name!r} "
                    f"({output.decode(errors='replace').strip()}): remove it by hand"
                )
            return f"removed {path} in container {container_name}"
    except docker.errors.APIError:
        pass  # stopped meanwhile: use a throwaway container below
    try:
        containers.docker_client().containers.run(
            container.image.id,
            entrypoint=["rm", "-rf", "--", path],
            command=[],
            volumes_from=[container.id],
            user="0",
            network_mode="none",
            remove=True,
        )
    except docker.errors.DockerException as error:
        raise containers.ContainerError(
            f"could not remove snapshot {path} of stopped container {container_name!r} "
            f"({error}): remove it by hand"
        ) from None
    return f"removed {path} through a throwaway container ({container_name} is not running)"


def _remove_on_host(snapshot: Snapshot, here: Path) -> str | None:
    """`rm -rf` on this host; None when refused but the container can do it."""
    try:
        shutil.rmtree(here)
    except PermissionError:
        if snapshot.tsdb.method != "container":
            raise PermissionError(
                f"cannot remove snapshot {here} (permission denied): run the backup as "
                "Prometheus's user or root, or remove that folder by hand"
            ) from None
        return None  # Prometheus's own user can: remove it inside the container
    return f"removed {here}"


@retrying_task(1, 5)
def delete_snapshot(snapshot: Snapshot) -> str:
    """Remove the snapshot folder (hard links holding disk): on this host when it is
    there, else inside the container. Returns what was done."""
    here = snapshot.host_path()
    done = _remove_on_host(snapshot, here) if here is not None else None
    if done is None and snapshot.tsdb.method == "container":
        assert snapshot.tsdb.container and snapshot.container_dir
        done = _remove_in_container(snapshot.tsdb.container, snapshot.container_dir)
    if done is None:
        run_logger().warning(
            "Snapshot %s is not under %s/snapshots (already gone?). If Prometheus keeps its "
            "TSDB elsewhere, remove snapshots/%s there by hand",
            snapshot.name,
            snapshot.tsdb.host_dir,
            snapshot.name,
        )
        return "not found"
    run_logger().info("Snapshot %s deleted: %s", snapshot.name, done)
    return done


def remove_leftover_snapshot(snapshot: Snapshot) -> None:
    """Delete the snapshot of a backup that already failed: a removal that fails too
    is a warning naming the folder, so the run's reason stays the first failure."""
    try:
        delete_snapshot(snapshot)
    except Exception as error:  # noqa: BLE001 - reported, the backup's own error follows
        run_logger().warning(
            "Snapshot %s was not removed (%s): remove snapshots/%s under %s by hand, it holds disk",
            snapshot.name,
            error,
            snapshot.name,
            snapshot.tsdb.host_dir or "Prometheus's data folder",
        )


# ------------------------------------------------------------------------ manifest


def _iso(milliseconds: int) -> str:
    return datetime.fromtimestamp(milliseconds / 1000, UTC).isoformat()


def summarize_blocks(blocks: list[Block]) -> dict[str, Any]:
    """Totals for a manifest. `series` is the largest block's count: blocks share
    series, so a sum would overcount."""
    if not blocks:
        return {"blocks": 0, "samples": 0, "series": 0, "block_list": []}
    low, high = min(b.min_time for b in blocks), max(b.max_time for b in blocks)
    return {
        "blocks": len(blocks),
        "min_time": _iso(low),
        "max_time": _iso(high),
        "min_time_ms": low,
        "max_time_ms": high,
        "samples": sum(b.samples for b in blocks),
        "series": max(b.series for b in blocks),
        "block_list": [asdict(b) for b in blocks],
    }


RECORDED_SERIES = 3


@task(cache_policy=NO_CACHE)
def record_values(prometheus_url: str, blocks: list[Block]) -> dict[str, Any]:
    """A few values the server answers at the last moment of the oldest snapshot block
    (persisted, so in the backup): a restore drill asks the restored server the same
    questions and must get the same answers. Series' labels and values only. A server
    that stopped answering after its snapshot gives none (a warning), not a failure."""
    if not blocks:
        return {}
    oldest = min(blocks, key=lambda b: b.min_time)
    at = (oldest.max_time - 1) / 1000
    try:
        top = query_at(prometheus_url, f'topk({RECORDED_SERIES}, {{__name__=~".+"}})', at)
        count = query_at(prometheus_url, 'count({__name__=~".+"})', at)
    except PrometheusError as error:  # the snapshot is what matters: keep it
        run_logger().warning("no recorded values in this backup's manifest: %s", error)
        return {}
    values = [
        {"query": selector(item["metric"]), "value": item["value"][1]}
        for item in top
        if item["value"][1] not in ("NaN", "+Inf", "-Inf")
    ]
    if count:
        values.append({"query": 'count({__name__=~".+"})', "value": count[0]["value"][1]})
    return {"at": at, "block": oldest.ulid, "values": values}


def prometheus_manifest(
    name: str,
    captured: CapturedSnapshot,
    snapshot: Snapshot,
    facts: PrometheusFacts,
    server: str,
    duration_seconds: float,
    source_id: str,
    recorded: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest of a Prometheus backup: the stored file plus what the TSDB held,
    and `recorded` values at a covered timestamp (`record_values`)."""
    return Manifest.describe(
        "prometheus",
        name,
        captured.file,
        duration_seconds,
        source={
            "server": server,
            "prometheus_version": facts.version,
            "prometheus_revision": facts.revision,
            "tsdb_path": facts.tsdb_path,
            "retention": facts.retention,
            "snapshot": snapshot.name,
            "fetch": captured.method,
            "block_facts_from": captured.facts_from,
            **summarize_blocks(captured.blocks),
            "recorded": recorded or {},
        },
        steps={"snapshot": snapshot.seconds, "copy": captured.seconds},
        source_id=source_id,
    )


# ------------------------------------------------------------------------- restore


def describe(manifest: Manifest) -> dict[str, str]:
    """The facts of a Prometheus backup an operator checks first, for its report."""
    s = manifest.source
    version = {"Prometheus version": str(s.get("prometheus_version", "?"))}
    if not s.get("blocks"):
        return version
    return {
        **version,
        "time range (UTC)": f"{s.get('min_time', '?')} → {s.get('max_time', '?')}",
        "series (largest block)": str(s.get("series", "?")),
        "samples": str(s.get("samples", "?")),
    }
