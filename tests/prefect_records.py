"""Everything the session's Prefect server keeps, as text, to prove a secret is not in it."""

from __future__ import annotations

from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.logging.handlers import APILogWorker


def prefect_records(hide_parameters_of: set[UUID] = frozenset()) -> str:
    """Flow runs (names, parameters, state messages), task runs, logs, artifacts and
    global concurrency limits, read through the API. The parameters of the runs in
    `hide_parameters_of` are left out: a password passed as a run parameter on purpose
    is stored by Prefect as given (the flow warns about that)."""
    APILogWorker.drain_all(timeout=10)  # logs reach the server in batches: send what is pending
    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs()
        runs = [
            run.model_copy(update={"parameters": {}}) if run.id in hide_parameters_of else run
            for run in flow_runs
        ]
        records = [
            *(run.model_dump_json() for run in runs),
            *(task.model_dump_json() for task in client.read_task_runs()),
            *(log.model_dump_json() for log in client.read_logs()),
            *(artifact.model_dump_json() for artifact in client.read_artifacts()),
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
    """Every log message the server holds, after sending the ones still queued here."""
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs()]


def session_text() -> str:
    """Every log message and artifact of the test session, as one text."""
    with get_client(sync_client=True) as client:
        artifacts = [str(a.data) + str(a.description) for a in client.read_artifacts()]
    return "\n".join(log_messages() + artifacts)
