"""Redis: inspect the server, make it save, get the RDB out, put one back.

Talks to Redis with redis-py (and the replication protocol for the network
fetch). Connection strings may hold credentials: only `redact_url` forms of
them ever reach a log line, an artifact or an exception.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import redis
from docker.errors import DockerException
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.aside import move_aside
from tasks.common.clock import utc_now
from tasks.common.files import create_file, mode_like
from tasks.common.log import run_logger
from tasks.common.redis_url import parse_redis_url
from tasks.common.retry import TransientError, retrying_task
from tasks.common.secrets import redact_url
from tasks.docker import containers
from tasks.redis.rdb import RdbInfo, validate_stream, validating
from tasks.redis.sync import fetch_rdb_over_network
from tasks.store.archive import (
    CHUNK,
    CompressedFile,
    Compression,
    Manifest,
    iter_chunks,
    open_decompressed,
    verify_file,
)
from tasks.store.encryption import AgeCopy, staged_writer
from tasks.store.local import find_local

FETCH_METHODS = ("auto", "container", "path", "network")
AOF_NAMES = ("appendonlydir", "appendonly.aof")  # Redis 7's folder, older single file
AofHandling = Literal["refuse", "move_aside"]
COMMAND_TIMEOUT = 30.0
# The kernel stamps file times, and time() (the RDB's `ctime`) reads, a coarse clock up
# to a tick (4-10 ms) behind the server's TIME: a save within a tick of BGSAVE can look
# made before it.
COARSE_CLOCK_SLACK_US = 50_000
POLL_SECONDS = 0.1


class RedisAccessError(PermissionError):
    """Redis refused our credentials."""


class RedisUnreachable(TransientError):
    """Redis did not answer; it may be restarting."""


class SaveFailed(RuntimeError):
    """Redis could not write its snapshot (disk, permissions, fork)."""


class SaveTimeout(RuntimeError):
    """The snapshot did not finish before the deadline."""


class WrongServer(RuntimeError):
    """A fetch route reaches another Redis, or an RDB older than our save: the
    backup would hold other data than the server it names. Not retried."""


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
    run_id: str = ""  # unique per server process: proves a route reaches this server
    tcp_port: int = 0  # the port it listens on, as the server itself sees it


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
        run_id=str(info.get("run_id", "")),
        tcp_port=int(info.get("tcp_port", 0)),
    )


@dataclass
class SaveResult:
    """The snapshot we waited for: Redis's LASTSAVE after it, the server's clock
    when BGSAVE was sent (an RDB from this save has a `ctime` at or after it), and
    how long it took."""

    last_save_time: int
    seconds: float
    started_at: int = 0
    started_at_us: int = 0  # the same, in microseconds (server TIME)


def _persistence(client: redis.Redis) -> dict[str, Any]:
    return client.info("persistence")


BUSY = (
    "Redis is busy with a background save it did not start for us (a replica's full "
    "sync, or another backup)"
)


def _wait_for_save_idle(client: redis.Redis, deadline: float) -> None:
    """Wait for a save someone else started (maybe a diskless replication child)."""
    while int(_persistence(client)["rdb_bgsave_in_progress"]):
        if time.monotonic() > deadline:
            raise SaveTimeout(
                f"{BUSY} that did not finish before the deadline: retry later or raise "
                "save_timeout_seconds"
            )
        time.sleep(POLL_SECONDS)


@dataclass
class _Started:
    """Where the save counters stood when our BGSAVE was accepted."""

    saves: int | None  # INFO rdb_saves (Redis 7+; counts a save when it starts)
    server_time_us: int


def _start_bgsave(client: redis.Redis, deadline: float) -> _Started:
    """BGSAVE (SCHEDULE while an AOF rewrite runs), retrying once past another save."""
    for _attempt in range(2):
        state = _persistence(client)
        seconds, micros = client.time()
        started = _Started(
            int(state["rdb_saves"]) if "rdb_saves" in state else None,
            int(seconds) * 1_000_000 + int(micros),
        )
        try:
            client.bgsave(schedule=bool(int(state["aof_rewrite_in_progress"])))
            return started
        except redis.ResponseError as error:
            if "already in progress" not in str(error):
                raise
            _wait_for_save_idle(client, deadline)
    raise SaveFailed(f"{BUSY} twice in a row, so ours could not start: try again later")


def _wait_past_last_save(client: redis.Redis, before: int, deadline: float, where: str) -> None:
    """Redis < 7 only (no rdb_saves): LASTSAVE has 1 s resolution, so wait until the
    server clock has passed it before saving, within the deadline. A LASTSAVE ahead
    of the clock (a clock stepped back) would otherwise be waited for forever."""
    while (now := int(client.time()[0])) <= before:
        if time.monotonic() > deadline:
            raise SaveTimeout(
                f"Redis at {where} reports its last save at {before}, {before - now} s ahead "
                "of its own clock (was the clock set back?): a new save cannot be told "
                "apart; run one save by hand (BGSAVE) once the clock has passed it, or "
                "upgrade to Redis 7"
            )
        time.sleep(POLL_SECONDS)


def _our_save_ran(state: dict[str, Any], started: _Started, before: int) -> bool:
    """Has the save we started been run (it may still be in progress)?"""
    if started.saves is not None:
        return int(state["rdb_saves"]) > started.saves
    return int(state["rdb_last_save_time"]) > before


def _may_be_ours(state: dict[str, Any], started: _Started) -> bool:
    """Redis < 7: a failed save leaves LASTSAVE as it was, so an error status once no
    AOF rewrite holds our scheduled save back is taken as ours."""
    return started.saves is None and not int(state["aof_rewrite_in_progress"])


_LOG_PREFIX = re.compile(r"^\d+:[A-Z] .*? [.*#-] ")  # "1:C 28 Nov 2026 08:42:20.693 # "


def save_failure_reason(container: str | None) -> str:
    """Redis's own words for a failed save, from its log when we can read it."""
    if not container:
        return "see the Redis log"
    try:
        lines = containers.log_tail(container, 80)
    except containers.ContainerError:
        return "see the Redis log"
    reasons = [  # e.g. "Failed opening the temp RDB file … for saving: Read-only file system"
        _LOG_PREFIX.sub("", line).strip()
        for line in lines
        if ("sav" in line.lower() or "rdb" in line.lower())
        and any(word in line.lower() for word in ("fail", "error", "can't"))
    ]
    specific = [line for line in reasons if not line.startswith("Background saving error")]
    return (specific or reasons or ["see the Redis log"])[-1]


@retrying_task(2, 10)
def trigger_save(
    redis_url: str, timeout_seconds: float, container: str | None = None
) -> SaveResult:
    """BGSAVE and wait until Redis reports that save done; every wait has the deadline."""
    started = time.monotonic()
    deadline = started + timeout_seconds
    where = redact_url(redis_url)
    client = connect(redis_url)
    try:
        state = _persistence(client)
        before = int(state["rdb_last_save_time"])
        if "rdb_saves" not in state:
            _wait_past_last_save(client, before, deadline, where)
        ours = _start_bgsave(client, deadline)
        while True:
            state = _persistence(client)
            idle = not int(state["rdb_bgsave_in_progress"])
            done = idle and _our_save_ran(state, ours, before)
            failed = state["rdb_last_bgsave_status"] == "err"
            if done and not failed:
                return SaveResult(
                    int(state["rdb_last_save_time"]),
                    round(time.monotonic() - started, 3),
                    ours.server_time_us // 1_000_000,
                    ours.server_time_us,
                )
            if failed and (done or (idle and _may_be_ours(state, ours))):
                raise SaveFailed(
                    f"Redis at {where} failed to write its snapshot: "
                    f"{save_failure_reason(container)}. Check free space and that Redis "
                    "can write to its `dir`"
                )
            if time.monotonic() > deadline:
                raise SaveTimeout(
                    f"Redis at {where} did not finish its snapshot within "
                    f"{timeout_seconds:.0f} s: raise save_timeout_seconds or check the server"
                )
            time.sleep(POLL_SECONDS)
    except redis.RedisError as error:
        raise explain(error, redis_url) from None


def _exec(container: Any, command: list[str], environment: dict[str, str]) -> tuple[int, str]:
    try:
        code, output = container.exec_run(command, environment=environment)
    except DockerException as error:
        return 127, str(error)
    return int(code), output.decode(errors="replace")


def container_serves(container_name: str, facts: ServerFacts, redis_url: str) -> str | None:
    """None when the Redis in the container is the server at `redis_url`, else why
    that is not proven.

    Proof: `redis-cli` run inside the container against the server's own port
    answers with the same `run_id`, and the answering process (`process_id`, as
    the server sees it) is a process of the container holding the socket that
    listens on that port. The second check matters when the container shares the
    host's network: its 127.0.0.1 then reaches every Redis on the host, the one
    at `redis_url` included. Needs `redis-cli`, `cat` and `ls` in the container.
    """
    try:
        found = containers.get_container(container_name)
    except containers.ContainerError as error:
        return str(error)
    if found.status != "running":
        return f"container {container_name!r} is {found.status}"
    if not facts.run_id or not facts.tcp_port:
        return "the server at redis_url does not report its run_id and TCP port"
    kwargs = connect(redis_url).connection_pool.connection_kwargs
    if kwargs.get("ssl"):
        return "the server speaks TLS; redis-cli in the container cannot be checked"
    command = ["redis-cli", "-p", str(facts.tcp_port), "--no-auth-warning"]
    if kwargs.get("username"):
        command += ["--user", str(kwargs["username"])]
    secret = {"REDISCLI_AUTH": str(kwargs["password"])} if kwargs.get("password") else {}
    code, output = _exec(found, [*command, "INFO", "server"], secret)
    fields = dict(line.split(":", 1) for line in output.splitlines() if ":" in line)
    answer = fields.get("run_id", "").strip()
    if code or not answer:
        first = output.strip().splitlines()[0][:120] if output.strip() else f"exit {code}"
        return f"redis-cli in container {container_name!r} got no answer ({first})"
    if answer != facts.run_id:
        return (
            f"container {container_name!r} runs another Redis (run_id {answer[:12]}…) than "
            f"the server at redis_url (run_id {facts.run_id[:12]}…)"
        )
    pid = fields.get("process_id", "").strip()
    if not _owns_listener(found, pid, facts.tcp_port):
        return (
            f"the Redis at redis_url answers from inside container {container_name!r} but "
            f"its port {facts.tcp_port} is not held by a process of the container (it shares "
            "the host's network, where another Redis listens)"
        )
    return None


def _owns_listener(container: Any, pid: str, port: int) -> bool:
    """Does process `pid` of the container hold the socket listening on `port` in the
    container's network namespace? (/proc/net/tcp* inodes against the process's fds.)"""
    if not pid.isdigit():
        return False
    code, table = _exec(container, ["cat", "/proc/net/tcp", "/proc/net/tcp6"], {})
    if code not in (0, 1):  # 1: no IPv6 table
        return False
    listening = {
        fields[9]
        for fields in (line.split() for line in table.splitlines()[1:])
        if len(fields) > 9 and fields[3] == "0A" and fields[1].endswith(f":{port:04X}")
    }
    code, fds = _exec(container, ["ls", "-l", f"/proc/{pid}/fd"], {})
    held = set(re.findall(r"socket:\[(\d+)\]", fds))
    return code == 0 and bool(listening & held)


def choose_fetch(
    fetch: str,
    container: str | None,
    data_dir: str | None,
    facts: ServerFacts | None = None,
    redis_url: str | None = None,
) -> str:
    """Resolve `auto`: the container when one is named, exists and provably runs the
    server at `redis_url`, else the host path when a data_dir is given, else the
    replication stream. An explicit `container` that is another server is refused."""
    if fetch not in FETCH_METHODS:
        raise ValueError(f"fetch must be one of {', '.join(FETCH_METHODS)}, got {fetch!r}")
    if fetch == "container" and not container:
        raise ValueError("fetch='container' needs the container parameter (e.g. proxilion-redis)")
    if fetch == "container":
        containers.get_container(str(container))  # a wrong name fails here, naming the others
    wanted = fetch == "container" or (
        fetch == "auto" and bool(container) and containers.container_exists(str(container))
    )
    if wanted and facts is not None and redis_url is not None:
        assert container is not None
        why_not = container_serves(container, facts, redis_url)
        if why_not is None:
            return "container"
        if fetch == "container":
            raise WrongServer(
                f"fetch='container' cannot be used: {why_not}. Name the container running "
                f"the Redis at {redact_url(redis_url)}, or use fetch='network'"
            )
        run_logger().warning("Not copying from container %r: %s", container, why_not)
    elif wanted:
        return "container"
    if fetch != "auto":
        return fetch
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


Feed = Callable[[bytes | memoryview], None]
Producer = Callable[[Feed], object]


def _source(
    method: str,
    redis_url: str,
    container: str | None,
    data_dir: str | None,
    facts: ServerFacts,
    save: SaveResult | None = None,
) -> Producer:
    """The RDB's bytes from where the chosen method finds them: a producer that
    pushes every chunk into the feed it is given (the replication stream as it
    arrives, with no copy on disk). With `save`, a host file last written before
    that save began is refused: it is not that save's output."""
    if method == "container":
        assert container is not None
        inner = PurePosixPath(facts.rdb_dir or "/data") / (facts.rdb_filename or "dump.rdb")
        return lambda feed: _each(containers.stream_file(container, str(inner)), feed)
    if method == "network":
        target = parse_redis_url(redis_url)

        def receive(feed: Feed) -> int:
            return fetch_rdb_over_network(
                target.host or "",
                target.port or 0,
                None,
                username=target.username,
                password=target.password,
                tls=target.tls,
                unix_socket=target.socket_path,
                on_chunk=feed,
            )

        return receive
    path = rdb_host_path(data_dir, facts)
    if not path.is_file():
        raise FileNotFoundError(
            f"no RDB at {path}: set data_dir to the host folder holding Redis's "
            f"{facts.rdb_filename or 'dump.rdb'}, or use fetch='container' or 'network'"
        )

    def read(feed: Feed) -> None:
        with open(path, "rb") as stream:
            written_us = os.fstat(stream.fileno()).st_mtime_ns // 1000
            if save is not None and written_us + COARSE_CLOCK_SLACK_US < save.started_at_us:
                raise WrongServer(
                    f"{path} was last written before the save Redis at {redact_url(redis_url)} "
                    "ran: it is not that server's snapshot (does data_dir hold another "
                    "Redis's RDB?)"
                )
            _each(iter_chunks(stream, CHUNK), feed)

    return read


def _each(chunks: Iterator[bytes], feed: Feed) -> None:
    with contextlib.closing(chunks):  # now, even when `feed` raised (see stream_archive)
        for chunk in chunks:
            feed(chunk)


def pipe_rdb(
    produce: Producer,
    staging: Path,
    compression: Compression,
    deep_check: bool,
    encrypt: AgeCopy | None = None,
) -> tuple[CompressedFile, RdbInfo]:
    """One pass: validate (header, CRC-64, optionally redis-check-rdb alongside),
    compress and hash the chunks `produce` pushes (and age-encrypt the compressed
    stream as `encrypt` says). The output is removed unless everything checks out."""
    writer = staged_writer(staging, compression, encrypt)
    try:
        with validating(deep_check, writer.write) as validation:
            produce(validation.feed)
            info = validation.finish()
        return writer.close(), info
    except BaseException:
        writer.abort()
        raise


def check_fresh(info: RdbInfo, save: SaveResult, method: str, where: str) -> None:
    """Refuse an RDB older than the save we waited for: it came from another server
    (or another file) than the one that saved."""
    earliest = (save.started_at_us - COARSE_CLOCK_SLACK_US) // 1_000_000
    if info.created_at is not None and info.created_at >= earliest:
        return
    made = "has no ctime field" if info.created_at is None else f"was made at {info.created_at}"
    raise WrongServer(
        f"the RDB fetched via {method} {made}, before the save Redis at {where} ran at "
        f"{save.started_at}: it is not that server's snapshot (wrong container or data_dir?)"
    )


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
    save: SaveResult | None = None,
    network_fallback: bool = False,
    encrypt: AgeCopy | None = None,
) -> CapturedRdb:
    """Copy the RDB out, validate it, compress and checksum it, in one streaming pass;
    with `encrypt`, the compressed stream is also age-encrypted in that pass
    (`captured.file.encrypted`: the copy for S3, or the local copy itself).

    With `save`, the RDB must be that save's (its ctime not older): otherwise it is
    dropped, and refetched over the network when `network_fallback` (fetch=auto)."""
    started = time.perf_counter()

    def attempt(how: str, proof: SaveResult | None) -> tuple[CompressedFile, RdbInfo]:
        produce = _source(how, redis_url, container, data_dir, facts, proof)
        compressed, info = pipe_rdb(produce, staging, compression, deep_check, encrypt)
        if proof is not None and how != "network":
            try:
                check_fresh(info, proof, how, redact_url(redis_url))
            except WrongServer:
                compressed.path.unlink(missing_ok=True)
                if compressed.encrypted is not None:
                    compressed.encrypted.path.unlink(missing_ok=True)
                raise
        return compressed, info

    try:
        try:
            compressed, info = attempt(method, save)
        except WrongServer as error:
            if not network_fallback:
                raise
            run_logger().warning("%s; fetching it over the network instead", error)
            method = "network"
            compressed, info = attempt(method, None)
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
    sample: list[dict[str, Any]] | None = None,
) -> Manifest:
    """The manifest of a Redis backup: the stored file plus what it holds, and a keyed
    sample (key, type, value digest; tasks.redis.sample) a restore can check."""
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
            "sample": sample or [],
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
