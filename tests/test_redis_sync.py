"""Fetching an RDB over the replication protocol, from real redis-server processes.

A few protocol corner cases (mark split across reads, stalls, cut-offs) are
played by a tiny scripted fake server, where a real one cannot be steered.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis_servers import (
    FREE_PORT,
    RedisServer,
    free_port,
    keyspace_snapshot,
    running_redis,
    seed_mixed_data,
    start_from_rdb,
)

from tasks.redis.rdb import RdbChecker, validate_rdb_file
from tasks.redis.sync import RedisSyncError, fetch_rdb_over_network

PASSWORD = "s3cr3t-Pa55word!"  # noqa: S105 - test-only credential


def fetch(server: RedisServer, dest: Path, **kwargs: object) -> int:
    return fetch_rdb_over_network("127.0.0.1", server.port, dest, **kwargs)  # type: ignore[arg-type]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    ("diskless", "target"), [("no", "target: disk"), ("yes", "target: replicas sockets")]
)
def test_fetched_rdb_restores_every_key(diskless: str, target: str, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "dump.rdb"
    dest.parent.mkdir()
    config = {"repl-diskless-sync": diskless, "repl-diskless-sync-delay": 0}
    with running_redis(tmp_path / "src", **config) as source:
        seed_mixed_data(source)
        expected = keyspace_snapshot(source)
        checker, digest = RdbChecker(), hashlib.sha256()

        def on_chunk(view: memoryview) -> None:
            checker.update(view)
            digest.update(view)

        written = fetch(source, dest, on_chunk=on_chunk)
        assert target in source.log_tail(50)  # the protocol path we meant to exercise
    assert written == dest.stat().st_size
    assert digest.hexdigest() == hashlib.sha256(dest.read_bytes()).hexdigest()
    assert checker.finish() == validate_rdb_file(dest, deep=False)
    info = validate_rdb_file(dest)
    assert info.rdb_version == 10 and info.checksum_verified
    assert info.deep_check == "passed: redis-check-rdb"
    assert leftovers(dest.parent) == ["dump.rdb"]
    with start_from_rdb(dest, tmp_path / "restored") as restored:
        got = keyspace_snapshot(restored)
    assert len(expected) > 3000 and any(v[2] > 0 for v in expected.values())
    assert got.keys() == expected.keys()
    diff = [key for key in expected if got[key] != expected[key]]
    assert not diff, f"{len(diff)} keys differ, e.g. {diff[:3]}"
    assert len(got[(0, b"big:string")][1]) > 1 << 20


def test_password_and_acl_user(tmp_path: Path) -> None:
    config = {"requirepass": PASSWORD, "repl-diskless-sync-delay": 0}
    with running_redis(tmp_path / "src", **config) as source:
        source.client().set("k", "v")
        client = source.client()
        client.acl_setuser(
            "reader", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], commands=["+@read"]
        )
        client.acl_setuser(
            "backup",
            enabled=True,
            passwords=[f"+{PASSWORD}"],
            commands=["+sync", "+psync", "+replconf"],
        )
        assert fetch(source, tmp_path / "a.rdb", password=PASSWORD) > 0
        assert fetch(source, tmp_path / "b.rdb", username="backup", password=PASSWORD) > 0
        assert validate_rdb_file(tmp_path / "b.rdb").checksum_verified

        with pytest.raises(RedisSyncError) as wrong:
            fetch(source, tmp_path / "c.rdb", password=PASSWORD + "-wrong")
        with pytest.raises(RedisSyncError) as missing:
            fetch(source, tmp_path / "c.rdb")
        with pytest.raises(RedisSyncError) as noperm:
            fetch(source, tmp_path / "c.rdb", username="reader", password=PASSWORD)
    assert "wrong username or password" in str(wrong.value)
    assert PASSWORD not in str(wrong.value) and not wrong.value.transient
    assert "authentication required: pass the password" in str(missing.value)
    assert "user 'reader' is not allowed" in str(noperm.value)
    assert "+sync +psync +replconf" in str(noperm.value)
    assert not (tmp_path / "c.rdb").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_password_for_a_server_without_one(tmp_path: Path) -> None:
    with running_redis(tmp_path / "src") as source, pytest.raises(RedisSyncError) as err:
        fetch(source, tmp_path / "x.rdb", password=PASSWORD)
    assert "server has none configured" in str(err.value)
    assert PASSWORD not in str(err.value)


def test_unreachable_port(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(RedisSyncError, match=f"127.0.0.1:{port}: connection refused") as err:
        fetch_rdb_over_network("127.0.0.1", port, tmp_path / "x.rdb")
    assert err.value.transient
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("diskless", ["no", "yes"])
def test_server_killed_mid_transfer_leaves_no_file(diskless: str, tmp_path: Path) -> None:
    dest = tmp_path / "out" / "dump.rdb"
    dest.parent.mkdir()
    config = {"repl-diskless-sync": diskless, "repl-diskless-sync-delay": 0}
    with running_redis(tmp_path / "src", **config) as source:
        client = source.client()
        pipe = client.pipeline(transaction=False)
        for i in range(200):  # ~200 MB that RDB compression cannot shrink
            pipe.set(f"blob:{i}", os.urandom(1 << 20))
        pipe.execute()
        chunks: list[int] = []

        def kill_after_first(view: memoryview) -> None:
            chunks.append(view.nbytes)
            if len(chunks) == 1:
                source.process.kill()

        with pytest.raises(RedisSyncError) as err:
            fetch(source, dest, on_chunk=kill_after_first, io_timeout_seconds=10)
    message = str(err.value)
    assert "cut off after" in message, message
    if diskless == "no":
        assert "of the announced" in message
    assert err.value.transient
    assert sum(chunks) < 200 << 20
    assert leftovers(dest.parent) == []


def test_tls(tmp_path: Path) -> None:
    import ssl

    ca, cert, key = make_certificates(tmp_path / "tls")
    tls_config = {
        "tls-port": FREE_PORT,
        "tls-cert-file": cert,
        "tls-key-file": key,
        "tls-ca-cert-file": ca,
        "tls-auth-clients": "no",
        "tls-replication": "yes",
        "repl-diskless-sync-delay": 0,
    }
    with running_redis(tmp_path / "src", **tls_config) as source:
        source.client().set("over", "tls")
        tls_port = source.options["tls-port"]
        context = ssl.create_default_context(cafile=str(ca))
        dest = tmp_path / "tls.rdb"
        fetch_rdb_over_network("127.0.0.1", tls_port, dest, ssl_context=context)
        assert validate_rdb_file(dest).checksum_verified
        with pytest.raises(RedisSyncError, match="pass tls=True"):
            fetch_rdb_over_network(
                "127.0.0.1", tls_port, tmp_path / "plain.rdb", io_timeout_seconds=5
            )
        with pytest.raises(RedisSyncError, match="TLS handshake failed"):
            fetch_rdb_over_network("127.0.0.1", tls_port, tmp_path / "untrusted.rdb", tls=True)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    directory.mkdir()
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            ca_key,
            "-out",
            ca,
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            key,
            "-out",
            csr,
        ],
        [
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            ext,
            "-out",
            cert,
        ],
    ):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


# --- scripted fake server for protocol corner cases -------------------------------

Script = Callable[[socket.socket], None]
MARK = b"0123456789abcdef0123456789abcdef01234567"


def _read_command(conn: socket.socket, pending: bytearray) -> list[bytes] | None:
    """Read one RESP array command; None when the client hung up."""
    while True:
        parsed = _parse_command(pending)
        if parsed is not None:
            return parsed
        data = conn.recv(65536)
        if not data:
            return None
        pending += data


def _parse_command(pending: bytearray) -> list[bytes] | None:
    lines = bytes(pending).split(b"\r\n")
    if len(lines) < 2 or not lines[0].startswith(b"*"):
        return None
    count = int(lines[0][1:])
    if len(lines) < 2 * count + 2:
        return None
    args = lines[2 : 2 * count + 1 : 2]
    consumed = sum(len(line) + 2 for line in lines[: 2 * count + 1])
    del pending[:consumed]
    return args


@pytest.fixture
def fake_redis() -> Iterator[Callable[..., int]]:
    """Start a one-connection fake Redis that runs `script` after SYNC; returns its port."""
    servers: list[tuple[socket.socket, threading.Thread]] = []

    def start(script: Script, replconf_reply: bytes = b"+OK\r\n") -> int:
        listener = socket.create_server(("127.0.0.1", 0))

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                pending = bytearray()
                while (command := _read_command(conn, pending)) is not None:
                    if command[0].upper() == b"SYNC":
                        with contextlib.suppress(OSError):  # the client may hang up first
                            script(conn)
                        return
                    conn.sendall(replconf_reply if command[0] == b"REPLCONF" else b"+OK\r\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        servers.append((listener, thread))
        return listener.getsockname()[1]

    yield start
    for listener, thread in servers:
        listener.close()
        thread.join(timeout=10)


def hold(conn: socket.socket, seconds: float = 5) -> None:
    """Keep the connection open until the client hangs up (at most `seconds`)."""
    conn.settimeout(seconds)
    conn.recv(1)


def send_slowly(conn: socket.socket, *pieces: bytes) -> None:
    for piece in pieces:
        conn.sendall(piece)
        time.sleep(0.05)


def test_eof_mark_split_across_reads_and_connection_left_open(
    fake_redis: Callable[..., int], tmp_path: Path
) -> None:
    payload = os.urandom(3 << 20) + MARK[:7]  # a near-miss of the mark inside the data

    def script(conn: socket.socket) -> None:
        send_slowly(
            conn,
            b"\n",
            b"\n",
            b"$EOF:" + MARK + b"\r\n" + payload[:1000],
            payload[1000:],
            MARK[:13],
            MARK[13:],
        )
        hold(conn, 60)  # open far past the client's 2 s read timeout

    port = fake_redis(script, replconf_reply=b"-ERR Unrecognized REPLCONF option: rdb-only\r\n")
    # The mark alone must end the read: a client waiting for more would fail as stalled.
    # (How fast the mark ends a real transfer is measured in bench/redis_backup.py.)
    written = fetch_rdb_over_network("127.0.0.1", port, tmp_path / "x.rdb", io_timeout_seconds=2)
    assert written == len(payload)
    assert (tmp_path / "x.rdb").read_bytes() == payload


def test_length_prefixed_payload_arriving_with_the_header(
    fake_redis: Callable[..., int], tmp_path: Path
) -> None:
    payload = os.urandom(5000)

    def script(conn: socket.socket) -> None:
        conn.sendall(b"\n$5000\r\n" + payload + b"*1\r\n$4\r\nPING\r\n")  # stream follows
        hold(conn)

    port = fake_redis(script)
    assert fetch_rdb_over_network("127.0.0.1", port, tmp_path / "x.rdb") == 5000
    assert (tmp_path / "x.rdb").read_bytes() == payload


def test_keepalives_forever_hit_the_deadline(
    fake_redis: Callable[..., int], tmp_path: Path
) -> None:
    def script(conn: socket.socket) -> None:
        for _ in range(30):
            send_slowly(conn, b"\n")

    port = fake_redis(script)
    with pytest.raises(RedisSyncError, match="did not start sending the RDB in time") as err:
        fetch_rdb_over_network("127.0.0.1", port, tmp_path / "x.rdb", db_timeout_seconds=0.5)
    assert err.value.transient
    assert leftovers(tmp_path) == []


def test_stalled_transfer_times_out(fake_redis: Callable[..., int], tmp_path: Path) -> None:
    def script(conn: socket.socket) -> None:
        conn.sendall(b"$100\r\n" + bytes(10))
        hold(conn)

    port = fake_redis(script)
    with pytest.raises(RedisSyncError, match="stalled: no data for 0.5 s after 10 bytes"):
        fetch_rdb_over_network("127.0.0.1", port, tmp_path / "x.rdb", io_timeout_seconds=0.5)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"$100\r\n" + bytes(10), "cut off after 10 of the announced 100 bytes"),
        (b"$EOF:" + MARK + b"\r\n" + bytes(10), "cut off after 10 bytes"),
        (b"\n-ERR Can't SYNC while not connected with my master\r\n", "refused SYNC: ERR Can't"),
        (b"+FULLRESYNC abc 0\r\n", "unexpected reply to SYNC"),
    ],
)
def test_bad_streams(
    reply: bytes, message: str, fake_redis: Callable[..., int], tmp_path: Path
) -> None:
    port = fake_redis(lambda conn: conn.sendall(reply))
    with pytest.raises(RedisSyncError, match=message):
        fetch_rdb_over_network("127.0.0.1", port, tmp_path / "x.rdb")
    assert leftovers(tmp_path) == []


def test_without_a_destination_the_stream_only_reaches_the_callback(tmp_path: Path) -> None:
    """What fetch=network uses: validate and compress as bytes arrive, no file at all."""
    work = tmp_path / "cwd"
    work.mkdir()
    with running_redis(tmp_path / "src", repl_diskless_sync="no") as source:
        seed_mixed_data(source, n_keys=500)
        checker = RdbChecker()
        received = fetch_rdb_over_network(
            "127.0.0.1", source.port, None, on_chunk=lambda view: checker.update(view)
        )
    assert received == checker.finish().size > 0
    assert leftovers(work) == [] and leftovers(tmp_path) == ["cwd", "src"]
