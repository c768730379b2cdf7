"""Putting an RDB backup back into a live Redis, so that it is what Redis loads.

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
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.aside import move_aside
from tasks.common.clock import utc_now
from tasks.common.files import (
    OWNER_ONLY,
    chown_like,
    create_file,
    folder_mode,
    fsync_dir,
    mode_like,
)
from tasks.common.http_health import HEALTHY, wait_until_healthy
from tasks.common.log import run_logger
from tasks.common.secrets import redact_url
from tasks.docker import containers
from tasks.docker.containers import wait_started
from tasks.redis.rdb import (
    RdbChecker,
    RdbError,
    RdbInfo,
    deep_check_rdb,
    max_rdb_for_redis,
    validate_stream,
)
from tasks.redis.server import RedisUnreachable, connect, explain, inspect_redis
from tasks.store.archive import (
    Compression,
    iter_chunks,
    open_decompressed,
    verify_file,
)
from tasks.store.find import FoundBackup
from tasks.store.local import find_local


class RdbTooNew(RdbError):
    """The backup's RDB version is newer than the target Redis can load."""


class RestoreNotVerified(RuntimeError):
    """Redis runs, but does not hold what the backup holds."""


@dataclass
class RedisSetup:
    """What the restore must know about the target Redis, read before it is touched."""

    redis_version: str
    answered: bool  # False: Redis did not answer; the facts come from its binary and files
    dir: str | None
    dbfilename: str
    aof_enabled: bool | None  # None: unknown until the data dir is seen
    appenddirname: str
    appendfilename: str
    keyspace: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rdb_version(self) -> int:
        return max_rdb_for_redis(self.redis_version)

    def aof_name(self) -> str:
        """The AOF's entry in the data dir: its folder (Redis 7) or its file."""
        return self.appenddirname or self.appendfilename

    def data_names(self) -> list[str]:
        return [self.dbfilename, self.aof_name()]


def _version_from_binary(container: str, argv: list[str]) -> str:
    """`redis-server --version` run from the container's own image and mounts."""
    binary = next((a for a in argv if os.path.basename(a).startswith("redis-server")), None)
    output = containers.run_like(container, [binary or "redis-server", "--version"])
    for word in output.split():
        if word.startswith("v="):
            return word[2:]
    raise containers.ContainerError(
        f"Redis in {container!r} does not answer and its binary did not tell its version "
        f"({output.strip()[:120]!r}): start it, or check the container"
    )


SETTINGS = ("dir", "dbfilename", "appendonly", "appenddirname", "appendfilename")


def _settings_from_command(container: str, argv: list[str], workdir: str) -> dict[str, str]:
    """The persistence settings a stopped Redis would start with: its config file (the
    first `.conf` argument, read through the container's mount), then `--name value`
    arguments, which win. Empty when there is neither."""
    found: dict[str, str] = {}
    conf = next((a for a in argv[1:] if a.endswith(".conf") and not a.startswith("-")), None)
    host = containers.host_path(container, str(PurePosixPath(workdir) / conf)) if conf else None
    if host is not None and host.is_file():
        for line in host.read_text(errors="replace").splitlines():
            words = line.split(None, 1)
            if len(words) == 2 and words[0].lower() in SETTINGS:
                found[words[0].lower()] = words[1].strip().strip("\"'")
    for position, arg in enumerate(argv[:-1]):
        if arg.startswith("--") and arg[2:].lower() in SETTINGS:
            found[arg[2:].lower()] = argv[position + 1]
    return found


def _setup_from_container(container: str) -> RedisSetup:
    """What a Redis that does not answer (crashed, stopped) would start with."""
    attrs = containers.get_container(container).attrs
    argv = [attrs.get("Path", ""), *attrs.get("Args", [])]
    workdir = attrs.get("Config", {}).get("WorkingDir") or "/"
    version = _version_from_binary(container, argv)
    found = _settings_from_command(container, argv, workdir)
    aof = found.get("appendonly")
    multi_part_aof = max_rdb_for_redis(version) >= 10  # Redis 7: AOF is a folder
    return RedisSetup(
        redis_version=version,
        answered=False,
        dir=str(PurePosixPath(workdir) / found.get("dir", ".")),
        dbfilename=found.get("dbfilename", "dump.rdb"),
        aof_enabled=None if aof is None else aof == "yes",
        appenddirname=found.get("appenddirname", "appendonlydir" if multi_part_aof else ""),
        appendfilename=found.get("appendfilename", "appendonly.aof"),
    )


def _aof_config(client: redis.Redis) -> dict[str, str]:
    """appendonly, appendfilename, appenddirname; {} where CONFIG is forbidden."""
    try:
        return dict(client.config_get("append*"))
    except redis.ResponseError:
        return {}


@task(cache_policy=NO_CACHE)
def read_redis_setup(redis_url: str, container: str | None) -> RedisSetup:
    """Version, data location and AOF settings from the running Redis; when it does not
    answer (crashed, stopped), from the container: its binary's version, its config
    file and arguments."""
    try:
        facts = inspect_redis.fn(redis_url)
        config = _aof_config(connect(redis_url))
    except RedisUnreachable:
        if not container:
            raise
        return _setup_from_container(container)
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    return RedisSetup(
        redis_version=facts.redis_version,
        answered=True,
        dir=facts.rdb_dir,
        dbfilename=facts.rdb_filename or "dump.rdb",
        aof_enabled=config.get("appendonly", "yes" if facts.aof_enabled else "no") == "yes",
        appenddirname=config.get("appenddirname", ""),
        appendfilename=config.get("appendfilename") or "appendonly.aof",
        keyspace=facts.keyspace,
    )


def settle_aof(setup: RedisSetup, data_dir: Path) -> RedisSetup:
    """When Redis could not say whether AOF is on, its data dir tells: an AOF there
    means it was on."""
    if setup.aof_enabled is None:
        setup.aof_enabled = (data_dir / setup.aof_name()).exists()
    return setup


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


@task(cache_policy=NO_CACHE)
def stage_rdb(found: FoundBackup, setup: RedisSetup, staging: Path) -> RdbInfo:
    """Decompress and validate the RDB into `staging` (inside the data dir, so placing
    it later is a rename), after checking the target Redis loads its version."""
    check_loadable(rdb_version_of(found), setup, found.manifest.name)
    mode = mode_like(staging.parent / setup.dbfilename)  # the data dir's RDB keeps its mode
    return decompress_staged.fn(found, staging, setup.dbfilename, mode)


@task(cache_policy=NO_CACHE)
def decompress_staged(
    found: FoundBackup,
    staging: Path,
    dbfilename: str,
    mode: int = OWNER_ONLY.file,
    deep: bool = True,
    durable: bool = True,
) -> RdbInfo:
    """Decompress the verified backup's RDB into the new folder `staging`, validating it
    in the same pass (header, CRC-64, and redis-check-rdb when `deep`; fsynced when
    `durable`). The drill stages with neither: its scratch Redis needs no durable copy,
    and `load_while_checking` runs redis-check-rdb beside the load."""
    staging.mkdir(OWNER_ONLY.directory)
    os.chmod(staging, OWNER_ONLY.directory)
    manifest = found.manifest
    return decompress_rdb(
        found.path, manifest.compression, staging / dbfilename, mode, deep, durable
    )


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
def place_staged(staging: Path, data_dir: Path, setup: RedisSetup) -> list[str]:
    """Rename the staged RDB into place and, when AOF is on, make it the AOF's base so
    that Redis loads it (see the module's docstring). Returns the names placed."""
    owner = data_dir.stat()
    rdb = data_dir / setup.dbfilename
    os.replace(staging / setup.dbfilename, rdb)
    staging.rmdir()
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


@task(cache_policy=NO_CACHE)
def wait_until_loaded(redis_url: str, container: str, timeout_seconds: float) -> dict[str, Any]:
    """Poll until Redis answers with `loading:0`; fail at once if its container exits.
    Returns INFO persistence and stats (`rdb_last_load_keys_expired`…)."""
    client = connect(redis_url, timeout=10)

    def loaded() -> str | None:
        try:
            info = client.info("persistence")
        except redis.BusyLoadingError:
            return "loading"
        except redis.RedisError as error:
            return str(explain(error, redis_url))
        return f"loading, {info.get('loading_loaded_perc')}% done" if int(info["loading"]) else None

    wait_started(loaded, container, timeout_seconds, f"Redis at {redact_url(redis_url)}")
    try:
        return {**client.info("persistence"), **client.info("stats")}
    except redis.RedisError as error:
        raise explain(error, redis_url) from None


@dataclass(frozen=True)
class CheckedLoad:
    """A staged RDB loaded by a scratch Redis, with redis-check-rdb's verdict on it."""

    load: dict[str, Any]  # INFO persistence and stats after loading
    deep_check: str


@task(cache_policy=NO_CACHE)
def load_while_checking(
    found: FoundBackup,
    rdb: RdbInfo,
    staging: Path,
    data_dir: Path,
    setup: RedisSetup,
    redis_url: str,
    container: str,
    timeout_seconds: float,
) -> CheckedLoad:
    """Restart the SCRATCH Redis `container` on the RDB staged by `decompress_staged`
    while redis-check-rdb parses the same file: this takes as long as the slower of
    the two, not both. A rejection fails the load even when Redis loaded the file, and
    is the reason given when Redis failed on it. Never for a live Redis: it loads the
    RDB before the full check has passed."""
    staged = staging / setup.dbfilename
    name = f"backup {found.manifest.name}"
    with deep_check_rdb(timeout_seconds=timeout_seconds, name=name, path=staged) as deep:
        try:
            containers.stop_container(container)
            place_staged.fn(staging, data_dir, setup)
            containers.start_container(container)
            load = wait_until_loaded.fn(redis_url, container, timeout_seconds)
        except Exception:
            deep.finish(rdb.rdb_version)  # a corrupt RDB is why Redis failed: say so
            raise
        return CheckedLoad(load, deep.finish(rdb.rdb_version))


@task(cache_policy=NO_CACHE)
def verify_keyspace(
    redis_url: str, expected: dict[str, dict[str, int]], load: dict[str, Any]
) -> str:
    """Key counts per db against the backup's manifest. Keys with a TTL may have expired
    since the backup (Redis drops them on load: `rdb_last_load_keys_expired`), so a db
    may hold fewer keys, but never fewer than its keys without TTL."""
    client = connect(redis_url)
    try:
        actual = {
            name: int(v["keys"])
            for name, v in client.info("keyspace").items()
            if isinstance(v, dict)
        }
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    problems, lines = [], []
    for db, facts in sorted(expected.items()):
        have, want, expiring = actual.get(db, 0), facts["keys"], facts.get("expires", 0)
        lines.append(f"{db} {have}/{want}")
        if have < want - expiring:
            problems.append(f"{db} holds {have} keys, the backup {want} ({expiring} with a TTL)")
    expired = load.get("rdb_last_load_keys_expired", 0)
    summary = f"keys per db restored/backup: {', '.join(lines) or 'none'}"
    summary += f"; expired on load {expired}"
    if problems:
        raise RestoreNotVerified(f"restored Redis is missing keys: {'; '.join(problems)}")
    run_logger().info(summary)
    return summary


@task(cache_policy=NO_CACHE)
def check_persistence(redis_url: str, setup: RedisSetup) -> str:
    """AOF as it was before the restore, its last write ok, no rewrite still running:
    a restart now keeps the restored data."""
    client = connect(redis_url)
    try:
        appendonly = client.config_get("appendonly").get("appendonly")
        info = client.info("persistence")
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    wanted = "yes" if setup.aof_enabled else "no"
    if appendonly != wanted:
        raise RestoreNotVerified(f"appendonly is {appendonly!r} after the restore, was {wanted!r}")
    if setup.aof_enabled and info.get("aof_last_write_status") != "ok":
        raise RestoreNotVerified(f"Redis cannot write its AOF: {info.get('aof_last_write_status')}")
    return f"appendonly {wanted}" + (" (restored RDB is the AOF base)" if setup.aof_enabled else "")


@task(cache_policy=NO_CACHE)
def check_gateway(health_url: str, timeout_seconds: float) -> str:
    """The gateway (which keeps its sessions in this Redis) answers healthy again."""
    wait = wait_until_healthy(health_url, timeout_seconds, HEALTHY)
    if not wait.healthy:
        raise RestoreNotVerified(f"gateway at {redact_url(health_url)}: {wait.summary()}")
    return f"{redact_url(health_url)} {wait.summary()}"


AOF_NAMES = ("appendonlydir", "appendonly.aof")  # Redis 7's folder, older single file


AofHandling = Literal["refuse", "move_aside"]


class AofDataPresent(RuntimeError):
    """The restore target holds AOF data, which Redis would load instead of the RDB."""


def aof_in(target_dir: Path, aof_names: Iterable[str] = AOF_NAMES) -> list[Path]:
    """The AOF data (Redis 7's folder, an older single file) present in `target_dir`."""
    return [Path(target_dir) / n for n in aof_names if os.path.lexists(Path(target_dir) / n)]


def _refuse_aof(found: list[Path], target_dir: Path) -> None:
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
    raise AofDataPresent(
        f"{target_dir} holds AOF data ({names}): a Redis with appendonly yes loads the AOF "
        "and ignores the placed dump.rdb, so this restore would be silently lost. Use "
        "recover-redis, or pass aof='move_aside' to move the AOF aside (kept, not "
        "deleted) and start Redis with appendonly no"
    )


@dataclass
class PlacedRdb:
    """An RDB put in place for Redis to load, and where the previous one went."""

    backup: str
    path: Path
    moved_aside: Path | None
    rdb: RdbInfo
    aof_moved_aside: list[Path] = field(default_factory=list)


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


@task(cache_policy=NO_CACHE)
def place_rdb(
    backup_dir: Path,
    name: str,
    target_dir: Path,
    dbfilename: str = "dump.rdb",
    aof: AofHandling = "refuse",
    aof_names: tuple[str, ...] = AOF_NAMES,
    mode_of: Path | None = None,
    plain: Path | None = None,
) -> PlacedRdb:
    """Put a stored backup ('latest' or by name) into `target_dir` for Redis to load
    (from `plain`, its decrypted copy, when the stored file is age-encrypted).

    The stored file's checksum is verified first, the RDB is validated while it is
    decompressed (and by redis-check-rdb when installed), and only then is any
    existing RDB moved aside (never deleted) and the new one renamed into place.
    Redis must be stopped (or about to be started) for this to take effect.

    AOF data in `target_dir` (`aof_names`: Redis's `appenddirname` and
    `appendfilename`) would be loaded instead of the RDB: `aof="refuse"` (default)
    refuses before touching anything, `aof="move_aside"` moves it aside too. Either
    way start Redis with `appendonly no`: Redis 7.0 with `appendonly yes` and no AOF
    starts empty (and writes an empty AOF) without reading dump.rdb.

    The placed file takes the mode of `mode_of` (default: the RDB it replaces), or
    0600 when there is none; never the process umask's.
    """
    if aof not in ("refuse", "move_aside"):
        raise ValueError(f"aof must be 'refuse' or 'move_aside', got {aof!r}")
    found = aof_in(target_dir, aof_names)
    if found and aof == "refuse":
        _refuse_aof(found, Path(target_dir))
    manifest, stored = find_local(Path(backup_dir), "redis", name)
    stored = manifest.plain_file(stored, plain)
    verify_file(stored, manifest.size, manifest.sha256)
    target = Path(target_dir) / dbfilename
    incoming = target.with_name(f".{dbfilename}.{uuid.uuid4().hex[:8]}.restoring")
    info = decompress_rdb(stored, manifest.compression, incoming, mode_like(mode_of or target))
    found = aof_in(target_dir, aof_names)
    if found and aof == "refuse":  # appeared while we decompressed (Redis started?)
        incoming.unlink()
        _refuse_aof(found, Path(target_dir))
    stamp = utc_now().strftime("%Y%m%d_%H%M%S")
    aof_aside = [a for a in (move_aside(p, stamp) for p in found) if a]
    aside = move_aside(target, stamp)
    os.replace(incoming, target)
    for path in aof_aside:
        run_logger().warning("AOF data moved aside to %s: start Redis with appendonly no", path)
    return PlacedRdb(manifest.name, target, aside, info, aof_aside)
