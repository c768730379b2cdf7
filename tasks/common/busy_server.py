"""A Prefect client for short writes (locks, automations) that asks a busy server again
at once.

A SQLite Prefect server (the default) answers 503 when a write meets another one: a
variable update reads, then writes, in one deferred transaction, and fails when the
server stored something meanwhile, as it does at a run's end with the run's own
events. The transaction was rolled back, so sending the request again is safe.
Prefect's client waits 2 s before it asks again; a lock held for a run's last step
would add those 2 s to most runs. This client asks again after BUSY_PAUSES first.
"""

from __future__ import annotations

import ssl
import time
from functools import cache

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import (
    PREFECT_API_ENABLE_HTTP2,
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
)

from tasks.common.certificates import verified

BUSY = 503
BUSY_PAUSES = (0.02, 0.05, 0.1, 0.2, 0.5)  # then Prefect's own retries (2 s, 4 s, ...)
CONNECT_RETRIES = 3  # as Prefect's client sets on its own transport


class AskAgainWhenBusy(httpx.BaseTransport):
    """Send a request again after each of BUSY_PAUSES while the server answers 503."""

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self.transport = transport

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for pause in BUSY_PAUSES:
            response = self.transport.handle_request(request)
            if response.status_code != BUSY:
                return response
            response.close()
            time.sleep(pause)
        return self.transport.handle_request(request)

    def close(self) -> None:
        self.transport.close()


@cache
def tls_context(skip_verify: bool, cert_file: str) -> ssl.SSLContext:
    """The certificate check Prefect's client makes, from the same settings; made once
    (reading the CA bundle takes tens of milliseconds)."""
    if skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return verified(cert_file)


def server_client() -> SyncPrefectClient:
    """A client of the configured Prefect server (PREFECT_API_URL) for short writes."""
    verify = tls_context(
        bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()), PREFECT_API_SSL_CERT_FILE.value() or ""
    )
    transport = httpx.HTTPTransport(
        verify=verify, http2=PREFECT_API_ENABLE_HTTP2.value(), retries=CONNECT_RETRIES
    )
    return get_client(
        httpx_settings={"verify": verify, "transport": AskAgainWhenBusy(transport)},
        sync_client=True,
    )
