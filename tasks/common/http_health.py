"""HTTP health checks: one probe, or polling with backoff until healthy or a deadline.

A probe answers None when the service is healthy, else the reason in one line
(connection refused, HTTP 503 with its body, wrong JSON…), so a report can say
why a service was not healthy when the deadline passed.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.certificates import verified

HEALTHY = {"status": "healthy"}
PROBE_TIMEOUT = 2.0
FIRST_DELAY = 0.05
MAX_DELAY = 1.0


class MetricsError(RuntimeError):
    """`/metrics` did not answer with Prometheus text."""


def derive_url(base_or_health_url: str, path: str) -> str:
    """`path` on the same server as `base_or_health_url` (`http://h:8787/health` or
    `http://h:8787` + `/metrics` → `http://h:8787/metrics`)."""
    url = httpx.URL(base_or_health_url)
    return str(url.copy_with(path=path, query=None, fragment=None))


def health_url(base_url: str) -> str:
    """The `/health` URL of a gateway given by its base URL (or already by `/health`)."""
    return base_url if httpx.URL(base_url).path.rstrip("/") else derive_url(base_url, "/health")


def _short(body: bytes) -> str:
    return body[:200].decode(errors="replace").replace("\n", " ")


def _get(url: str, timeout: float) -> httpx.Response | str:
    """The 200 response of GET `url`, or why there was none (one line)."""
    try:
        response = httpx.get(url, timeout=timeout, verify=verified())
    except httpx.TimeoutException:
        return f"GET {url}: no answer within {timeout:g} s"
    except httpx.HTTPError as error:
        return f"GET {url}: {type(error).__name__}: {error}"
    if response.status_code != 200:
        return f"GET {url}: HTTP {response.status_code} {_short(response.content)}"
    return response


def probe(
    url: str, expect: dict[str, Any] | None = None, timeout: float = PROBE_TIMEOUT
) -> str | None:
    """One GET: None when it answers 200 (with a JSON object holding `expect`'s items),
    else why not."""
    response = _get(url, timeout)
    if isinstance(response, str):
        return response
    if not expect:
        return None
    try:
        body = response.json()
    except json.JSONDecodeError:
        return f"GET {url}: not JSON: {_short(response.content)}"
    if not isinstance(body, dict) or any(body.get(k) != v for k, v in expect.items()):
        return f"GET {url}: answered {_short(response.content)}, expected {json.dumps(expect)}"
    return None


@dataclass(frozen=True)
class HealthWait:
    """How waiting for a service went."""

    url: str
    healthy: bool
    seconds: float
    attempts: int
    reason: str  # why it was not healthy (the last probe's reason, or why we gave up)

    def summary(self) -> str:
        if self.healthy:
            return f"healthy after {self.seconds:.1f} s ({self.attempts} probes)"
        return f"not healthy after {self.seconds:.1f} s ({self.attempts} probes): {self.reason}"


def wait_until_healthy(
    url: str,
    deadline_seconds: float,
    expect: dict[str, Any] | None = None,
    give_up: Callable[[], str | None] | None = None,
) -> HealthWait:
    """Probe `url` with backoff (50 ms doubling to 1 s) until healthy or `deadline_seconds`
    pass. `give_up`, asked between probes, returns a reason to stop early (the container
    exited: no point waiting out the deadline)."""
    start = time.monotonic()
    deadline = start + deadline_seconds
    delay, attempts = FIRST_DELAY, 0
    while True:
        attempts += 1
        timeout = max(0.1, min(PROBE_TIMEOUT, deadline - time.monotonic()))
        reason = probe(url, expect, timeout)
        elapsed = round(time.monotonic() - start, 3)
        if reason is None:
            return HealthWait(url, True, elapsed, attempts, "")
        stop = give_up() if give_up else None
        if stop:
            return HealthWait(url, False, elapsed, attempts, f"{stop} (last probe: {reason})")
        if time.monotonic() + delay > deadline:
            return HealthWait(url, False, elapsed, attempts, reason)
        time.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)


@task(cache_policy=NO_CACHE)
def check_metrics(url: str, timeout: float = 5.0) -> int:
    """GET a Prometheus `/metrics` endpoint; returns its number of samples, or raises
    MetricsError saying what it answered instead."""
    response = _get(url, timeout)
    if isinstance(response, str):
        raise MetricsError(response)
    lines = response.text.splitlines()
    samples = [line for line in lines if line.strip() and not line.startswith("#")]
    if not samples:
        raise MetricsError(f"GET {url}: answered 200 without any metric sample")
    return len(samples)


def analyze_once(base_url: str) -> str:
    session = f"recover-host-check-{secrets.token_hex(4)}"
    response = httpx.post(
        derive_url(base_url, "/analyze"),
        json={"session_id": session, "tool": "read_file", "args": {"path": "/etc/hostname"}},
        timeout=10,
        verify=verified(),
    )
    body = response.json() if response.status_code == 200 else {}
    if "decision" not in body:
        raise RuntimeError(f"POST /analyze answered HTTP {response.status_code}: {body}")
    return f"session {session}: decision {body['decision']}, score {body.get('score')}"
