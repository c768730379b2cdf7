"""Redis: inspect the server, make it save, get the RDB out, put one back.

Talks to Redis with redis-py (and the replication protocol for the network
fetch). Connection strings may hold credentials: only `redact_url` forms of
them ever reach a log line, an artifact or an exception.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import containers
from tasks.archive import (
    CHUNK,
    CompressedFile,
    CompressedWriter,
    Compression,
    Manifest,
    iter_chunks,
    open_decompressed,
    verify_file,
)
from tasks.aside import move_aside
from tasks.log import run_logger
from tasks.rdb import RdbInfo, validate_stream
from tasks.redis_sync import fetch_rdb_over_network
from tasks.redis_url import parse_redis_url
from tasks.retry import TransientError, retrying_task
from tasks.secrets import redact_url
from tasks.storage import find_local, utc_now

FETCH_METHODS = ("auto", "container", "path", "network")
AOF_NAMES = ("appendonlydir", "appendonly.aof")  # Redis 7's folder, older single file
AofHandling = Literal["refuse", "move_aside"]
COMMAND_TIMEOUT = 30.0
POLL_SECONDS = 0.1


class RedisAccessError(PermissionError):
    """Redis refused our credentials."""


class RedisUnreachable(TransientError):
    """Redis did not answer; it may be restarting."""


class SaveFailed(RuntimeError):
    """Redis could not write its snapshot (disk, permissions, fork)."""


class SaveTimeout(RuntimeError):
    """The snapshot did not finish before the deadline."""


def connect(redis_url: str, timeout: float = COMMAND_TIMEOUT) -> redis.Redis:
    """A client with explicit timeouts (redis-py's 5 s default is too short for admin work)."""
    return parse_redis_url(redis_url).client(timeout, decode_responses=True)


def explain(error: redis.RedisError, redis_url: str) -> Exception:
    """Turn a redis-py error into one that names the server (without secrets) and the fix."""
    where = redact_url(redis_url)
    if (
        isinstance(error, redis.AuthenticationError)
        or "WRONGPASS" in str(error)
        or ("NOAUTH" in str(error))
    ):
        return RedisAccessError(
            f"Redis at {where} refused the credentials: check the password or ACL user "
            "in redis_url (or PROXILION_DR_REDIS_URL)"
        )
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        reason = str(error).replace(redis_url, where)
        return RedisUnreachable(
            f"cannot reach Redis at {where} ({reason}): is it running? check redis_url"
        )
    return error


@dataclass
class ServerFacts:
    """What a backup records about the server it came from."""

    redis_version: str
    role: str
    keyspace: dict[str, dict[str, int]]
    rdb_dir: str | None
    rdb_filename: str | None
    aof_enabled: bool


@retrying_task(1, 5)
def inspect_redis(redis_url: str) -> ServerFacts:
    """Version, role, key counts and where the RDB lives."""
    client = connect(redis_url)
    try:
        info = client.info("everything")
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    try:
        config = client.config_get("dir")
        config.update(client.config_get("dbfilename"))
    except redis.ResponseError:
        config = {}  # CONFIG may be renamed or forbidden; data_dir must then be given
    keyspace = {
        name: {"keys": int(value["keys"]), "expires": int(value["expires"])}
        for name, value in info.items()
        if name.startswith("db") and isinstance(value, dict)
    }
    return ServerFacts(
        redis_version=str(info["redis_version"]),
        role=str(info.get("role", "master")),
        keyspace=keyspace,
        rdb_dir=config.get("dir"),
        rdb_filename=config.get("dbfilename"),
        aof_enabled=bool(int(info.get("aof_enabled", 0))),
    )


@dataclass
class SaveResult:
    last_save_time: int
    seconds: float


def _persistence(client: redis.Redis) -> dict[str, Any]:
    return client.info("persistence")


def _wait_for_save_idle(client: redis.Redis, deadline: float) -> None:
    """Wait for a save someone else started (maybe a diskless replication child)."""
    while int(_persistence(client)["rdb_bgsave_in_progress"]):
        if time.monotonic() > deadline:
            raise SaveTimeout("a background save already in progress did not finish in time")
        time.sleep(POLL_SECONDS)


def _start_bgsave(client: redis.Redis, deadline: float) -> None:
    """BGSAVE (SCHEDULE while an AOF rewrite runs), retrying once past another save."""
    for _attempt in range(2):
        try:
            client.bgsave(schedule=bool(int(_persistence(client)["aof_rewrite_in_progress"])))
            return
        except redis.ResponseError as error:
            if "already in progress" not in str(error):
                raise
            _wait_for_save_idle(client, deadline)
    raise SaveFailed("another background save kept Redis busy; try again later")


def save_failure_reason(container: str | None) -> str:
    """Redis's own words for a failed save, from its log when we can read it."""
    if not container:
        return "see the Redis log"
    try:
        lines = containers.log_tail(container, 80)
    except containers.ContainerError:
        return "see the Redis log"
    reasons = [
        line
        for line in lines
        if "save" in line.lower()
        and ("fail" in line.lower() or "error" in line.lower() or "can't" in line.lower())
    ]
    return reasons[-1].strip() if reasons else "see the Redis log"


@retrying_task(2, 10)
def trigger_save(
    redis_url: str, timeout_seconds: float, container: str | None = None
) -> SaveResult:
    """BGSAVE and wait until Redis reports a newer successful snapshot."""
    started = time.monotonic()
    deadline = started + timeout_seconds
    client = connect(redis_url)
    try:
        before = int(_persistence(client)["rdb_last_save_time"])
        while int(client.time()[0]) <= before:  # LASTSAVE has 1 s resolution
            time.sleep(POLL_SECONDS)
        _start_bgsave(client, deadline)
        while True:
            state = _persistence(client)
            idle = not int(state["rdb_bgsave_in_progress"])
            if idle and int(state["rdb_last_save_time"]) > before:
                return SaveResult(
                    int(state["rdb_last_save_time"]), round(time.monotonic() - started, 3)
                )
            if (
                idle
                and not int(state["aof_rewrite_in_progress"])
                and (state["rdb_last_bgsave_status"] == "err")
            ):
                raise SaveFailed(
                    f"Redis at {redact_url(redis_url)} failed to write its snapshot: "
                    f"{save_failure_reason(container)}. Check free space and that Redis "
                    "can write to its `dir`"
                )
            if time.monotonic() > deadline:
                raise SaveTimeout(
                    f"Redis at {redact_url(redis_url)} did not finish its snapshot within "
                    f"{timeout_seconds:.0f} s: raise save_timeout_seconds or check the server"
                )
            time.sleep(POLL_SECONDS)
    except redis.RedisError as error:
        raise explain(error, redis_url) from None


def choose_fetch(fetch: str, container: str | None, data_dir: str | None) -> str:
    """Resolve `auto`: the container when one is named and exists, else the host
    path when a data_dir is given, else the replication stream."""
    if fetch not in FETCH_METHODS:
        raise ValueError(f"fetch must be one of {', '.join(FETCH_METHODS)}, got {fetch!r}")
    if fetch != "auto":
        if fetch == "container" and not container:
            raise ValueError(
                "fetch='container' needs the container parameter (e.g. proxilion-redis)"
            )
        return fetch
    if container and containers.container_exists(container):
        return "container"
    return "path" if data_dir else "network"


@dataclass
class CapturedRdb:
    """The RDB as staged: compressed file, what the validator found, timings."""

    file: CompressedFile
    rdb: RdbInfo
    method: str
    seconds: float


def rdb_host_path(data_dir: str | None, facts: ServerFacts) -> Path:
    directory = data_dir or facts.rdb_dir
    if not directory:
        raise ValueError("Redis did not tell its `dir` (CONFIG is restricted): set data_dir")
    return Path(directory) / (facts.rdb_filename or "dump.rdb")


def _source(
    method: str,
    redis_url: str,
    container: str | None,
    data_dir: str | None,
    facts: ServerFacts,
    raw_staging: Path,
) -> Iterator[bytes]:
    """The RDB's bytes from where the chosen method finds them."""
    if method == "container":
        assert container is not None
        inner = PurePosixPath(facts.rdb_dir or "/data") / (facts.rdb_filename or "dump.rdb")
        yield from containers.stream_file(container, str(inner))
        return
    if method == "network":
        target = parse_redis_url(redis_url)
        fetch_rdb_over_network(
            target.host or "",
            target.port or 0,
            raw_staging,
            username=target.username,
            password=target.password,
            tls=target.tls,
            unix_socket=target.socket_path,
        )
        path = raw_staging
    else:
        path = rdb_host_path(data_dir, facts)
        if not path.is_file():
            raise FileNotFoundError(
                f"no RDB at {path}: set data_dir to the host folder holding Redis's "
                f"{facts.rdb_filename or 'dump.rdb'}, or use fetch='container' or 'network'"
            )
    try:
        with open(path, "rb") as stream:
            yield from iter_chunks(stream, CHUNK)
    finally:
        if method == "network":
            raw_staging.unlink(missing_ok=True)


def pipe_rdb(
    chunks: Iterable[bytes], staging: Path, compression: Compression, deep_check: bool
) -> tuple[CompressedFile, RdbInfo]:
    """One pass: validate (header, CRC-64, optionally redis-check-rdb alongside),
    compress and hash. The output is removed unless everything checks out."""
    writer = CompressedWriter(staging, compression)
    try:
        info = validate_stream(chunks, deep_check, writer.write)
        return writer.close(), info
    except BaseException:
        writer.abort()
        raise


@retrying_task(2, 10)
def capture_rdb(
    method: str,
    redis_url: str,
    container: str | None,
    data_dir: str | None,
    facts: ServerFacts,
    staging: Path,
    compression: Compression,
    deep_check: bool,
) -> CapturedRdb:
    """Copy the RDB out, validate it, compress and checksum it, in one streaming pass."""
    started = time.perf_counter()
    raw_staging = staging.with_name(staging.name + ".rdb-raw")
    try:
        chunks = _source(method, redis_url, container, data_dir, facts, raw_staging)
        compressed, info = pipe_rdb(chunks, staging, compression, deep_check)
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    seconds = round(time.perf_counter() - started, 3)
    run_logger().info(
        "Captured RDB v%s (%d bytes → %d %s) via %s in %.2f s",
        info.rdb_version,
        info.size,
        compressed.size,
        compression,
        method,
        seconds,
    )
    return CapturedRdb(file=compressed, rdb=info, method=method, seconds=seconds)


def redis_manifest(
    name: str,
    captured: CapturedRdb,
    facts: ServerFacts,
    server: str,
    save: SaveResult | None,
    duration_seconds: float,
    source_id: str,
) -> Manifest:
    """The manifest of a Redis backup: the stored file plus what it holds."""
    return Manifest.describe(
        "redis",
        name,
        captured.file,
        duration_seconds,
        source={
            "server": server,
            "redis_version": facts.redis_version,
            "role": facts.role,
            "rdb_version": captured.rdb.rdb_version,
            "rdb_checksum_verified": captured.rdb.checksum_verified,
            "deep_check": captured.rdb.deep_check,
            "keyspace": facts.keyspace,
            "fetch": captured.method,
        },
        steps={"save": save.seconds if save else 0.0, "capture": captured.seconds},
        source_id=source_id,
    )


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


@task(cache_policy=NO_CACHE)
def place_rdb(
    backup_dir: Path,
    name: str,
    target_dir: Path,
    dbfilename: str = "dump.rdb",
    aof: AofHandling = "refuse",
    aof_names: tuple[str, ...] = AOF_NAMES,
) -> PlacedRdb:
    """Put a stored backup ('latest' or by name) into `target_dir` for Redis to load.

    The stored file's checksum is verified first, the RDB is validated while it is
    decompressed (and by redis-check-rdb when installed), and only then is any
    existing RDB moved aside (never deleted) and the new one renamed into place.
    Redis must be stopped (or about to be started) for this to take effect.

    AOF data in `target_dir` (`aof_names`: Redis's `appenddirname` and
    `appendfilename`) would be loaded instead of the RDB: `aof="refuse"` (default)
    refuses before touching anything, `aof="move_aside"` moves it aside too. Either
    way start Redis with `appendonly no`: Redis 7.0 with `appendonly yes` and no AOF
    starts empty (and writes an empty AOF) without reading dump.rdb.
    """
    if aof not in ("refuse", "move_aside"):
        raise ValueError(f"aof must be 'refuse' or 'move_aside', got {aof!r}")
    found = aof_in(target_dir, aof_names)
    if found and aof == "refuse":
        _refuse_aof(found, Path(target_dir))
    manifest, stored = find_local(Path(backup_dir), "redis", name)
    verify_file(stored, manifest.size, manifest.sha256)
    target = Path(target_dir) / dbfilename
    incoming = target.with_name(f".{dbfilename}.{uuid.uuid4().hex[:8]}.restoring")
    try:
        with open_decompressed(stored, manifest.compression) as source, open(incoming, "wb") as out:
            info = validate_stream(iter_chunks(source), True, out.write)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        incoming.unlink(missing_ok=True)
        raise
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
