"""Flow parameters, which Prefect stores as given and shows in its UI: a URL parameter
that carries credentials is refused, in every flow, before Prefect stores it where
that can be done.

Every flow is made with `dr_flow` (Prefect's `@flow` with this guard). For each
parameter named `*_url`:

- the parameter schema gets a `pattern` (tasks/common/secrets.py,
  CREDENTIAL_FREE_URL): the UI's run form refuses such a value, and the server refuses
  to create a deployment run with it (`prefect deployment run --param`), so nothing is
  stored;
- a direct call (`recover_host(prometheus_url=…)`), where this process creates the run,
  stores the value redacted (`http://***@host`);
- the run itself is refused before any work, in one line naming the parameter (for a
  run created some other way, e.g. a deployment without schema enforcement).

A direct call (`backup_redis(...)` in this process: the shell, scripts, tests, the
benchmarks) also runs without Prefect's flow-run heartbeats unless
PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set: Prefect 3.9's heartbeat thread (on by default,
every 180 s) sleeps in 1 s steps and the engine joins it after the run's terminal state,
so every call returned only at the next whole second after the flow began (0 to 1 s
after its end, 0.5 s on average). Deployment runs (`serve`) keep their heartbeats: Prefect
runs them without calling the flow object, in a process of their own.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

from prefect import Flow
from prefect.context import SettingsContext, get_settings_context
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Settings
from prefect.states import Failed
from pydantic import Field

from flows.support.settings import SecretParameter, refuse_secret_parameters
from tasks.common.log import run_logger
from tasks.common.secrets import CREDENTIAL_FREE_URL, carries_credentials, redact_url

P = ParamSpec("P")
R = TypeVar("R")
URL_SUFFIX = "_url"


def url_parameters(signature: inspect.Signature) -> list[str]:
    """The parameters that hold a URL: those named `*_url`."""
    return [name for name in signature.parameters if name.endswith(URL_SUFFIX)]


# The settings of the last direct call, and the same without heartbeats: deriving them
# (Prefect's temporary_settings) validates every setting again, about 45 ms of CPU.
_without_heartbeats: list[tuple[Settings, Settings]] = []


def settings_without_heartbeats(settings: Settings) -> Settings:
    """`settings` with flow-run heartbeats off, derived once per settings object."""
    last = _without_heartbeats[0] if _without_heartbeats else None
    if last is not None and last[0] is settings:
        return last[1]
    quiet = settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
    _without_heartbeats[:] = [(settings, quiet)]
    return quiet


class GuardedFlow(Flow[P, R]):
    """A Prefect flow that stores its URL parameters redacted when it creates its run,
    and whose direct call returns as its run ends (no heartbeat thread to wait for)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        context = get_settings_context()
        if "heartbeat_frequency" in context.settings.flows.model_fields_set:
            return super().__call__(*args, **kwargs)  # set on purpose: heartbeats kept
        quiet = settings_without_heartbeats(context.settings)
        with SettingsContext(profile=context.profile, settings=quiet):
            return super().__call__(*args, **kwargs)

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        stored = super().serialize_parameters(parameters)
        return {
            name: redact_url(value)
            if name.endswith(URL_SUFFIX) and isinstance(value, str) and carries_credentials(value)
            else value
            for name, value in stored.items()
        }


def refuses_url_credentials(fn: Callable[P, R]) -> Callable[P, R | Any]:
    """`fn` that first refuses credentials in its URL parameters (a Failed state whose
    message names the parameter), with the schema `pattern` on each of them."""
    signature = inspect.signature(fn, eval_str=True)
    names = url_parameters(signature)
    pattern = Field(json_schema_extra={"pattern": CREDENTIAL_FREE_URL})

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R | Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            refuse_secret_parameters(bound.arguments, *names)
        except SecretParameter as error:
            line = f"checking the parameters failed: {error}"
            run_logger().error("%s", line)
            return Failed(message=line, data=error)
        return fn(*args, **kwargs)

    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            p.replace(annotation=Annotated[p.annotation, pattern]) if p.name in names else p
            for p in signature.parameters.values()
        ]
    )
    return run


def dr_flow(**options: Any) -> Callable[[Callable[P, R]], Flow[P, R]]:
    """Prefect's `@flow(**options)` for every flow of this project: URL parameters with
    credentials are refused (this module's docstring)."""

    def make(fn: Callable[P, R]) -> Flow[P, R]:
        return GuardedFlow(refuses_url_credentials(fn), **options)  # type: ignore[arg-type]

    return make
