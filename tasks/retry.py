"""Which failures are worth a retry: the network blinked, not the input was wrong."""

from __future__ import annotations

from typing import Any

import redis

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


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only transient errors."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - we only classify it
        return is_transient(error)
    return False
