"""What the sandbox holds that a test run must leave as it found it: its containers
(same ids, same start times) and its S3 server process, Redis's lasting data (keys
without a TTL: the others expire by design), the Pushgateway's groups (no source a
test pushed), and the bucket's objects outside the tests' `test-*` prefixes.

CI takes one before and one after the suite (`python -m sandbox fingerprint`) and
fails when they differ."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import httpx
import redis

from sandbox import stack
from sandbox.constants import PUSHGATEWAY_URL, REDIS_URL, S3_BUCKET
from sandbox.seed import url_for_db

TEST_PREFIX = "test-"  # every test's S3 prefix starts so (tests/conftest.py s3_prefix)


def containers() -> dict[str, dict[str, str]]:
    client = stack.ensure_dockerd()
    found = {}
    for spec in stack.service_specs():
        container = client.containers.get(spec.container)
        found[spec.container] = {
            "id": container.id,
            "started_at": container.attrs["State"]["StartedAt"],
            "status": container.status,
        }
    return found


def lasting_redis_data() -> dict[str, Any]:
    """Per db: how many keys have no TTL and a SHA-256 over their names and DUMPs."""
    dbs: dict[str, Any] = {}
    keyspace = redis.Redis.from_url(REDIS_URL).info("keyspace")
    for name in sorted(keyspace):
        client = redis.Redis.from_url(url_for_db(REDIS_URL, int(name.removeprefix("db"))))
        keys = sorted(client.scan_iter(count=1000))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
            pipe.dump(key)
        answers = pipe.execute()
        digest, lasting = hashlib.sha256(), 0
        for key, ttl, dumped in zip(keys, answers[::2], answers[1::2], strict=True):
            if ttl == -1 and dumped is not None:
                digest.update(len(key).to_bytes(4, "big") + key + dumped)
                lasting += 1
        dbs[name] = {"keys_without_ttl": lasting, "sha256": digest.hexdigest()}
    return dbs


def pushgateway_groups() -> list[dict[str, str]]:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    answer = httpx.get(f"{PUSHGATEWAY_URL}/api/v1/metrics", timeout=10).json()
    return sorted((g["labels"] for g in answer.get("data", [])), key=lambda g: sorted(g.items()))


def sandbox_objects() -> dict[str, str]:
    """The bucket's objects outside the tests' prefixes, by key: their ETags."""
    s3 = stack.s3_client()
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET):
        for item in page.get("Contents", []):
            if not item["Key"].startswith(TEST_PREFIX):
                found[item["Key"]] = item["ETag"]
    return found


def fingerprint() -> dict[str, Any]:
    return {
        "containers": containers(),
        "seaweedfs_pid": stack._our_weed_pid(),
        "redis": lasting_redis_data(),
        "pushgateway_groups": pushgateway_groups(),
        "s3_objects": sandbox_objects(),
    }
