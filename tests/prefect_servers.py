"""Real Prefect servers: the session's API server, and `prefect server start` (UI
included) for tests that need more than it: a browser, a worker, a PostgreSQL database.

`session_server(home)` runs Prefect's API as its test harness does (uvicorn with
`create_app`, the services of an ephemeral server, no UI), without importing the
server's code into the test process (seconds of CPU per pytest worker).

`running_prefect_server(home)` starts it on a free 127.0.0.1 port (another one when
that port was taken before the server bound it) with its own PREFECT_HOME (SQLite
there unless `database_url` names another database), waits until `/api/health`
answers and stops the whole process group on exit.
`prefect_env(server)` is the environment for processes that talk to it (a worker,
`python -m deployments serve`), `api(server)` points this process's Prefect client at
it, and `restart(server)` stops it and starts it again on the same port and database.
`busy_relay(api_url, busy)` stands in front of a server and answers 503 once to each
request `busy` picks, as a busy SQLite server does.

A new SQLite database costs a server start 10 s of CPU in migrations: once the session's
server is up, `keep_as_template(its database)` copies its database, and
`migrated_database(home)` gives each later server (or a run's temporary server) a copy.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from redis_servers import free_port

from tasks.common.certificates import verified

START_TIMEOUT = 180.0
PORT_ATTEMPTS = 5
PORT_TAKEN = "already in use"  # the CLI's check, or uvicorn's bind error (lower-cased)
PREFECT = str(Path(sys.executable).with_name("prefect"))
DATABASE = "prefect.db"  # a server's SQLite file in its PREFECT_HOME
_template: list[Path] = []  # the migrated database kept by keep_as_template


def keep_as_template(database: Path, folder: Path) -> None:
    """Copy the migrated SQLite `database` (a server is using it) into `folder`, as the
    database later servers of this process start from."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / DATABASE
    with closing(sqlite3.connect(database)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)
    _template[:] = [copy]


def migrated_database(home: Path) -> None:
    """Give PREFECT_HOME `home` a copy of the template, if there is one and `home` has
    no database yet; the server then starts without migrating a new one."""
    home.mkdir(parents=True, exist_ok=True)
    if _template and not (home / DATABASE).exists():
        shutil.copyfile(_template[0], home / DATABASE)


@dataclass
class PrefectServer:
    """A Prefect server process started for a test."""

    url: str  # the UI's address; the API is url + "/api"
    home: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return self.url + "/api"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def prefect_env(server: PrefectServer, **extra: str) -> dict[str, str]:
    """This process's environment pointed at `server` (and `extra` on top)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(server.home),
        PREFECT_API_URL=server.api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
    )
    env.update(extra)
    return env


@contextmanager
def api(server: PrefectServer) -> Iterator[None]:
    """Point this process's Prefect client (get_client, run_deployment) at `server`."""
    with temporary_settings({PREFECT_API_URL: server.api_url}):
        yield


def stop_group(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process group we started (the process and its children), then
    SIGKILL what is left after `timeout`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_healthy(server: PrefectServer, timeout: float = START_TIMEOUT) -> bool:
    """Poll `/api/health` until it answers (True); False when the server exited because
    its port was taken meanwhile; fail with the server's log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            if PORT_TAKEN in server.log_path.read_text(errors="replace").lower():
                return False
            break
        try:
            health = httpx.get(server.api_url + "/health", timeout=2, verify=verified())
            if health.status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"`{' '.join(server.command[:4])}` did not answer on {server.url} within {timeout:.0f} s "
        f"(exit code {server.process.poll()}); its log:\n{server.log_tail()}",
        pytrace=False,
    )


def spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `command` in its own process group, its output appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def server_start(port: int) -> list[str]:
    return [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def api_server(port: int) -> list[str]:
    """Prefect's API alone, as its test harness starts it (SubprocessASGIServer); only
    errors logged (a port taken), no line per request."""
    app = ["--factory", "prefect.server.api.server:create_app", "--lifespan", "on"]
    listen = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "error"]
    return [sys.executable, "-m", "uvicorn", *app, *listen]


def start_server(
    home: Path, env: dict[str, str], command_on: Callable[[int], list[str]]
) -> PrefectServer | None:
    """The server `command_on(port)` starts on a free port, once healthy; None if the
    port was taken before it bound it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = home / "server.log"
    log_path.write_bytes(b"")  # wait_healthy reads this attempt's words only
    env = {**env, "PREFECT_API_URL": url + "/api", "PREFECT_UI_API_URL": url + "/api"}
    command = command_on(port)
    process = spawn(command, env, log_path)
    server = PrefectServer(url, home, log_path, process, command, env)
    try:
        if wait_healthy(server):
            return server
    except BaseException:
        stop_group(process)
        raise
    stop_group(process)
    return None


def on_a_free_port(
    home: Path, env: dict[str, str], command_on: Callable[[int], list[str]]
) -> PrefectServer:
    """start_server, on another port each time the port was taken meanwhile."""
    for _attempt in range(PORT_ATTEMPTS):
        server = start_server(home, env, command_on)
        if server is not None:
            return server
    pytest.fail(f"`{' '.join(command_on(0)[:4])}` found no free port in {PORT_ATTEMPTS} tries")


def sqlite_url(home: Path) -> str:
    """The database URL of the SQLite file a server keeps in `home`."""
    return f"sqlite+aiosqlite:///{home / DATABASE}"


@contextmanager
def session_server(home: Path) -> Iterator[PrefectServer]:
    """Prefect's API server with its SQLite database in `home` (prefect.db), started
    with this process's environment, as the test harness starts it."""
    home.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": sqlite_url(home),
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",  # the services of an ephemeral server
        "PREFECT__SERVER_FINAL": "1",
    }
    server = on_a_free_port(home, env, api_server)
    try:
        yield server
    finally:
        stop_group(server.process)


@contextmanager
def running_prefect_server(
    home: Path, database_url: str | None = None, **settings: str
) -> Iterator[PrefectServer]:
    """`prefect server start` with the UI on a free port (another one if that port was
    taken meanwhile); `settings` are extra PREFECT_* variables for the server (e.g.
    service loop intervals), or replace these defaults (PREFECT_UI_ENABLED="false")."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_UI_ENABLED": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        | settings
    )
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    else:
        migrated_database(home)
    server = on_a_free_port(home, env, server_start)
    try:
        yield server
    finally:
        stop_group(server.process)


def restart(server: PrefectServer) -> None:
    """Stop `server` and start it again on the same port, home and database, as an
    upgrade or `systemctl restart` does; returns once it answers again."""
    stop_group(server.process)
    server.process = spawn(server.command, server.env, server.log_path)
    if not wait_healthy(server):
        pytest.fail(f"the restarted Prefect server found {server.url} taken", pytrace=False)


@dataclass
class BusyRelay:
    url: str  # the API's address through the relay
    answered_busy: list[str] = field(default_factory=list)  # "METHOD /path", in order
    # seconds from each 503 until the same request came again, in order
    asked_again_after: list[float] = field(default_factory=list)

    def longest_wait(self) -> float:
        """The longest time a client took to ask again after a 503 (fails if none did)."""
        assert self.asked_again_after, "the request answered 503 was never sent again"
        return max(self.asked_again_after)


HOP_HEADERS = {"host", "connection", "content-length", "transfer-encoding", "content-encoding"}


@contextmanager
def busy_relay(api_url: str, busy: Callable[[str, str], bool]) -> Iterator[BusyRelay]:
    """A relay to the Prefect API at `api_url` that answers 503 (Prefect's "Service
    Unavailable") to the first request of each method and path `busy(method, path)`
    picks, and passes every other request on. A real SQLite server answers so when a
    write meets another one, which a test cannot time: the 503 is the relay's own."""
    upstream = httpx.URL(api_url)
    origin = f"{upstream.scheme}://{upstream.netloc.decode()}"
    client = httpx.Client(timeout=30)
    relay = BusyRelay("")
    busy_since: dict[str, float] = {}  # requests answered 503 and not asked again yet

    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps the client's connection open

        def relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            asked = f"{self.command} {self.path}"
            if asked in busy_since:
                relay.asked_again_after.append(time.monotonic() - busy_since.pop(asked))
            elif busy(self.command, self.path) and asked not in relay.answered_busy:
                relay.answered_busy.append(asked)
                busy_since[asked] = time.monotonic()
                self.answer(503, {}, b'{"exception_message":"Service Unavailable"}')
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            response = client.request(
                self.command, origin + self.path, content=body, headers=headers
            )
            kept = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
            self.answer(response.status_code, kept, response.content)

        def answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = relay  # noqa: N815 - http.server's names

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    relay.url = f"http://127.0.0.1:{server.server_address[1]}{upstream.path.rstrip('/')}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield relay
    finally:
        server.shutdown()
        server.server_close()
        client.close()
