"""Prometheus's HTTP API as a backup needs it: one call with errors that say what to do
(admin API disabled, not ready, unreachable), the server's facts, a query at a time,
and the TSDB's block layout."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx

from tasks.common.certificates import verified
from tasks.common.retry import TransientError, retrying_task
from tasks.common.secrets import redact_url

API_TIMEOUT = 30.0


ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


BLOCK_FILES = ("meta.json", "index")  # plus at least one chunks/ segment


class PrometheusError(RuntimeError):
    """Prometheus refused or failed a request; says what to do."""


class PrometheusUnreachable(PrometheusError, TransientError):
    """Prometheus did not answer or dropped the connection; it may be restarting."""


class PrometheusNotReady(PrometheusError, TransientError):
    """Prometheus answers 503 while it starts (WAL replay); a retry may succeed."""


class AdminApiDisabled(PrometheusError):
    """Prometheus runs without --web.enable-admin-api."""


class PrometheusTimeout(PrometheusError):
    """Prometheus took longer than allowed; retrying would only add load."""


def _answer(response: httpx.Response, where: str, path: str) -> dict[str, Any]:
    """The `data` of a successful API answer, or an error that says what to fix."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if response.status_code == 200 and body.get("status") == "success":
        return body.get("data") or {}
    error = str(body.get("error") or response.text[:200]).strip()
    if "admin APIs disabled" in error:
        raise AdminApiDisabled(
            f"Prometheus at {where} answered 'admin APIs disabled': start Prometheus with "
            "--web.enable-admin-api (add it to the container's command) and run again"
        )
    if response.status_code == 503:
        raise PrometheusNotReady(
            f"Prometheus at {where} is not ready (HTTP 503: starting or replaying its WAL): "
            "wait until /-/ready answers and run again"
        )
    if response.status_code in (401, 403):
        raise PrometheusError(
            f"Prometheus at {where} refused {path} (HTTP {response.status_code}): check the "
            "credentials in prometheus_url (or PROXILION_DR_PROMETHEUS_URL)"
        )
    if response.status_code == 404:
        raise PrometheusError(
            f"{where} has no {path} (HTTP 404): is prometheus_url a Prometheus 2.x server?"
        )
    raise PrometheusError(
        f"Prometheus at {where} answered HTTP {response.status_code} to {path}: {error}"
    )


def call_api(
    prometheus_url: str, method: str, path: str, timeout: float = API_TIMEOUT
) -> dict[str, Any]:
    """One API request; connection trouble is transient, a slow answer is not."""
    where = redact_url(prometheus_url)
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0), verify=verified()) as client:
            response = client.request(method, prometheus_url.rstrip("/") + path)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol):
        raise ValueError(
            f"prometheus_url {where!r} is not an http(s) URL: use e.g. http://localhost:9090"
        ) from None
    except httpx.ReadTimeout:
        raise PrometheusTimeout(
            f"Prometheus at {where} did not answer {path} within {timeout:.0f} s"
        ) from None
    except httpx.TransportError as error:
        reason = (str(error) or type(error).__name__).replace(prometheus_url, where)
        raise PrometheusUnreachable(
            f"cannot reach Prometheus at {where} ({reason}): is it running? check prometheus_url"
        ) from None
    return _answer(response, where, path)


@dataclass(frozen=True)
class PrometheusFacts:
    """What a backup records about the server, and where it keeps its TSDB."""

    version: str
    revision: str
    tsdb_path: str
    retention: str


@retrying_task(1, 5)
def inspect_prometheus(prometheus_url: str) -> PrometheusFacts:
    """Version (buildinfo), TSDB path (command-line flags) and the retention it applies
    (runtimeinfo's `storageRetention`: "15d" when no flag sets it, where the flags
    say `0s`)."""
    build = call_api(prometheus_url, "GET", "/api/v1/status/buildinfo")
    flags = call_api(prometheus_url, "GET", "/api/v1/status/flags")
    runtime = call_api(prometheus_url, "GET", "/api/v1/status/runtimeinfo")
    return PrometheusFacts(
        version=str(build.get("version", "unknown")),
        revision=str(build.get("revision", "")),
        tsdb_path=str(flags.get("storage.tsdb.path", "")),
        retention=str(runtime.get("storageRetention", "")),
    )


def query_at(prometheus_url: str, expr: str, at_seconds: float) -> list[dict[str, Any]]:
    """An instant query's result vector at `at_seconds` (Unix time)."""
    params = httpx.QueryParams({"query": expr, "time": f"{at_seconds:.3f}"})
    answer = call_api(prometheus_url, "GET", f"/api/v1/query?{params}")
    return list(answer.get("result") or [])


def selector(labels: dict[str, str]) -> str:
    """The exact PromQL selector of one series (`{__name__="up",job="x"}`)."""
    escaped = (
        f'{name}="' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        for name, value in sorted(labels.items())
    )
    return "{" + ",".join(escaped) + "}"
