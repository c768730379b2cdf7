"""A run that holds a component lock, as a backup does, in a process of its own.

`python -m tests.lock_holder NAME` runs the flow `hold-lock`: it takes
`exclusive(NAME)` (waiting up to WAIT_SECONDS), prints "holding <flow run name>",
holds the lock until a line arrives on its stdin (or stdin closes), then prints
"finished". A gated holder (GATED set) first prints "ready" once its run has begun and
waits for a line before it asks for the lock: it starts beside another holder, and
asks only once that one holds the lock. Its log goes to the same output.
`HolderProcess` starts one, reads its lines with deadlines, and kills it the way the
kernel's OOM killer does (SIGKILL to that process alone: a temporary Prefect server it
started lives on, unless watched).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WAIT_SECONDS = 120.0
LINE_TIMEOUT = 120.0
GATED = "LOCK_HOLDER_GATED"
# Runs the holder in a mount namespace of its own with a fresh /run/lock: its lock
# files are not this host's, as for a run on another host (needs root).
ELSEWHERE = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    'mount -t tmpfs tmpfs /run/lock && exec "$@"',
    "sh",
]


def unique_lock() -> str:
    return f"test-lock-{uuid.uuid4().hex[:10]}"


def require_unshare() -> None:
    """Fail, saying what is needed, unless a holder can run "elsewhere"."""
    import pytest

    probe = ["unshare", "--mount", "true"]
    if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode:
        pytest.fail(
            "a holder on another host runs in its own mount namespace: run the tests as "
            "root with unshare(1) (util-linux)",
            pytrace=False,
        )


class HolderProcess:
    """A `hold-lock` run in its own process; its output lines arrive in `lines`."""

    def __init__(
        self, name: str, env: dict[str, str], elsewhere: bool = False, gated: bool = False
    ) -> None:
        command = [sys.executable, "-m", "tests.lock_holder", name]
        env = env | {GATED: "1"} if gated else env
        self.output: list[str] = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.process = subprocess.Popen(
            (ELSEWHERE if elsewhere else []) + command,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def expect(self, text: str, timeout: float = LINE_TIMEOUT) -> str:
        """The next output line containing `text`; fails with the output so far when
        none comes within `timeout` or the process ends first."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if text in line:
                return line.strip()
        raise AssertionError(f"no line with {text!r} from the holder; its output:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "".join(self.output[-lines:])

    def run_name(self) -> str:
        """Waits until it holds the lock; its flow run's name."""
        return self.expect("holding ").split()[-1]

    def finish(self) -> None:
        """Tell it to end its run (it gives the lock back first)."""
        self._say("done")

    def take(self) -> None:
        """Let a gated holder, once "ready", ask for the lock."""
        self._say("take")

    def _say(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def kill(self) -> float:
        """SIGKILL the holder alone; time.monotonic() of its death."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        return time.monotonic()

    def close(self) -> None:
        """Stop what is left of it (its process group)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def hold(name: str) -> None:
    from prefect import flow
    from prefect.runtime import flow_run

    import flows  # noqa: F401 - what importing any flow brings
    from tasks.common.locks import exclusive

    @flow(name="hold-lock")
    def hold_lock(name: str) -> None:
        if os.environ.get(GATED):
            print("ready", flush=True)
            sys.stdin.readline()
        with exclusive(name, wait_seconds=WAIT_SECONDS):
            print(f"holding {flow_run.name}", flush=True)
            sys.stdin.readline()

    hold_lock(name)
    print("finished", flush=True)


if __name__ == "__main__":
    hold(sys.argv[1])
