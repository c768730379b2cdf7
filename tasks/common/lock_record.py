"""Who holds a component lock: a record the holder keeps in a Prefect variable
(`lock-holder-<lock name>`, Prefect UI → Variables) and in this host's lock file.

The runs that wait read it to say who holds the lock and to tell whether that holder
is gone. It lives in the server's database, so it survives a server restart, which a
Prefect lease kept in the server's memory (Prefect's default) does not.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, Literal

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import ObjectAlreadyExists

from tasks.common.clock import age_text, parse_time, utc_now
from tasks.common.host_lock import boot_id, flock_domain, machine

RECORD_PREFIX = "lock-holder-"
State = Literal["holding", "released", "freed"]


@dataclass
class Holder:
    """One holder of one lock, as the waiting runs and the operator see it."""

    run: str = ""  # the flow run's name; "" outside a flow run
    flow_run_id: str = ""
    host: str = ""
    pid: int = 0
    domain: str = ""  # host_lock.flock_domain() of the holder
    machine: str = ""  # host_lock.machine(): "" when it cannot be told
    boot: str = ""  # host_lock.boot_id()
    since: str = ""  # UTC, ISO 8601
    renewed: str = ""  # the last lease renewal (or sign of life), UTC
    lease_id: str = ""  # the Prefect lease of the slot
    state: State = "holding"
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_value(cls, value: Any) -> Holder | None:
        """A record read back (a dict, or its JSON); None when it is not one."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in known})


def now_text() -> str:
    return utc_now().isoformat(timespec="seconds")


def this_holder() -> Holder:
    """This process as a holder: its flow run (also from inside a task), host, pid."""
    holder = Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        domain=flock_domain(),
        machine=machine(),
        boot=boot_id(),
        since=now_text(),
    )
    flow_run = getattr(FlowRunContext.get(), "flow_run", None)
    task_run = getattr(TaskRunContext.get(), "task_run", None)
    if flow_run is not None:
        holder.run, holder.flow_run_id = flow_run.name, str(flow_run.id)
    elif task_run is not None and task_run.flow_run_id:
        holder.flow_run_id = str(task_run.flow_run_id)
    return holder


def describe(holder: Holder | None, now: datetime | None = None) -> str:
    """The holder in one line: run, where, since when, last renewal."""
    if holder is None:
        return "a run that left no record of itself"
    now = now or utc_now()
    if holder.run:
        who = f"run {holder.run!r} (flow run {holder.flow_run_id})"
    elif holder.flow_run_id:
        who = f"flow run {holder.flow_run_id}"
    else:
        who = "a process outside a flow run"
    text = f"{who} on host {holder.host}, pid {holder.pid}, since {holder.since}"
    if holder.renewed:
        age = age_text(max((now - parse_time(holder.renewed)).total_seconds(), 0.0))
        text += f", last renewal {holder.renewed} ({age} ago)"
    return text + (f"; {holder.note}" if holder.note else "")


def record_name(lock: str) -> str:
    return RECORD_PREFIX + lock


def read_record(client: SyncPrefectClient, lock: str) -> Holder | None:
    variable = client.read_variable_by_name(record_name(lock))
    return None if variable is None else Holder.from_value(variable.value)


def write_record(client: SyncPrefectClient, lock: str, holder: Holder) -> None:
    """Create or replace the record of `lock`."""
    name, value = record_name(lock), asdict(holder)
    try:
        client.update_variable(VariableUpdate(name=name, value=value))
        return
    except httpx.HTTPStatusError as error:
        if error.response.status_code != 404:
            raise
    try:
        client.create_variable(VariableCreate(name=name, value=value))
    except ObjectAlreadyExists:  # created meanwhile by another run: replace it
        client.update_variable(VariableUpdate(name=name, value=value))
