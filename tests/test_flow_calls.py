"""A direct call of a flow (the shell, scripts, tests, the benchmarks) returns as its run
ends: Prefect 3.9's heartbeat thread, which held every call until the next whole second
after the flow began, is not started (flows/support/parameters.py), unless
PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set. Every log line still reaches the server.
"""

from __future__ import annotations

from typing import Any

from prefect.settings import (
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_LOGGING_LEVEL,
    get_current_settings,
    temporary_settings,
)
from prefect_records import run_logs

from flows.support.parameters import dr_flow


@dr_flow(name="direct-call-stand-in", log_prints=True)
def stand_in() -> int | None:
    """The heartbeat interval the run sees (None: no heartbeat thread)."""
    print("the stand-in's own line")
    return get_current_settings().flows.heartbeat_frequency


@dr_flow(name="settings-stand-in")
def log_level_seen() -> str:
    return get_current_settings().logging.level


def test_a_direct_call_runs_without_a_heartbeat_thread_and_keeps_every_log_line() -> None:
    state: Any = stand_in(return_state=True)
    assert state.result() is None  # no heartbeat thread for the engine to join
    messages = [log.message for log in run_logs(state.state_details.flow_run_id)]
    assert "the stand-in's own line" in messages
    assert any(m.startswith("Finished in state Completed") for m in messages), messages


def test_a_heartbeat_interval_set_on_purpose_is_kept() -> None:
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 60}):
        assert stand_in() == 60


def test_each_call_runs_with_the_settings_of_its_caller() -> None:
    """The settings without heartbeats are derived once per settings object (flows/
    support/parameters.py): a call under other settings sees those, then the first again."""
    before = log_level_seen()
    for level in ("DEBUG", "WARNING"):
        with temporary_settings(updates={PREFECT_LOGGING_LEVEL: level}):
            assert log_level_seen() == level
            assert stand_in() is None
    assert log_level_seen() == before
