"""Putting an RDB backup back where a Redis loads it: the one restore path that
recover-redis, recover-host and the restore drill share.

    stage_rdb      decompress and validate the verified backup beside the data (Redis
                   may still run, or be stopping: it is a new hidden folder inside its
                   data dir)
    move aside     `tasks.common.aside.move_into_aside` of `setup.data_names()`
    place_rdb      rename the staged RDB into place, as the AOF's base too when AOF is on
    start_checked  start Redis on it while redis-check-rdb parses it and it is fsynced
    restore_rdb    stage, move aside and place, for a Redis that is not running (a
                   folder): the old data is back in place when any of them fails

The AOF trap: a Redis configured `appendonly yes` loads its AOF, never dump.rdb; with
the AOF moved aside it starts EMPTY and writes an empty AOF (checked on Redis 7.0:
"Creating AOF base file … on server start", 0 keys). The configuration of an
existing container cannot be changed for one start, so instead the restored RDB is
ALSO made the AOF's base: a Redis 7 AOF is a folder whose manifest names a base file
that may be an RDB (`aof-use-rdb-preamble`), so `appendonlydir/` gets a manifest
naming `<appendfilename>.1.base.rdb`, a hard link to the placed dump.rdb (no extra
disk). Redis then loads exactly the restored data through its AOF, keeps
`appendonly yes` throughout (nothing to rewrite or persist afterwards), and adds its
own incr file: a later restart loads the same data. Redis < 7 (one AOF file) gets
the link under `appendfilename`, which it loads the same way.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.aside import MovedAside, move_into_aside, put_back, unique_folder
from tasks.common.files import (
    OWNER_ONLY,
    chown_like,
    create_file,
    folder_mode,
    fsync_dir,
    mode_like,
)
from tasks.common.secrets import redact_url
from tasks.docker import containers
from tasks.docker.containers import wait_started
from tasks.redis.rdb import RdbChecker, RdbError, RdbInfo, deep_check_rdb, validate_stream
from tasks.redis.server import RedisAccessError, connect, explain
from tasks.redis.setup import RedisSetup, folder_setup
from tasks.store.archive import Compression, iter_chunks, open_decompressed
from tasks.store.find import FoundBackup


class RdbTooNew(RdbError):
    """The backup's RDB version is newer than the target Redis can load."""


def check_loadable(version: int, setup: RedisSetup, name: str) -> None:
    """Refuse an RDB newer than the target Redis loads (it would refuse to start)."""
    if version > setup.rdb_version:
        raise RdbTooNew(
            f"backup {name} is RDB version {version}, but Redis {setup.redis_version} loads "
            f"RDB {setup.rdb_version} at most: restore it into a Redis at least as new as the "
            "one that wrote it (or pick an older backup); nothing was changed"
        )


def rdb_version_of(found: FoundBackup) -> int:
    """The RDB version in a stored backup's header (reads only its first bytes)."""
    checker = RdbChecker(name=f"backup {found.manifest.name}")
    with open_decompressed(found.path, found.manifest.compression) as stream:
        checker.update(stream.read(64))
    if checker.version is None:
        raise RdbError(f"backup {found.manifest.name} is too short to be an RDB; pick another")
    return checker.version


@task(cache_policy=NO_CACHE)
def check_rdb(found: FoundBackup, setup: RedisSetup) -> RdbInfo:
    """Validate the whole RDB (header, CRC-64, redis-check-rdb) while decompressing it to
    nowhere, and check the target Redis loads its version: the dry run's proof."""
    check_loadable(rdb_version_of(found), setup, found.manifest.name)
    with open_decompressed(found.path, found.manifest.compression) as stream:
        return validate_stream(iter_chunks(stream), True, lambda _chunk: None)


def decompress_rdb(
    stored: Path,
    compression: Compression,
    path: Path,
    mode: int,
    deep: bool = True,
    durable: bool = True,
) -> RdbInfo:
    """Decompress a stored RDB backup into `path` (created with `mode`), validating it
    in the same pass (redis-check-rdb too when `deep`); fsynced when `durable`. A
    partial file is removed when it fails."""
    try:
        with open_decompressed(stored, compression) as source, create_file(path, mode) as out:
            info = validate_stream(iter_chunks(source), deep, out.write)
            out.flush()
            if durable:
                os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return info


@dataclass(frozen=True)
class StagedRdb:
    """A validated RDB waiting in a hidden folder of the data dir to be placed."""

    folder: Path
    dbfilename: str
    rdb: RdbInfo
    seconds: float = 0.0  # how long staging took

    def discard(self) -> None:
        """Remove what is left of the staging folder (nothing once placed)."""
        shutil.rmtree(self.folder, ignore_errors=True)


@task(cache_policy=NO_CACHE)
def stage_rdb(
    found: FoundBackup,
    setup: RedisSetup,
    data_dir: Path,
    deep: bool = True,
    durable: bool = True,
) -> StagedRdb:
    """Decompress the verified backup's RDB into a new hidden folder of `data_dir` (so
    placing it is a rename), validating it in the same pass: header, CRC-64, and
    redis-check-rdb when `deep`; fsynced when `durable`; the target Redis must load its
    version. It keeps the mode of the RDB it will replace. The drill stages with
    neither `deep` nor `durable`: its scratch Redis needs no durable copy, and
    `load_while_checking` runs redis-check-rdb beside the load."""
    began = time.perf_counter()
    check_loadable(rdb_version_of(found), setup, found.manifest.name)
    mode = mode_like(data_dir / setup.dbfilename)
    folder = unique_folder(data_dir, ".restore-staging")
    folder.mkdir(OWNER_ONLY.directory)
    os.chmod(folder, OWNER_ONLY.directory)
    try:
        rdb = decompress_rdb(
            found.path,
            found.manifest.compression,
            folder / setup.dbfilename,
            mode,
            deep,
            durable,
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return StagedRdb(folder, setup.dbfilename, rdb, round(time.perf_counter() - began, 3))


def aof_manifest(appendfilename: str) -> str:
    """A Redis 7 AOF manifest whose only file is an RDB base (Redis adds its incr file)."""
    return f"file {appendfilename}.1.base.rdb seq 1 type b\n"


def _link_or_copy(source: Path, link: Path) -> None:
    """A hard link (no extra disk; Redis replaces either name by rename, never in
    place), or a copy where the filesystem has no hard links."""
    try:
        os.link(source, link)
    except OSError:
        shutil.copyfile(source, link)


@task(cache_policy=NO_CACHE)
def place_rdb(staged: StagedRdb, data_dir: Path, setup: RedisSetup) -> list[str]:
    """Rename the staged RDB into place and, when AOF is on, make it the AOF's base so
    that Redis loads it (see the module's docstring). Its current data must have been
    moved aside. Returns the names placed, owned by the data dir's owner."""
    owner = data_dir.stat()
    rdb = data_dir / setup.dbfilename
    os.replace(staged.folder / staged.dbfilename, rdb)
    staged.folder.rmdir()
    placed = [setup.dbfilename]
    mode = mode_like(rdb)  # as stage_rdb kept it: the replaced RDB's
    if setup.aof_enabled:
        if setup.appenddirname:
            folder = data_dir / setup.appenddirname
            folder.mkdir(folder_mode(mode))
            os.chmod(folder, folder_mode(mode))
            _link_or_copy(rdb, folder / f"{setup.appendfilename}.1.base.rdb")
            manifest = folder / f"{setup.appendfilename}.manifest"
            with create_file(manifest, mode) as stream:
                stream.write(aof_manifest(setup.appendfilename).encode())
                stream.flush()
                os.fsync(stream.fileno())
            fsync_dir(folder)
        else:
            _link_or_copy(rdb, data_dir / setup.appendfilename)
        placed.append(setup.aof_name())
    for name in placed:
        chown_like(data_dir / name, owner)
    fsync_dir(data_dir)
    return placed


def move_redis_data_aside(data_dir: Path, setup: RedisSetup) -> MovedAside:
    """The RDB and the AOF Redis would load, renamed into a new folder
    `<data dir>/<dbfilename>.before-restore-<UTC>/` (never deleted)."""
    return move_into_aside(data_dir, setup.data_names(), data_dir / setup.dbfilename)


@dataclass(frozen=True)
class RestoredRdb:
    """A backup placed where a Redis will load it, and where the data it replaced went
    (None: the data dir held no RDB or AOF)."""

    backup: str
    path: Path  # the placed RDB
    placed: list[str]
    moved_aside: MovedAside | None
    rdb: RdbInfo


@task(cache_policy=NO_CACHE)
def restore_rdb(found: FoundBackup, data_dir: Path, setup: RedisSetup | None = None) -> RestoredRdb:
    """Put a verified backup into the data dir of a Redis that is not running (a
    container created but not started, or a folder a Redis will start from): stage and
    validate it, move the current RDB and AOF aside, place it (as the AOF base when AOF
    is on: `setup`, else found from the folder). When anything fails, the data dir is
    as it was."""
    setup = setup or folder_setup(data_dir)
    staged = stage_rdb.fn(found, setup, data_dir)
    moved = None
    try:
        if any(os.path.lexists(data_dir / name) for name in setup.data_names()):
            moved = move_redis_data_aside(data_dir, setup)
        placed = place_rdb.fn(staged, data_dir, setup)
    except BaseException:
        if moved is not None:
            put_back(moved, unique_folder(data_dir, "failed-restore"), setup.data_names())
        raise
    finally:
        staged.discard()
    return RestoredRdb(found.manifest.name, data_dir / setup.dbfilename, placed, moved, staged.rdb)


@task(cache_policy=NO_CACHE)
def wait_until_loaded(redis_url: str, container: str, timeout_seconds: float) -> dict[str, Any]:
    """Poll until Redis answers with `loading:0`; fail at once if its container exits.
    Returns INFO server, persistence and stats (`uptime_in_seconds`,
    `rdb_last_load_keys_loaded`, `rdb_last_load_keys_expired`…): what `prove_redis`
    compares with the manifest."""
    client = connect(redis_url, timeout=10)

    def loaded() -> str | None:
        try:
            info = client.info("persistence")
        except redis.BusyLoadingError:
            return "loading"
        except redis.RedisError as error:
            explained = explain(error, redis_url)
            if isinstance(explained, RedisAccessError):
                raise explained from None  # permanent: waiting cannot fix a wrong password
            return str(explained)
        return f"loading, {info.get('loading_loaded_perc')}% done" if int(info["loading"]) else None

    wait_started(loaded, container, timeout_seconds, f"Redis at {redact_url(redis_url)}")
    try:
        return {**client.info("server"), **client.info("persistence"), **client.info("stats")}
    except redis.RedisError as error:
        raise explain(error, redis_url) from None


@dataclass(frozen=True)
class CheckedLoad:
    """A placed RDB loaded by Redis, with redis-check-rdb's verdict on it."""

    load: dict[str, Any]  # INFO server, persistence and stats after loading
    deep_check: str
    started_at: float  # when Redis was started on it (time.time())
    file_keys: int | None = None  # the keys redis-check-rdb read in it (None: did not run)


def flush_to_disk(path: Path) -> None:
    """fsync a placed file (its folder's entry was made durable when it was placed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@task(cache_policy=NO_CACHE)
def start_checked(
    found: FoundBackup,
    rdb: RdbInfo,
    path: Path,
    redis_url: str,
    container: str,
    timeout_seconds: float,
    durable: bool = True,
) -> CheckedLoad:
    """Start Redis `container` on the RDB placed at `path` while redis-check-rdb parses
    the same file and (`durable`) the file is flushed to disk: this takes as long as the
    slowest of them, not their sum. A rejection fails the load even when Redis loaded
    the file (the caller puts the old data back), and is the reason given when Redis
    failed on it. The RDB's header and CRC-64 were checked when it was staged, and the
    backup's SHA-256 before that: what Redis reads is the file the source Redis wrote."""
    name = f"backup {found.manifest.name}"
    with (
        deep_check_rdb(timeout_seconds=timeout_seconds, name=name, path=path) as deep,
        ThreadPoolExecutor(1) as flusher,
    ):
        flushed = flusher.submit(flush_to_disk, path) if durable else None
        try:
            started_at = time.time()
            containers.start_container(container)
            load = wait_until_loaded.fn(redis_url, container, timeout_seconds)
        except Exception:
            deep.finish(rdb.rdb_version)  # a corrupt RDB is why Redis failed: say so
            raise
        verdict = deep.finish(rdb.rdb_version)
        if flushed is not None:
            flushed.result()
    return CheckedLoad(load, verdict, started_at, deep.keys_read)


@task(cache_policy=NO_CACHE)
def load_while_checking(
    found: FoundBackup,
    staged: StagedRdb,
    data_dir: Path,
    setup: RedisSetup,
    redis_url: str,
    container: str,
    timeout_seconds: float,
) -> CheckedLoad:
    """Restart the SCRATCH Redis `container` on the RDB staged by `stage_rdb`, with
    redis-check-rdb alongside (`start_checked`; nothing to flush: a scratch copy)."""
    containers.stop_container(container)
    place_rdb.fn(staged, data_dir, setup)
    path = data_dir / setup.dbfilename
    return start_checked.fn(found, staged.rdb, path, redis_url, container, timeout_seconds, False)
