"""How a flow fails: one line naming the step, the reason and what is safe, in the
Failed state the runs list and run header show; and how runs are named."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from prefect.states import Completed, Failed, State

import tasks
from flows.support.explained import is_explained
from tasks.common.errors import one_line
from tasks.common.log import run_logger

P = ParamSpec("P")
R = TypeVar("R")

NOTHING_STORED = "nothing new was stored; earlier backups are untouched"
TASKS_DIR = Path(tasks.__file__).resolve().parent
# Task functions whose name alone reads poorly in a one-line failure.
STEP_NAMES = {
    "upload_backup": "upload to S3",
    "prune_remote": "retention in S3",
    "prune_local": "local retention",
    "commit_local": "storing the backup locally",
    "resolve_retention": "checking the retention parameters",
    "check_compression": "checking the compression parameter",
    "trigger_save": "Redis save (BGSAVE)",
    "start_save": "Redis save (BGSAVE)",
    "capture_rdb": "Redis save and copy of the RDB",
    "exclusive": "waiting for the lock",
}
# Modules whose frames wrap a step rather than being one (Prefect's retry condition
# re-raises the task's error inside tasks/common/retry.py).
MACHINERY = {TASKS_DIR / "common" / "retry.py"}
_safe: ContextVar[str] = ContextVar("safe", default=NOTHING_STORED)


def mark_safe(what: str) -> None:
    """Say, for a failure from here on, what is safe (`the backup is complete locally
    at …`): the last part of the failed state's message."""
    _safe.set(what)


def run_name(kind: str) -> Callable[[], str]:
    """A `flow_run_name` for the runs list: the kind and the UTC start time."""
    return lambda: f"{kind} {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"


def failed_step(error: BaseException) -> str:
    """The step a failure came from: the outermost function of `tasks/` (any of its
    packages) in its
    traceback (a task or a check the flow called), else the flow's own preparation."""
    frame: TracebackType | None = error.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        path = Path(code.co_filename).resolve()
        if path.is_relative_to(TASKS_DIR) and path not in MACHINERY:
            return STEP_NAMES.get(code.co_name, code.co_name.replace("_", " "))
        frame = frame.tb_next
    return "preparing the run"


def failure_line(error: BaseException, safe: str) -> str:
    """The failed state's message: `<step> failed: <reason>; <what is safe>`. A
    recovery's StepFailed already is that line (`Recovery.failure()`)."""
    if isinstance(error, StepFailed):
        return one_line(error)
    return f"{failed_step(error)} failed: {one_line(error)}; {safe}"


def explains_failure(fn: Callable[P, R]) -> Callable[P, R | State[Any]]:
    """Wrap a flow's body: an error ends the run in a Failed state whose message is one
    line (the runs list and run header show it) instead of Prefect's "Flow run
    encountered an exception: <type>: …", keeping the exception itself as the state's
    data (a direct call still raises it, with its type)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R | State[Any]:
        token = _safe.set(NOTHING_STORED)
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - becomes the run's Failed state
            line = failure_line(error, _safe.get())
            # The Logs tab's reason; a bug's traceback too (flows/support/explained.py)
            run_logger().error("%s", line, exc_info=not is_explained(error))
            return Failed(message=line, data=error)  # same type
        finally:
            _safe.reset(token)

    # Prefect builds the parameter schema and validation from the signature: give it
    # the evaluated types (the flow module's string annotations mean nothing here).
    run.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    return run


def unchanged(message: str, result: dict[str, Any]) -> State[Any]:
    """A Completed state named `Unchanged`, distinguishable in the runs list."""
    return Completed(name="Unchanged", message=message, data=result)


def unavailable(message: str, result: dict[str, Any]) -> State[Any]:
    """A Completed state named `Unavailable`: nothing there to back up (said why)."""
    return Completed(name="Unavailable", message=message, data=result)


class StepFailed(RuntimeError):
    """A recovery step failed; the message names the step and the reason in one line."""
