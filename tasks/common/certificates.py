"""The certificate check of our HTTP calls (httpx's default: certifi's CA bundle), made
once: building it reads the bundle, about 40 ms of CPU that each call of a polling
loop paid when httpx built one per call."""

from __future__ import annotations

import ssl
from functools import cache

import certifi


@cache
def verified(cafile: str = "") -> ssl.SSLContext:
    """A context that checks servers against `cafile` (certifi's bundle when empty)."""
    return ssl.create_default_context(cafile=cafile or certifi.where())
