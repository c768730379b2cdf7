"""No temporary Prefect server left behind by a killed run.

Without PREFECT_API_URL, Prefect 3.9 starts a temporary API server for the run (a
`uvicorn` child process: SubprocessASGIServer in prefect/server/api/server.py) and
stops it with `atexit`, which never runs when the run is killed (SIGKILL, OOM kill):
the server then lives on as an orphan (parent pid 1), one per killed run.
`stop_with_this_process()` wraps the method that starts that process (once Prefect
imports it): each server gets a watcher, a small process that waits until this process
has ended (the write end of a pipe only this process holds is closed by the kernel
then, however it ends) and stops the server.

Run as a script (`python -I temporary_server.py READ_FD PIDFD`) it is that watcher:
standard library only, nothing imported from the project or Prefect.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import select
import signal
import subprocess
import sys
from contextlib import suppress
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

SERVER_MODULE = "prefect.server.api.server"
STOP_SECONDS = 10.0
_write_ends: list[int] = []  # held open until this process ends
_watchers: list[subprocess.Popen[bytes]] = []


def stop_with_this_process() -> None:
    """Give every temporary server this process starts a watcher. Prefect's server
    module takes seconds to import: it is wrapped once Prefect imports it (to start
    such a server), never imported here."""
    if SERVER_MODULE in sys.modules:
        watch_starts(sys.modules[SERVER_MODULE])
    elif not any(isinstance(finder, WrapOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, WrapOnImport())


class WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds Prefect's server module as Python would, and wraps it once executed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> ModuleSpec | None:
        if name != SERVER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            execute = spec.loader.exec_module

            def execute_and_wrap(module: ModuleType) -> None:
                execute(module)
                watch_starts(module)

            spec.loader.exec_module = execute_and_wrap  # type: ignore[method-assign]
        return spec


def watch_starts(server_module: ModuleType) -> None:
    """Wrap the method that starts a temporary server's process (once)."""
    server_class = server_module.SubprocessASGIServer
    start = server_class._run_uvicorn_command
    if getattr(start, "watched", False):
        return

    def start_watched(self: Any) -> subprocess.Popen[Any]:
        server = start(self)
        watch(server.pid)
        return server

    start_watched.watched = True  # type: ignore[attr-defined]
    server_class._run_uvicorn_command = start_watched


def watch(server_pid: int) -> None:
    """Start the watcher that stops `server_pid` once this process has ended. Without
    pidfds (Linux < 5.3) the server is left to Prefect's atexit, as before."""
    try:
        server = os.pidfd_open(server_pid)
    except OSError as error:
        logging.getLogger("proxilion_dr").warning(
            "a killed run will leave its temporary Prefect server running: %s", error
        )
        return
    read_end, write_end = os.pipe()  # neither is inherited by other children
    try:
        _watchers.append(
            subprocess.Popen(
                [sys.executable, "-I", __file__, str(read_end), str(server)],
                pass_fds=(read_end, server),
                start_new_session=True,  # a Ctrl-C in the terminal does not stop it
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    finally:
        os.close(read_end)
        os.close(server)
    _write_ends.append(write_end)


def stop_when_parent_ends(read_end: int, server: int) -> None:
    """The watcher: block until every write end is closed, then stop the server
    (SIGTERM, SIGKILL after STOP_SECONDS). It is already gone after a normal exit."""
    while os.read(read_end, 1):
        pass
    try:
        signal.pidfd_send_signal(server, signal.SIGTERM)
    except ProcessLookupError:
        return
    poller = select.poll()
    poller.register(server, select.POLLIN)  # readable once the process has exited
    if not poller.poll(int(STOP_SECONDS * 1000)):
        with suppress(ProcessLookupError):
            signal.pidfd_send_signal(server, signal.SIGKILL)


if __name__ == "__main__":
    stop_when_parent_ends(int(sys.argv[1]), int(sys.argv[2]))
