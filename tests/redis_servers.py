"""Real redis-server processes for tests, plus data seeding and comparison helpers.

`running_redis(work_dir, **config)` starts Debian's `redis-server` on a free
127.0.0.1 port (data and log in `work_dir` unless `dir=` points the data
elsewhere; no save points, no AOF unless configured; a replica's full sync starts at
once, not after Redis's default 5 s wait for more replicas, which a `fetch="network"`
backup would otherwise pay), waits until it answers PING, and stops it on exit. Config
names take dashes or underscores:
``running_redis(tmp_path, repl_diskless_sync="no", dir=restored_dir)``. A port picked
for the server can be taken by another process before the server binds it: the start is
retried on "Address already in use" with fresh ports, also for options given as
`FREE_PORT` (``tls_port=FREE_PORT``; the port used is in ``server.options``).
A missing redis-server FAILS the test (it must not be skipped silently).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sandbox.seed import url_for_db

FREE_PORT = "<a free port>"  # an option value running_redis replaces with a free port
START_TIMEOUT = 20.0
# A start-up PING is not retried by redis-py (3 times, backing off, by default): when
# another process holds the port, the PING reaches it and times out each time.
NO_RETRY = Retry(NoBackoff(), 0)
STOP_TIMEOUT = 20.0


@dataclass
class RedisServer:
    """A redis-server started for a test."""

    port: int
    url: str
    dir: Path
    process: subprocess.Popen[bytes]
    password: str | None = None
    log_path: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)  # as given to redis-server

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server (authenticated if it has a password)."""
        kwargs.setdefault("password", self.password)
        kwargs.setdefault("socket_timeout", 60)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the server (no save points, so nothing is written) and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def require_redis_server() -> str:
    """Return the redis-server path, or fail the test telling what to install."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail(
            "redis-server is not on PATH: these tests need a real Redis; install it "
            "with `apt-get install redis-server` (Debian/Ubuntu), then re-run",
            pytrace=False,
        )
    return exe


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_args(config: dict[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in config.items():
        if isinstance(value, bool):
            value = "yes" if value else "no"
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


@contextmanager
def running_redis(work_dir: Path, **config: Any) -> Iterator[RedisServer]:
    """Start redis-server in `work_dir` (data dir: `dir=` or `work_dir`); yield it once up."""
    exe = require_redis_server()
    work_dir.mkdir(parents=True, exist_ok=True)
    options = {key.replace("_", "-"): value for key, value in config.items()}
    data_dir = Path(options.pop("dir", work_dir))
    data_dir.mkdir(parents=True, exist_ok=True)
    server = None
    for _attempt in range(5):  # retry if another process grabbed the port meanwhile
        ports = {key: free_port() for key, value in options.items() if value == FREE_PORT}
        server = _start(exe, work_dir, data_dir, free_port(), options | ports)
        if server is not None:
            break
    if server is None:
        pytest.fail(f"redis-server would not start in {work_dir}; see redis.log there")
    try:
        yield server
    finally:
        server.stop()


def _start(
    exe: str, work_dir: Path, data_dir: Path, port: int, options: dict[str, Any]
) -> RedisServer | None:
    """Start one server on `port`; None if the port was taken, fail on other errors."""
    log = work_dir / "redis.log"
    log.unlink(missing_ok=True)
    base = {
        "port": port,
        "bind": "127.0.0.1",
        "dir": str(data_dir),
        "save": "",
        "appendonly": "no",
        "repl-diskless-sync-delay": 0,
        "logfile": str(log),
    }
    args = [exe, *_config_args(base | options)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"redis://127.0.0.1:{port}"
    server = RedisServer(port, url, data_dir, process, options.get("requirepass"), log, options)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if "Address already in use" in server.log_tail():
                return None
            stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
            pytest.fail(f"redis-server exited at start: {stderr}\n{server.log_tail()}")
        try:
            if server.client(socket_timeout=1, retry=NO_RETRY).ping():
                return server
        except redis.RedisError:
            time.sleep(0.05)
    server.stop()
    pytest.fail(f"redis-server did not answer PING within {START_TIMEOUT} s\n{server.log_tail()}")


@contextmanager
def start_from_rdb(rdb_path: Path, work_dir: Path, **config: Any) -> Iterator[RedisServer]:
    """A fresh server in `work_dir` that loads a copy of `rdb_path` as its dump.rdb."""
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rdb_path, work_dir / "dump.rdb")
    with running_redis(work_dir, **config) as server:
        yield server


def seed_mixed_data(server: RedisServer, n_keys: int = 3000, seed: int = 7) -> None:
    """Fill db 0 (and a few keys in db 3) with every core type, TTLs and a >1 MiB value."""
    rng = random.Random(seed)
    client = server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(n_keys):
        _seed_one(pipe, rng, i)
        if i % 500 == 499:
            pipe.execute()
    pipe.set("big:string", os.urandom(1_500_000))
    pipe.rpush("big:list", *[f"item-{i}" for i in range(20_000)])
    pipe.hset("big:hash", mapping={f"f{i}": rng.randbytes(200) for i in range(5_000)})
    pipe.execute()
    client.close()
    other = server.client(db=3)
    other.mset({f"db3:{i}": f"v{i}" for i in range(50)})
    other.expire("db3:0", 7200)
    other.close()


def _seed_one(pipe: Any, rng: random.Random, i: int) -> None:
    kind = i % 6
    key = f"k:{kind}:{i}"
    if kind == 0:
        pipe.set(key, rng.randbytes(rng.randint(0, 300)))
    elif kind == 1:
        pipe.hset(key, mapping={f"f{j}": rng.randint(0, 10**9) for j in range(rng.randint(1, 20))})
    elif kind == 2:
        pipe.rpush(key, *[rng.randbytes(8) for _ in range(rng.randint(1, 30))])
    elif kind == 3:
        pipe.sadd(key, *[rng.randint(0, 10**6) for _ in range(rng.randint(1, 40))])
    elif kind == 4:
        pipe.zadd(key, {f"m{j}": rng.random() * 1000 for j in range(rng.randint(1, 30))})
    else:
        for j in range(rng.randint(1, 5)):
            pipe.xadd(key, {"n": j, "payload": rng.randbytes(16)})
    if i % 3 == 0:
        pipe.expire(key, 3600 + i)


Snapshot = dict[tuple[int, bytes], tuple[str, Any, int]]


def keyspace_snapshot(server: RedisServer | str, match: str = "*") -> Snapshot:
    """Every key (matching `match`) of every db as (db, key) -> (type, value, absolute
    expiry ms or -1). A key that vanishes while it is read (expired, deleted by another
    writer) is left out.

    `server` is a started RedisServer or any Redis URL (the sandbox's, say)."""

    def client(db: int) -> redis.Redis:
        if isinstance(server, RedisServer):
            return server.client(db=db)
        return redis.Redis.from_url(url_for_db(server, db), socket_timeout=60)

    snapshot: Snapshot = {}
    for db in client(0).info("keyspace"):
        number = int(db.removeprefix("db"))
        conn = client(number)
        keys = list(conn.scan_iter(match=match, count=1000))
        pipe = conn.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
            pipe.pexpiretime(key)
        meta = pipe.execute()
        found = [
            (key, kind.decode(), expiry)
            for key, kind, expiry in zip(keys, meta[::2], meta[1::2], strict=True)
            if kind != b"none"  # gone since the SCAN
        ]
        for key, kind, _expiry in found:
            _read_value(pipe, key, kind)
        values = pipe.execute()
        for (key, kind, expiry), value in zip(found, values, strict=True):
            snapshot[(number, key)] = (kind, _normalise(kind, value), expiry)
        conn.close()
    return snapshot


def assert_same_keyspace(expected: Snapshot, actual: Snapshot, slack_ms: int = 5000) -> None:
    """Same keys, types, values and expiry times. A key may be missing on one side
    only if it expires within `slack_ms` of now (it lapsed between the two reads)."""
    assert expected, "the source Redis holds no keys: nothing was proved"
    soon = time.time() * 1000 + slack_ms

    def lasting(side: Snapshot, keys: set[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        return [k for k in keys if side[k][2] < 0 or side[k][2] > soon]

    missing = lasting(expected, expected.keys() - actual.keys())
    extra = lasting(actual, actual.keys() - expected.keys())
    assert not missing, f"{len(missing)} keys lost, e.g. {missing[:3]}"
    assert not extra, f"{len(extra)} keys appeared, e.g. {extra[:3]}"
    for key in expected.keys() & actual.keys():
        assert actual[key] == expected[key], f"{key} differs (type, value or expiry)"


def _read_value(pipe: Any, key: bytes, kind: str) -> None:
    readers = {
        "string": lambda: pipe.get(key),
        "hash": lambda: pipe.hgetall(key),
        "list": lambda: pipe.lrange(key, 0, -1),
        "set": lambda: pipe.smembers(key),
        "zset": lambda: pipe.zrange(key, 0, -1, withscores=True),
        "stream": lambda: pipe.xrange(key),
    }
    readers[kind]()


def _normalise(kind: str, value: Any) -> Any:
    if kind == "set":
        return frozenset(value)
    return value
