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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import redis
from docker.errors import DockerException

from tasks.common.files import CHUNK
from tasks.common.log import run_logger
from tasks.common.redis_url import parse_redis_url
from tasks.common.retry import retrying_task
from tasks.common.secrets import redact_url
from tasks.docker import containers
from tasks.redis.rdb import RdbInfo, validating
from tasks.redis.save import SaveResult, SaveStarted, save_status, wait_for_save
from tasks.redis.server import ServerFacts, connect, explain
from tasks.redis.sync import fetch_rdb_over_network
from tasks.store.archive import CompressedFile, Compression, Manifest, iter_chunks
from tasks.store.encryption import AgeCopy, staged_writer

FETCH_METHODS = ("auto", "container", "path", "network")
# The kernel stamps file times, and time() (the RDB's `ctime`) reads, a coarse clock up
# to a tick (4-10 ms) behind the server's TIME: a save within a tick of BGSAVE can look
# made before it.
COARSE_CLOCK_SLACK_US = 50_000
# A BGSAVE child writes `temp-<its pid>.rdb` in Redis's dir, then renames it to the RDB.
TEMP_RDB = re.compile(r"temp-\d+\.rdb")
FOLLOW_POLL_SECONDS = 0.01  # at the end of what the fork wrote so far: read again after this
# Compression threads for the replication stream. It arrives at the pace of the fork
# that writes it (one thread; ~90 MB/s on the benchmark's 2-core host, where that fork
# keeps a core busy), several times slower than one isal level-1 thread compresses and
# hashes: gzip is done in the receiving thread, as helper threads only add hand-offs
# that take CPU from the fork (-12 % CPU, -8 % time for 100k keys). zstd -3 on one
# thread is too close to the fork's pace: 2 threads.
NETWORK_COMPRESS_THREADS: dict[Compression, int] = {"gzip": 0, "zstd": 2}


class WrongServer(RuntimeError):
    """A fetch route reaches another Redis, or an RDB older than our save: the
    backup would hold other data than the server it names. Not retried."""


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
    save: SaveResult | None = None  # the save the RDB came from (None: the network's own)
    during_save: bool = False  # copied while the fork wrote it (followed, or streamed)


def rdb_host_path(data_dir: str | None, facts: ServerFacts) -> Path:
    directory = data_dir or facts.rdb_dir
    if not directory:
        raise ValueError("Redis did not tell its `dir` (CONFIG is restricted): set data_dir")
    return Path(directory) / (facts.rdb_filename or "dump.rdb")


Feed = Callable[[bytes | memoryview], None]
Producer = Callable[[Feed], object]


class NotFollowed(RuntimeError):
    """The file followed during the save is not the RDB the save left (another save
    replaced it): nothing proves what was read is ours, so it is read again whole."""


def _our_temp_file(folder: Path, started: SaveStarted) -> IO[bytes] | None:
    """The temp file our save's fork writes (`temp-<pid>.rdb`, written since our
    BGSAVE; while it runs no other save can), opened; None before it appears (or when
    this user may not read it: the RDB is then copied once the save is done)."""
    newest: tuple[int, Path] | None = None
    for path in folder.glob("temp-*.rdb"):
        try:
            written_ns = path.stat().st_mtime_ns
        except OSError:
            continue  # renamed into place meanwhile
        fresh = written_ns // 1000 + COARSE_CLOCK_SLACK_US >= started.started_at_us
        if TEMP_RDB.fullmatch(path.name) and fresh and (newest is None or written_ns > newest[0]):
            newest = (written_ns, path)
    try:
        return open(newest[1], "rb", buffering=0) if newest else None  # noqa: SIM115
    except OSError:
        return None


def follow_save(
    folder: Path, dbfilename: str, started: SaveStarted, feed: Feed
) -> tuple[SaveResult, bool]:
    """Feed the snapshot our save writes into `folder` (Redis's dir, on this host) while
    the fork writes it, in whole chunks, until the save has ended; returns its result
    and whether the file followed is the RDB it left (same inode: then every byte fed
    is that save's output, read to its end). False when the save ended before its file
    was seen."""
    client = connect(started.redis_url)
    result: SaveResult | None = None
    stream = None
    while stream is None and result is None:
        stream = _our_temp_file(folder, started)
        if stream is None and (result := save_status(client, started)) is None:
            time.sleep(FOLLOW_POLL_SECONDS)
    if stream is None:
        assert result is not None
        return result, False
    with stream:
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        filled = 0
        while True:
            if n := stream.readinto(view[filled:]):
                filled += n
                if filled == CHUNK:  # whole chunks: the compressor's blocks stay full
                    feed(view)
                    filled = 0
            elif result is not None:
                break  # the save had ended before this read: nothing more comes
            elif (result := save_status(client, started)) is None:
                time.sleep(FOLLOW_POLL_SECONDS)
        if filled:
            feed(view[:filled])
        ours = os.fstat(stream.fileno())
    try:
        left = os.stat(folder / dbfilename)
    except FileNotFoundError:
        return result, False
    return result, (ours.st_dev, ours.st_ino) == (left.st_dev, left.st_ino)


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


def save_folder(
    method: str, container: str | None, data_dir: str | None, facts: ServerFacts
) -> Path | None:
    """Redis's dir as a folder on this host, where its save can be followed: data_dir
    (path), the container's mount of its `dir` (container); None when there is none."""
    if method == "path":
        return rdb_host_path(data_dir, facts).parent
    if method == "container" and container:
        folder = containers.host_path(container, facts.rdb_dir or "/data")
        return folder if folder is not None and folder.is_dir() else None
    return None


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
    threads: int = 2,
) -> tuple[CompressedFile, RdbInfo]:
    """One pass: validate (header, CRC-64, optionally redis-check-rdb alongside),
    compress (on `threads` threads, 0: in the producer's) and hash the chunks `produce`
    pushes (and age-encrypt the compressed stream as `encrypt` says). The output is
    removed unless everything checks out."""
    writer = staged_writer(staging, compression, encrypt, threads)
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


def _follow_into(
    folder: Path,
    dbfilename: str,
    save: SaveStarted,
    staging: Path,
    compression: Compression,
    deep_check: bool,
    encrypt: AgeCopy | None,
) -> tuple[SaveResult, tuple[CompressedFile, RdbInfo] | None]:
    """`follow_save` through one streaming pass (`pipe_rdb`); the pass is kept only when
    the file followed is the RDB the save left (else None: nothing is staged)."""
    ended: list[tuple[SaveResult, bool]] = []

    def follow(feed: Feed) -> None:
        ended.append(follow_save(folder, dbfilename, save, feed))
        if not ended[0][1]:
            raise NotFollowed(f"the save's file in {folder} was not followed to its end")

    try:
        copied = pipe_rdb(follow, staging, compression, deep_check, encrypt)
    except NotFollowed:
        copied = None
    return ended[0][0], copied


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
    save: SaveStarted | None = None,
    network_fallback: bool = False,
    encrypt: AgeCopy | None = None,
) -> CapturedRdb:
    """Copy the RDB out, validate it, compress and checksum it, in one streaming pass;
    with `encrypt` (the local copy encrypted), the compressed stream is age-encrypted in
    that pass (`captured.file` is then the `.age` file).

    With `save` (started by `start_save`), the copy follows the file the save writes,
    where Redis's dir is on this host (`save_folder`), and ends when the save has; else
    it waits for the save, then copies the RDB. Either way the RDB must be that save's
    (the file it left, its ctime not older): otherwise it is dropped, and refetched over
    the network when `network_fallback` (fetch=auto)."""
    started = time.perf_counter()
    where = redact_url(redis_url)

    def copy_saved(how: str, result: SaveResult | None) -> tuple[CompressedFile, RdbInfo]:
        produce = _source(how, redis_url, container, data_dir, facts, result)
        threads = NETWORK_COMPRESS_THREADS[compression] if how == "network" else 2
        return pipe_rdb(produce, staging, compression, deep_check, encrypt, threads)

    def attempt(how: str) -> tuple[CompressedFile, RdbInfo, SaveResult | None, bool]:
        """The copy by `how`, the save it came from, and whether it followed the save."""
        folder = save_folder(how, container, data_dir, facts) if save is not None else None
        copied = None
        if save is None:
            result = None
        elif folder is None:
            result = wait_for_save(save)
        else:
            dbfilename = facts.rdb_filename or "dump.rdb"
            result, copied = _follow_into(folder, dbfilename, save, staging, compression,
                                          deep_check, encrypt)  # fmt: skip
        compressed, info = copied or copy_saved(how, result)  # not followed: the file it left
        if result is not None:
            try:
                check_fresh(info, result, how, where)
            except WrongServer:
                compressed.path.unlink(missing_ok=True)
                raise
        return compressed, info, result, copied is not None or how == "network"

    try:
        try:
            compressed, info, result, during = attempt(method)
        except WrongServer as error:
            if not network_fallback:
                raise
            run_logger().warning("%s; fetching it over the network instead", error)
            method, result, during = "network", None, True
            compressed, info = copy_saved(method, None)
    except redis.RedisError as error:
        raise explain(error, redis_url) from None
    seconds = round(time.perf_counter() - started, 3)
    run_logger().info(
        "Captured RDB v%s (%d bytes → %d %s) via %s in %.2f s, %s",
        info.rdb_version,
        info.size,
        compressed.size,
        compression,
        method,
        seconds,
        "as Redis wrote it" if during else "after Redis saved it",
    )
    return CapturedRdb(compressed, info, method, seconds, result, during)


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
            **snapshot_keyspace(facts, save),
            "fetch": captured.method,
            "copied_during_save": captured.during_save,
            "sample": sample or [],
        },
        steps={"save": save.seconds if save else 0.0, "capture": captured.seconds},
        source_id=source_id,
    )


def snapshot_keyspace(facts: ServerFacts, save: SaveResult | None) -> dict[str, Any]:
    """The key counts per db the RDB holds, and whether they are exact (`keyspace_exact`:
    why, or "" when not): read with our BGSAVE when the fork came right after that read,
    else the closest read there is (the save was scheduled behind an AOF rewrite, or the
    replication stream made its own snapshot) and a restore proves the count from the
    RDB file itself."""
    if save is not None and save.keyspace_exact:
        return {"keyspace": save.keyspace, "keyspace_exact": save.keyspace_exact}
    return {"keyspace": save.keyspace if save else facts.keyspace, "keyspace_exact": ""}


def describe(manifest: Manifest) -> dict[str, str]:
    """The facts of a Redis backup an operator checks first, for its report."""
    s = manifest.source
    return {
        "Redis version": str(s.get("redis_version", "?")),
        "RDB version": str(s.get("rdb_version", "?")),
        "RDB checksum (CRC-64) verified": "yes" if s.get("rdb_checksum_verified") else "NO",
        "deep check (redis-check-rdb)": str(s.get("deep_check", "not run")),
    }
