"""Test-only, loaded by Python at start-up in processes whose PYTHONPATH names this
folder (`python -m deployments serve` and the flow runs it starts): transient failures
are retried at once, as conftest.quick_retries does in the test process."""

from collections.abc import Callable
from typing import Any

import tasks.common.retry as retry

_retrying_task = retry.retrying_task


def _retried_at_once(*delays: float) -> Callable[..., Any]:
    return _retrying_task(*(0.0 for _ in delays))


retry.retrying_task = _retried_at_once
