"""Fetch an RDB snapshot over the network, the way ``redis-cli --rdb`` does.

This backs up a Redis whose disk we cannot reach: the server is asked for a
full resync as if we were a replica (``REPLCONF rdb-only 1`` + ``SYNC``) and
the RDB it streams is written to a local file. With ``REPLCONF capa eof`` a
server configured for diskless sync streams it straight from memory. redis-py cannot parse that
stream, so this speaks the protocol on a raw socket:

- while the server prepares the RDB it sends keep-alive ``\\n`` lines;
- then either ``$<len>\\r\\n`` and exactly len bytes (disk-based sync), or
  ``$EOF:<40-byte mark>\\r\\n`` and bytes ending with that mark (diskless sync);
- or an error line (``-NOAUTH``, ``-NOPERM``, ...).

The file appears at `dest_path` only once complete and fsynced; on any failure
no partial file is left behind. Without a `dest_path` nothing is written: the
caller's `on_chunk` takes the stream (to validate and compress it as it arrives).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["RedisSyncError", "fetch_rdb_over_network"]

CHUNK_SIZE = 1 << 20
EOF_MARK_LEN = 40
_LINE_READ = 1 << 16
_MAX_LINE = 1 << 16
_ACL_HINT = (
    "grant the ACL user replication rights, e.g. "
    "ACL SETUSER <user> +sync +psync +replconf (and persist it)"
)

_CLOSED_HINT = "; if the port only accepts TLS, pass tls=True; otherwise see the server's log"

ChunkCallback = Callable[[memoryview], None]


class RedisSyncError(RuntimeError):
    """Fetching the RDB failed; `transient` tells whether a retry may help."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def fetch_rdb_over_network(
    host: str,
    port: int,
    dest_path: str | Path | None,
    *,
    username: str | None = None,
    password: str | None = None,
    db_timeout_seconds: float = 600,
    tls: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    io_timeout_seconds: float = 60,
    connect_timeout_seconds: float = 10,
    on_chunk: ChunkCallback | None = None,
    unix_socket: str | None = None,
) -> int:
    """Stream the server's RDB into `dest_path` (or only to `on_chunk` when it is
    None); return the number of bytes received.

    `db_timeout_seconds` bounds the wait for the server to start sending (it
    runs a BGSAVE first); during the transfer each read may take at most
    `io_timeout_seconds`, so a stalled stream fails but a long one does not.
    `on_chunk` sees every chunk written (e.g. to validate or compress in the
    same pass); the view is only valid during the call, and an exception it
    raises aborts the fetch unchanged. `ssl_context` (implies TLS) carries a
    custom CA or client certificate. `unix_socket` (a path) connects there
    instead of `host`:`port`. Failures raise RedisSyncError (its
    `transient` says whether a retry may help); no partial file is left.
    """
    conn = _Connection(host, port, password, io_timeout_seconds, unix_socket)
    output = _atomic_output(Path(dest_path)) if dest_path is not None else _no_output()
    with output as out:
        conn.open(connect_timeout_seconds, tls or ssl_context is not None, ssl_context)
        try:
            _handshake(conn, username, password)
            conn.send_command(b"SYNC")
            header = _await_payload_header(conn, time.monotonic() + db_timeout_seconds)
            sink = _Sink(out, on_chunk)
            if isinstance(header, int):
                _copy_exact(conn, header, sink)
            else:
                _copy_until_mark(conn, header, sink)
        finally:
            conn.close()
        return sink.written


class _Sink:
    """Writes chunks to the output file and hands them to the callback."""

    def __init__(self, out: BinaryIO | None, on_chunk: ChunkCallback | None) -> None:
        self.out = out
        self.on_chunk = on_chunk
        self.written = 0

    def __call__(self, view: memoryview) -> None:
        if not view.nbytes:
            return
        if self.out is not None:
            self.out.write(view)
        self.written += view.nbytes
        if self.on_chunk is not None:
            self.on_chunk(view)


@contextlib.contextmanager
def _no_output() -> Iterator[None]:
    """No file: the chunks go to the callback only."""
    yield None


@contextlib.contextmanager
def _atomic_output(dest: Path) -> Iterator[BinaryIO]:
    """Yield a temp file beside `dest`; fsync and rename it into place on success."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def fsync_dir(directory: Path) -> None:
    """Make the rename durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Connection:
    """A socket speaking just enough RESP for AUTH/REPLCONF/SYNC, with error mapping."""

    def __init__(
        self,
        host: str,
        port: int,
        password: str | None,
        io_timeout: float,
        unix_socket: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.unix_socket = unix_socket
        self.where = f"Redis at {unix_socket or f'{host}:{port}'}"
        self.password = password
        self.io_timeout = io_timeout
        self.pending = bytearray()  # bytes received beyond the last parsed line
        self.received = 0  # payload bytes received (for messages)
        self.expected: int | None = None  # announced payload length, if any
        self.sock: socket.socket | None = None

    def open(self, timeout: float, tls: bool, context: ssl.SSLContext | None) -> None:
        """Connect (and TLS-handshake) or raise RedisSyncError."""
        try:
            sock = self._connect(timeout)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise self.error(
                "connection refused; is Redis running and listening on that address "
                "and port (bind, port, firewall)?",
                transient=True,
            ) from exc
        except socket.gaierror as exc:
            raise self.error(f"cannot resolve host name: {exc}", transient=True) from exc
        except TimeoutError as exc:
            raise self.error(
                f"timed out connecting after {timeout:g} s; is the host reachable?",
                transient=True,
            ) from exc
        except OSError as exc:
            raise self.error(f"cannot connect: {exc}", transient=True) from exc
        self.sock = self._wrap_tls(sock, context) if tls else sock

    def _connect(self, timeout: float) -> socket.socket:
        if self.unix_socket is None:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.unix_socket)
        except OSError:
            sock.close()
            raise
        return sock

    def _wrap_tls(self, sock: socket.socket, context: ssl.SSLContext | None) -> socket.socket:
        context = context or ssl.create_default_context()
        try:
            return context.wrap_socket(sock, server_hostname=self.host)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise self.error(
                f"TLS handshake failed: {exc}; check that the server speaks TLS on this port "
                "and that its certificate is trusted (pass ssl_context with the CA)",
                transient=False,
            ) from exc

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None

    def error(self, problem: str, *, transient: bool) -> RedisSyncError:
        """Build an error about this server, never showing the password."""
        message = f"{self.where}: {problem}"
        if self.password:
            message = message.replace(self.password, "***")
        return RedisSyncError(message, transient=transient)

    def send_command(self, *args: bytes) -> None:
        """Send one command as a RESP array."""
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        try:
            self._socket().sendall(b"".join(parts))
        except OSError as exc:
            raise self.error(
                f"connection lost while sending a command: {exc}", transient=True
            ) from exc

    def read_line(self, deadline: float, what: str) -> bytes:
        """Return the next line without its line ending (a keep-alive gives b"")."""
        while True:
            end = self.pending.find(b"\n")
            if end >= 0:
                line = bytes(self.pending[:end]).rstrip(b"\r")
                del self.pending[: end + 1]
                return line
            if len(self.pending) > _MAX_LINE:
                raise self.error(
                    "sent an over-long reply line; is this a Redis server?", transient=False
                )
            self.pending += self._recv_some(deadline, what)

    def _recv_some(self, deadline: float, what: str) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self.error(what, transient=True)
        sock = self._socket()
        sock.settimeout(min(self.io_timeout, remaining))
        try:
            data = sock.recv(_LINE_READ)
        except TimeoutError as exc:
            raise self.error(what, transient=True) from exc
        except OSError as exc:
            raise self.error(
                f"the connection broke before a reply ({exc}){_CLOSED_HINT}", transient=True
            ) from exc
        if not data:
            raise self.error(
                f"the server closed the connection before replying{_CLOSED_HINT}", transient=True
            )
        return data

    def recv_payload(self, view: memoryview) -> int:
        """Receive payload bytes into `view`; raise if the stream stops early."""
        sock = self._socket()
        sock.settimeout(self.io_timeout)
        try:
            n = sock.recv_into(view)
        except TimeoutError as exc:
            raise self.error(
                f"the RDB transfer stalled: no data for {self.io_timeout:g} s after "
                f"{self.received} bytes; check the network and the server, then retry",
                transient=True,
            ) from exc
        except OSError as exc:
            raise self.cut_off(f" ({exc})") from exc
        if n == 0:
            raise self.cut_off()
        self.received += n
        return n

    def cut_off(self, detail: str = "") -> RedisSyncError:
        """Error for a stream that ended before the RDB was complete."""
        of = f" of the announced {self.expected}" if self.expected is not None else ""
        return self.error(
            f"the RDB stream was cut off after {self.received}{of} bytes{detail}: "
            "Redis restarted or dropped the replica connection (see its log; a slow "
            "transfer can exceed client-output-buffer-limit replica); retry",
            transient=True,
        )

    def take_pending(self) -> bytes:
        """Return and clear bytes already received past the last line."""
        data = bytes(self.pending)
        self.pending.clear()
        return data

    def _socket(self) -> socket.socket:
        assert self.sock is not None, "connection not open"
        return self.sock


def _handshake(conn: _Connection, username: str | None, password: str | None) -> None:
    """AUTH when credentials are given (as redis-py does), then ask for an RDB-only transfer."""
    deadline = time.monotonic() + conn.io_timeout
    if username or password:
        secret = (password or "").encode()
        args = [b"AUTH", username.encode(), secret] if username else [b"AUTH", secret]
        conn.send_command(*args)
        reply = conn.read_line(deadline, "no reply to AUTH")
        if not reply.startswith(b"+"):
            raise _auth_error(conn, reply, username)
    # Like redis-cli: "capa eof" lets a diskless-sync server stream without touching
    # its disk; "rdb-only" (7.0+) makes it send just the RDB and then hang up.
    # Servers that do not know an option answer -ERR: go on without it.
    for option, value in ((b"capa", b"eof"), (b"rdb-only", b"1")):
        conn.send_command(b"REPLCONF", option, value)
        reply = conn.read_line(deadline, "no reply to REPLCONF")
        if reply.startswith(b"-"):
            _check_permission(conn, reply, username, "REPLCONF")


def _auth_error(conn: _Connection, reply: bytes, username: str | None) -> RedisSyncError:
    text = _decode(reply)
    who = f"user '{username}'" if username else "the default user"
    if "without any password configured" in text:
        return conn.error(
            "a password was given but the server has none configured for the default user; "
            "fix the configured credentials (or set requirepass on the server)",
            transient=False,
        )
    if text.startswith(("-WRONGPASS", "-ERR invalid password", "-ERR invalid username")):
        return conn.error(
            f"authentication as {who} failed: wrong username or password, or the user "
            "is disabled; check the credentials",
            transient=False,
        )
    return conn.error(f"AUTH failed: {text}", transient=False)


def _check_permission(conn: _Connection, reply: bytes, username: str | None, cmd: str) -> None:
    """Raise for auth/ACL errors; return for other (ignorable) errors."""
    text = _decode(reply)
    if text.startswith("-NOAUTH"):
        raise conn.error(
            "authentication required: pass the password (and the username for an ACL user)",
            transient=False,
        )
    if text.startswith("-NOPERM"):
        who = f"user '{username}'" if username else "the default user"
        raise conn.error(
            f"{who} is not allowed to run {cmd} ({text[1:]}); {_ACL_HINT}",
            transient=False,
        )


def _await_payload_header(conn: _Connection, deadline: float) -> int | bytes:
    """Skip keep-alives until the bulk header; return the length, or the EOF mark."""
    what = (
        "the server did not start sending the RDB in time (db_timeout_seconds); a large "
        "dataset or a slow disk makes the BGSAVE take longer: raise the timeout"
    )
    line = b""
    while not line:
        line = conn.read_line(deadline, what)
    if line.startswith(b"-"):
        _check_permission(conn, line, None, "SYNC")
        text = _decode(line)
        transient = text.startswith(("-LOADING", "-MASTERDOWN", "-BUSY")) or "master" in text
        raise conn.error(f"refused SYNC: {text[1:]}", transient=transient)
    if line.startswith(b"$EOF:") and len(line) >= 5 + EOF_MARK_LEN:
        return line[5 : 5 + EOF_MARK_LEN]
    if line.startswith(b"$") and line[1:].isdigit():
        return int(line[1:])
    raise conn.error(f"unexpected reply to SYNC: {_decode(line)[:80]!r}", transient=False)


def _copy_exact(conn: _Connection, length: int, sink: _Sink) -> None:
    """Disk-based sync: pass exactly `length` bytes to `sink` in CHUNK_SIZE pieces."""
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    first = conn.take_pending()[:length]
    fill = len(first)
    buf[:fill] = first
    conn.received, conn.expected = fill, length
    remaining = length - fill
    while remaining or fill:
        while remaining and fill < CHUNK_SIZE:
            n = conn.recv_payload(view[fill : fill + min(CHUNK_SIZE - fill, remaining)])
            fill += n
            remaining -= n
        sink(view[:fill])
        fill = 0


def _copy_until_mark(conn: _Connection, mark: bytes, sink: _Sink) -> None:
    """Diskless sync: pass bytes to `sink` until the stream ends with `mark`.

    The last EOF_MARK_LEN bytes are always held back in front of the receive
    area, so only they are compared after each read and the mark never
    reaches the sink.
    """
    buf = bytearray(EOF_MARK_LEN + CHUNK_SIZE)
    view = memoryview(buf)
    first = conn.take_pending()
    start = end = EOF_MARK_LEN
    buf[end : end + len(first)] = first
    end += len(first)
    conn.received = len(first)
    while True:
        if end - start >= EOF_MARK_LEN and view[end - EOF_MARK_LEN : end] == mark:
            sink(view[start : end - EOF_MARK_LEN])
            return
        if end == len(buf):
            sink(view[start : end - EOF_MARK_LEN])
            buf[:EOF_MARK_LEN] = view[end - EOF_MARK_LEN : end]
            start, end = 0, EOF_MARK_LEN
        end += conn.recv_payload(view[end:])


def _decode(reply: bytes) -> str:
    return reply.decode("utf-8", "replace")
