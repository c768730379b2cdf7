"""Expected, explained failures read as their reason in a run's Logs tab, not as
Prefect's tracebacks.

An error of ours (a class from `tasks`, `flows` or `deployments`) already says what
failed and what to do; the flow logs that as one ERROR line and ends Failed with it
(flows/support/steps.py). Prefect's run loggers would also print its traceback (a task whose
retries are exhausted, a flow that raised) and, in a deployment's process, log the
same failure again as "Engine execution exited with unexpected exception". For
those errors this filter keeps Prefect's line without the traceback and drops the
repeat. Any other error (a bug, a library's own) keeps its full traceback.
"""

from __future__ import annotations

import logging

OURS = ("tasks", "flows", "deployments")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
ENGINE_EXIT = "Engine execution exited with unexpected exception"


def is_explained(error: BaseException) -> bool:
    """True for an error raised on purpose by this project, with an operator's reason."""
    return type(error).__module__.split(".")[0] in OURS


class ExplainedFailures(logging.Filter):
    """Run-log records of explained errors: no traceback; the engine's repeat dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None or not is_explained(error):
            return True
        if record.msg == ENGINE_EXIT:
            return False
        record.exc_info, record.exc_text = None, None
        return True


def quiet_explained_failures() -> None:
    """Install the filter on Prefect's run loggers of this process (once)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExplainedFailures) for f in logger.filters):
            logger.addFilter(ExplainedFailures())
