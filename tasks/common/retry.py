"""Which failures are worth a retry: the network blinked, not the input was wrong."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import redis
from prefect import Task, task
from prefect.cache_policies import NO_CACHE

P = ParamSpec("P")
R = TypeVar("R")

TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    redis.ConnectionError,
    redis.TimeoutError,
)


class TransientError(RuntimeError):
    """A failure that may pass on its own (service restarting, network blip)."""


def is_transient(error: BaseException | None) -> bool:
    """True for errors a retry can fix; wrong input, auth and corruption are not."""
    if error is None:
        return False
    if isinstance(error, redis.AuthenticationError | redis.ResponseError):
        return False
    flagged = getattr(error, "transient", None)  # errors that know, e.g. RedisSyncError
    if isinstance(flagged, bool):
        return flagged
    return isinstance(error, (TransientError, *TRANSIENT_TYPES))


def retrying_task(*delays: float) -> Callable[[Callable[P, R]], Task[P, R]]:
    """A side-effecting task (never cached), retried after each of `delays` seconds
    when it fails transiently; a wrong input fails at once."""
    return task(
        cache_policy=NO_CACHE,
        retries=len(delays),
        retry_delay_seconds=list(delays),
        retry_condition_fn=retry_transient,
    )


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient errors."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - we only classify it
        return is_transient(error)
    return False
