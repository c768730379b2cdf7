"""The logger for a task body: Prefect's run logger inside a run, a plain one outside
(benchmarks and scripts call task bodies directly)."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

OUTSIDE_A_RUN = "proxilion_dr"  # the logger outside a run


def run_logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(OUTSIDE_A_RUN)
