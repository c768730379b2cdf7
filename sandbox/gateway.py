"""A stand-in for the Proxilion MCP Security Gateway, for the sandbox stack.

Stdlib only: it runs with the host's /usr/bin/python3 inside the
``proxilion-gateway`` container, where redis-py is not importable, so it speaks
RESP to Redis over a plain socket.

    GET  /health   {"status":"healthy"}; 503 {"status":"unhealthy","redis":"..."}
    GET  /metrics  Prometheus text format
    POST /analyze  {"session_id": ..., "tool": ..., "args": ...}
                   -> {"decision": "allow", "score": ..., ...}

One line per request goes to stdout, errors go to stderr, so ``docker logs``
holds both streams. Settings come from the environment: MODE, SESSION_STORE,
ALERT_THRESHOLD, BLOCK_THRESHOLD, SESSION_TTL_HOURS, REDIS_HOST, REDIS_PORT,
GATEWAY_HOST, GATEWAY_PORT.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODE = os.environ.get("MODE", "monitor")
SESSION_STORE = os.environ.get("SESSION_STORE", "redis")
ALERT_THRESHOLD = int(os.environ.get("ALERT_THRESHOLD", "50"))
BLOCK_THRESHOLD = int(os.environ.get("BLOCK_THRESHOLD", "70"))
SESSION_TTL_HOURS = float(os.environ.get("SESSION_TTL_HOURS", "24"))
REDIS_HOST = os.environ.get("REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("REDIS_PORT", "6379"))
REDIS_PASSWORD = os.environ.get("REDIS_PASSWORD", "")  # a Redis with requirepass
LISTEN_HOST = os.environ.get("GATEWAY_HOST", "127.0.0.1")
LISTEN_PORT = int(os.environ.get("GATEWAY_PORT", "8787"))
VERSION = "0.1.0-sandbox"
MAX_HISTORY = 100
ALERTS_KEEP = 500

# Risk of a tool, and of words found in its arguments (a toy kill-chain model).
TOOL_RISK: dict[str, int] = {
    "read_file": 10,
    "list_directory": 5,
    "search": 5,
    "http_request": 20,
    "write_file": 25,
    "query_database": 20,
    "send_email": 30,
    "execute_command": 45,
    "shell_exec": 50,
}
ARG_RISK: dict[str, int] = {
    "/etc/passwd": 30,
    "/etc/shadow": 40,
    ".ssh": 35,
    "id_rsa": 40,
    "curl": 15,
    "wget": 15,
    "base64": 15,
    "nc ": 25,
    "rm -rf": 35,
    "token": 15,
    "password": 20,
}


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log_out(message: str) -> None:
    sys.stdout.write(f"{now_iso()} INFO {message}\n")
    sys.stdout.flush()


def log_err(message: str) -> None:
    sys.stderr.write(f"{now_iso()} ERROR {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- RESP


class RedisError(Exception):
    """An error reply from Redis, or a failure to reach it."""


class Resp:
    """A minimal RESP2 client: one connection, one command at a time."""

    def __init__(self, host: str, port: int, timeout: float = 2.0) -> None:
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise RedisError(f"cannot connect to {host}:{port}: {exc}") from exc
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def encode(*args: object) -> bytes:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

    def read_reply(self) -> Any:
        line = self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise RedisError("connection closed by Redis")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self.reader.read(length + 2)
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self.read_reply() for _ in range(count)]
        raise RedisError(f"unexpected reply {line!r}")

    def command(self, *args: object) -> Any:
        try:
            self.sock.sendall(self.encode(*args))
            return self.read_reply()
        except OSError as exc:
            raise RedisError(f"{args[0]} failed: {exc}") from exc

    def pipeline(self, *commands: tuple[object, ...]) -> list[Any]:
        """Send several commands at once; return every reply (errors as exceptions)."""
        try:
            self.sock.sendall(b"".join(self.encode(*cmd) for cmd in commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(self.read_reply())
                except RedisError as exc:
                    replies.append(exc)
            return replies
        except OSError as exc:
            raise RedisError(f"pipeline failed: {exc}") from exc


def redis() -> Resp:
    conn = Resp(REDIS_HOST, REDIS_PORT)
    if REDIS_PASSWORD:
        try:
            conn.command("AUTH", REDIS_PASSWORD)
        except RedisError:
            conn.close()
            raise
    return conn


# ------------------------------------------------------------------------ metrics

LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.sessions_created = 0
        self.decisions: dict[str, int] = {}
        self.alerts = 0
        self.redis_errors = 0
        self.latency_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.started = time.time()

    def request(self, method: str, path: str, status: int) -> None:
        key = (method, path if path in ROUTES else "other", status)
        with self.lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def analysis(self, seconds: float, decision: str, new_session: bool, alert: bool) -> None:
        with self.lock:
            self.latency_sum += seconds
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self.latency_counts[i] += 1
            self.decisions[decision] = self.decisions.get(decision, 0) + 1
            self.sessions_created += int(new_session)
            self.alerts += int(alert)

    def redis_error(self) -> None:
        with self.lock:
            self.redis_errors += 1

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP proxilion_gateway_info Gateway build and mode.",
                "# TYPE proxilion_gateway_info gauge",
                f'proxilion_gateway_info{{version="{VERSION}",mode="{MODE}"}} 1',
                "# HELP proxilion_gateway_start_time_seconds Start time of the gateway.",
                "# TYPE proxilion_gateway_start_time_seconds gauge",
                f"proxilion_gateway_start_time_seconds {self.started:.3f}",
                "# HELP proxilion_http_requests_total HTTP requests handled.",
                "# TYPE proxilion_http_requests_total counter",
            ]
            for (method, path, status), count in sorted(self.requests.items()):
                lines.append(
                    f'proxilion_http_requests_total{{method="{method}",path="{path}",'
                    f'status="{status}"}} {count}'
                )
            lines += [
                "# HELP proxilion_sessions_created_total Sessions seen for the first time.",
                "# TYPE proxilion_sessions_created_total counter",
                f"proxilion_sessions_created_total {self.sessions_created}",
                "# HELP proxilion_decisions_total Verdicts given by /analyze.",
                "# TYPE proxilion_decisions_total counter",
            ]
            for decision, count in sorted(self.decisions.items()):
                lines.append(f'proxilion_decisions_total{{decision="{decision}"}} {count}')
            lines += [
                "# HELP proxilion_alerts_total Calls scored at or above ALERT_THRESHOLD.",
                "# TYPE proxilion_alerts_total counter",
                f"proxilion_alerts_total {self.alerts}",
                "# HELP proxilion_redis_errors_total Failed Redis operations.",
                "# TYPE proxilion_redis_errors_total counter",
                f"proxilion_redis_errors_total {self.redis_errors}",
                "# HELP proxilion_analysis_duration_seconds Time spent analysing a tool call.",
                "# TYPE proxilion_analysis_duration_seconds histogram",
            ]
            for bound, count in zip(LATENCY_BUCKETS, self.latency_counts, strict=True):
                lines.append(f'proxilion_analysis_duration_seconds_bucket{{le="{bound}"}} {count}')
            lines += [
                f'proxilion_analysis_duration_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"proxilion_analysis_duration_seconds_sum {self.latency_sum:.6f}",
                f"proxilion_analysis_duration_seconds_count {self.latency_count}",
            ]
        return "\n".join(lines) + "\n"


METRICS = Metrics()
ROUTES = {"/health", "/metrics", "/analyze"}


# ----------------------------------------------------------------------- analysis


def score_call(tool: str, args: Any, history: list[dict[str, Any]]) -> int:
    score = TOOL_RISK.get(tool, 15)
    text = json.dumps(args).lower()
    score += sum(points for word, points in ARG_RISK.items() if word in text)
    # Kill-chain correlation: reading secrets then reaching out scores higher.
    recent = {entry.get("tool") for entry in history[-10:]}
    if tool in {"http_request", "send_email"} and recent & {"read_file", "query_database"}:
        score += 20
    return min(score, 100)


def analyze(body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    session_id = str(body.get("session_id") or uuid.uuid4())
    tool = body.get("tool")
    if not isinstance(tool, str) or not tool:
        raise ValueError('"tool" must be a non-empty string')
    args = body.get("args", {})
    key = f"session:{session_id}"
    ttl = max(1, int(SESSION_TTL_HOURS * 3600))
    minute = int(time.time() // 60)
    with redis() as conn:
        raw = conn.command("GET", key)
        new_session = raw is None
        session: dict[str, Any] = (
            json.loads(raw)
            if raw
            else {"session_id": session_id, "created_at": now_iso(), "history": []}
        )
        history: list[dict[str, Any]] = session.setdefault("history", [])
        score = score_call(tool, args, history)
        history.append({"ts": now_iso(), "tool": tool, "args": args, "score": score})
        del history[:-MAX_HISTORY]
        session["updated_at"] = now_iso()
        session["calls"] = int(session.get("calls", 0)) + 1
        session["risk_score"] = max(int(session.get("risk_score", 0)), score)
        would_block = score >= BLOCK_THRESHOLD
        decision = "block" if would_block and MODE == "block" else "allow"
        alert = score >= ALERT_THRESHOLD
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        rate_key = f"ratelimit:{session_id}:{minute}"
        commands: list[tuple[object, ...]] = [
            ("SET", key, json.dumps(session, separators=(",", ":")), "EX", ttl),
            ("INCR", rate_key),
            ("EXPIRE", rate_key, 60),
            ("HINCRBY", "stats:daily", f"{day}:calls", 1),
            ("HINCRBY", "stats:daily", f"{day}:{decision}", 1),
            ("ZADD", "killchain:scores", session["risk_score"], session_id),
        ]
        if alert:
            alert_doc = {"ts": now_iso(), "session_id": session_id, "tool": tool, "score": score}
            commands += [
                ("LPUSH", "alerts:recent", json.dumps(alert_doc, separators=(",", ":"))),
                ("LTRIM", "alerts:recent", 0, ALERTS_KEEP - 1),
                ("HINCRBY", "stats:daily", f"{day}:alerts", 1),
            ]
        replies = conn.pipeline(*commands)
        errors = [r for r in replies if isinstance(r, RedisError)]
        if errors:
            raise errors[0]
        calls_this_minute = int(replies[1])
    elapsed = time.perf_counter() - started
    METRICS.analysis(elapsed, decision, new_session, alert)
    return {
        "decision": decision,
        "score": score,
        "would_block": would_block,
        "alert": alert,
        "mode": MODE,
        "session_id": session_id,
        "session_risk": session["risk_score"],
        "calls_this_minute": calls_this_minute,
    }


# ---------------------------------------------------------------------- HTTP side


class Handler(BaseHTTPRequestHandler):
    server_version = f"proxilion-gateway/{VERSION}"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # one line per request is written by finish_request below

    def send_json(self, status: int, payload: dict[str, Any]) -> None:
        self.send_body(status, json.dumps(payload).encode(), "application/json")

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.status_sent = status

    def path_only(self) -> str:
        return self.path.split("?", 1)[0]

    def finish_request(self, started: float) -> None:
        status = getattr(self, "status_sent", 0)
        METRICS.request(self.command, self.path_only(), status)
        log_out(
            f'{self.client_address[0]} "{self.command} {self.path}" {status} '
            f"{(time.perf_counter() - started) * 1000:.1f}ms"
        )

    def do_GET(self) -> None:
        started = time.perf_counter()
        try:
            path = self.path_only()
            if path == "/health":
                self.health()
            elif path == "/metrics":
                body = METRICS.render().encode()
                self.send_body(200, body, "text/plain; version=0.0.4; charset=utf-8")
            else:
                self.send_json(404, {"error": "not found"})
        finally:
            self.finish_request(started)

    do_HEAD = do_GET

    def health(self) -> None:
        try:
            with redis() as conn:
                pong = conn.command("PING")
            if pong != "PONG":
                raise RedisError(f"unexpected PING reply {pong!r}")
        except RedisError as exc:
            METRICS.redis_error()
            log_err(f"health check: redis unreachable: {exc}")
            self.send_json(503, {"status": "unhealthy", "redis": str(exc)})
            return
        self.send_json(
            200,
            {"status": "healthy", "redis": "ok", "mode": MODE, "version": VERSION},
        )

    def do_POST(self) -> None:
        started = time.perf_counter()
        try:
            if self.path_only() != "/analyze":
                self.send_json(404, {"error": "not found"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                if not isinstance(body, dict):
                    raise ValueError("body must be a JSON object")
                verdict = analyze(body)
            except (ValueError, json.JSONDecodeError) as exc:
                log_err(f"analyze: bad request: {exc}")
                self.send_json(400, {"error": f"bad request: {exc}"})
                return
            except RedisError as exc:
                METRICS.redis_error()
                log_err(f"analyze: session store unavailable: {exc}")
                self.send_json(503, {"error": f"session store unavailable: {exc}"})
                return
            self.send_json(200, verdict)
        finally:
            self.finish_request(started)


def main() -> None:
    server = ThreadingHTTPServer((LISTEN_HOST, LISTEN_PORT), Handler)
    server.daemon_threads = True
    log_out(
        f"proxilion gateway {VERSION} listening on {LISTEN_HOST}:{LISTEN_PORT} "
        f"mode={MODE} session_store={SESSION_STORE} redis={REDIS_HOST}:{REDIS_PORT} "
        f"alert_threshold={ALERT_THRESHOLD} block_threshold={BLOCK_THRESHOLD} "
        f"session_ttl_hours={SESSION_TTL_HOURS:g}"
    )
    try:
        with redis() as conn:
            conn.command("PING")
    except RedisError as exc:
        log_err(f"startup: redis not reachable yet: {exc}")
    # PID 1 in a container ignores SIGTERM unless it installs a handler.
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        log_out("shutting down")
    finally:
        server.server_close()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()
