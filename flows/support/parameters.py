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
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

from prefect import Flow
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


class GuardedFlow(Flow[P, R]):
    """A Prefect flow that stores its URL parameters redacted when it creates its run."""

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
