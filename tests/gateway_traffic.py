"""Requests to the sandbox gateway without a lasting trace: its /analyze counts each
request in lasting keys (`stats:daily`, `killchain:scores`, `alerts:recent`), which CI's
sandbox fingerprint compares before and after the suite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from sandbox import constants as stack

GATEWAY_LASTING_KEYS = ("stats:daily", "killchain:scores", "alerts:recent")


@contextmanager
def gateway_state_kept() -> Iterator[None]:
    """Put the gateway's lasting keys in the sandbox Redis back as they were."""
    client = redis.Redis.from_url(stack.REDIS_URL)
    before = {key: client.dump(key) for key in GATEWAY_LASTING_KEYS}
    try:
        yield
    finally:
        for key, dumped in before.items():
            if dumped is None:
                client.delete(key)
            else:
                client.restore(key, 0, dumped, replace=True)
