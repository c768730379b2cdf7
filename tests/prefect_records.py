"""Everything the session's Prefect server keeps, as text, to prove a secret is not in it.

The reads cover what the server received since the running test module began
(`scan_from`, called by conftest as each module starts): a secret a test makes is its
module's own, and a read of the whole session grew with it, to seconds of CPU per read
late in a run of the suite.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

from prefect import task
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTimestamp,
    TaskRunFilter,
    TaskRunFilterStartTime,
)
from prefect.client.schemas.objects import Log
from prefect.exceptions import ObjectNotFound
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

_scanned_from = [datetime(2000, 1, 1, tzinfo=UTC)]


def scan_from(moment: datetime) -> None:
    """The reads below cover what the server received from `moment` on."""
    _scanned_from[0] = moment


def recent_runs() -> FlowRunFilter:
    """Flow runs created since `scan_from` (a run's expected start is its creation,
    or later when it is scheduled)."""
    expected = FlowRunFilterExpectedStartTime(after_=_scanned_from[0])
    return FlowRunFilter(expected_start_time=expected)


def recent_logs(client: SyncPrefectClient) -> list[Log]:
    written = LogFilterTimestamp(after_=_scanned_from[0])
    return client.read_logs(log_filter=LogFilter(timestamp=written))


@task
def recorder_marker() -> None:
    """A task run sent after the ones a test waits for (wait_for_task_runs)."""


def wait_for_task_runs(timeout: float = 30.0) -> None:
    """Wait until the server has written every task run whose events this process sent:
    its recorder writes them in batches (conftest), in the order they arrived, so once
    a marker task run sent now is written, the earlier ones are too."""
    marker = recorder_marker(return_state=True).state_details.task_run_id
    assert marker is not None
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                run = client.read_task_run(marker)
                if run.state is not None and run.state.is_completed():
                    return
            except ObjectNotFound:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server wrote no task run in {timeout:g} s")
            time.sleep(0.1)


def prefect_records() -> str:
    """Flow runs (names, parameters, state messages), task runs, logs and artifacts since
    `scan_from`, and the global concurrency limits, read through the API."""
    APILogWorker.drain_all(timeout=10)  # logs reach the server in batches: send what is pending
    wait_for_task_runs()
    runs = recent_runs()
    started = TaskRunFilter(start_time=TaskRunFilterStartTime(after_=_scanned_from[0]))
    with get_client(sync_client=True) as client:
        records = [
            *(run.model_dump_json() for run in client.read_flow_runs(flow_run_filter=runs)),
            # a recent run's task runs (one that never started has no start time), and
            # task runs started since, in a flow or outside one
            *(task.model_dump_json() for task in client.read_task_runs(flow_run_filter=runs)),
            *(task.model_dump_json() for task in client.read_task_runs(task_run_filter=started)),
            *(log.model_dump_json() for log in recent_logs(client)),
            *(a.model_dump_json() for a in client.read_artifacts(flow_run_filter=runs)),
            *(
                limit.model_dump_json()
                for limit in client.read_global_concurrency_limits(limit=1000, offset=0)
            ),
        ]
    return "\n".join(records)


def concurrency_limit_names() -> list[str]:
    with get_client(sync_client=True) as client:
        return [limit.name for limit in client.read_global_concurrency_limits(limit=1000, offset=0)]


def log_messages() -> list[str]:
    """Every log message since `scan_from`, after sending the ones still queued here."""
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        return [log.message for log in recent_logs(client)]


def run_logs(run_id: UUID) -> list[Log]:
    """Every log line of a flow run and its task runs, oldest first, as the Logs tab."""
    APILogWorker.drain_all(timeout=10)  # logs reach the server in batches: send the rest
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return sorted(logs, key=lambda log: log.timestamp)


def module_text() -> str:
    """Every log message and artifact since `scan_from` (the module's), as one text."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=recent_runs())
    texts = [str(a.data) + str(a.description) for a in artifacts]
    return "\n".join(log_messages() + texts)


def database_path() -> Path:
    """The SQLite file of the session's Prefect server (the test harness's)."""
    url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    return Path(url.split(":///", 1)[1])


def wait_for_final_events(flow_run_ids: list[UUID], timeout: float = 30.0) -> None:
    """Wait until the server has written each run's final-state event: it persists
    events in batches, after the run ends, and they must be in the scan too."""
    wanted = {f"prefect.flow-run.{run_id}" for run_id in flow_run_ids}
    deadline = time.monotonic() + timeout
    while True:
        with closing(sqlite3.connect(f"file:{database_path()}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT resource_id FROM events WHERE event IN "
                "('prefect.flow-run.Failed', 'prefect.flow-run.Completed', "
                "'prefect.flow-run.Crashed')"
            ).fetchall()
        missing = wanted - {row[0] for row in rows}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no final-state event after {timeout:g} s for {sorted(missing)}")
        time.sleep(0.2)


def database_bytes() -> bytes:
    """Every byte of the server's database files (the file, its write-ahead log): a
    value Prefect ever wrote, to any table, even one since overwritten, is in here."""
    APILogWorker.drain_all(timeout=10)
    wait_for_task_runs()
    path = database_path()
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))
