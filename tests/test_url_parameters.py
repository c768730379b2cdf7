"""A URL with credentials is refused in every URL parameter of every flow, before Prefect
stores it: Prefect keeps flow-run parameters and shows them in its UI.

Every flow of `flows/` is found here, and every parameter named `*_url` of each is given
`http://op:<password>@…`; the run must fail naming the parameter, and the password must
not be anywhere in the Prefect server's database files. A deployment run (the UI's form,
`prefect deployment run --param`) is refused by the server itself, from the parameter
schema, before any run exists.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect import Flow
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import State
from prefect_records import database_bytes, wait_for_final_events

import flows
from deployments.__main__ import to_deployment
from deployments.catalog import DEPLOYMENTS
from flows.support.settings import SecretParameter

ABSENT = "proxilion-dr-test-absent"


def every_flow() -> list[Flow[..., Any]]:
    """Each flow defined in a module of `flows/` (a new one included)."""
    found = []
    for module in pkgutil.iter_modules(flows.__path__):
        if not module.ispkg:
            loaded = importlib.import_module(f"flows.{module.name}")
            found += [f for f in vars(loaded).values() if isinstance(f, Flow)]
    return sorted({id(f): f for f in found}.values(), key=lambda f: f.name)


def url_parameters(flow: Flow[..., Any]) -> list[str]:
    return [name for name in inspect.signature(flow.fn).parameters if name.endswith("_url")]


def harmless(flow: Flow[..., Any], tmp_path: Path) -> dict[str, Any]:
    """Arguments that keep a run that did NOT refuse (the old code) away from the
    sandbox and this machine: a dry run, folders under tmp_path, containers that do not
    exist, URLs where nothing listens."""
    given: dict[str, Any] = {}
    for name in inspect.signature(flow.fn).parameters:
        if name == "dry_run":
            given[name] = True
        elif name.endswith("_dir"):
            given[name] = str(tmp_path / name)
        elif name == "container" or name.endswith("_container") or name == "containers":
            given[name] = ABSENT
        elif name == "components":
            given[name] = ["logs"]
        elif name.endswith("_url"):
            given[name] = plain_url(name)
        elif name == "s3_bucket":
            given[name] = ""
    return given


def plain_url(name: str, credentials: str = "") -> str:
    scheme, path = ("redis", "/0") if name.startswith("redis") else ("http", "")
    return f"{scheme}://{credentials}127.0.0.1:9{path}"  # port 9: nothing listens


def refusal(outcome: Any) -> SecretParameter | None:
    """The SecretParameter a flow's function or run ended with, if that is how it ended."""
    if isinstance(outcome, State) and outcome.is_failed():
        outcome = outcome.result(raise_on_failure=False)
    return outcome if isinstance(outcome, SecretParameter) else None


def test_every_url_parameter_of_every_flow_refuses_credentials(tmp_path: Path) -> None:
    """Each URL parameter on its own, through the flow's function (no run: fast)."""
    cases = [(flow, name) for flow in every_flow() for name in url_parameters(flow)]
    assert len(cases) >= 19, [f"{f.name} {n}" for f, n in cases]
    problems = []
    for flow, name in cases:
        arguments = {**harmless(flow, tmp_path), name: plain_url(name, "op:pw-for-this@")}
        try:
            outcome = flow.fn(**arguments)
        except Exception as error:  # noqa: BLE001 - the old code's failures, reported below
            outcome = error
        refused = refusal(outcome)
        if refused is None or name not in str(refused) or "pw-for-this" in str(refused):
            problems.append(f"{flow.name} {name}: not refused naming it ({outcome!r:.200})")
    assert not problems, "\n".join(problems)


def test_no_password_in_a_url_parameter_reaches_prefects_database(tmp_path: Path) -> None:
    """A run of each flow with every URL parameter carrying its own password: refused,
    and no password in any byte of the server's database (runs, logs, events…)."""
    passwords, runs, problems = [], [], []
    for flow in every_flow():
        given = {}
        for name in url_parameters(flow):
            passwords.append(f"pw{uuid.uuid4().hex}")
            given[name] = plain_url(name, f"op:{passwords[-1]}@")
        state = flow(**{**harmless(flow, tmp_path), **given}, return_state=True)
        runs.append(state.state_details.flow_run_id)
        if given and refusal(state) is None:
            problems.append(f"{flow.name}: not refused ({state.type.value}: {state.message})")
    wait_for_final_events(runs)
    stored = database_bytes()
    assert not [p for p in passwords if p.encode() in stored], "a password is in the database"
    assert not problems, "\n".join(problems)


def runs_of(client: SyncPrefectClient, deployment: uuid.UUID) -> int:
    """How many runs `deployment` has (other tests' runs come and go meanwhile)."""
    only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment]))
    return len(client.read_flow_runs(deployment_filter=only))


@pytest.mark.parametrize("parameter", ["prometheus_url", "gateway_url", "s3_endpoint_url"])
def test_a_deployment_run_with_credentials_in_a_url_is_refused_by_the_server(
    parameter: str,
) -> None:
    """The run form and `prefect deployment run --param` create the run through the
    server, which checks the parameters against the deployment's schema first."""
    [spec] = [s for s in DEPLOYMENTS if s.name == "host-lost"]
    deployment = to_deployment(spec, "UTC").apply()
    password = f"pw{uuid.uuid4().hex}"
    url = plain_url(parameter, f"admin:{password}@")
    name = f"{spec.flow_name}/{spec.name}"
    with get_client(sync_client=True) as client:
        before = runs_of(client, deployment)
    with pytest.raises(PrefectHTTPStatusError, match="409") as refused:
        run_deployment(name, parameters={parameter: url, "dry_run": True}, timeout=0)
    assert parameter in str(refused.value)
    with get_client(sync_client=True) as client:
        assert runs_of(client, deployment) == before, "a run was created"
    assert password.encode() not in database_bytes()
    # the same deployment takes a URL without credentials (the run waits for a runner)
    run = run_deployment(name, parameters={parameter: plain_url(parameter)}, timeout=0)
    with get_client(sync_client=True) as client:
        client.delete_flow_run(run.id)
