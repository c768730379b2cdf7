"""recover-host on the real sandbox: back up all four kinds to S3, lose the host (every
container gone, the compose project moved away, the local backups deleted: only the
S3 bucket survives), rebuild into a fresh folder from S3 alone, prove it, and put the
shared sandbox back whatever happened.

The container names and ports are fixed by the compose file, so this takes the
shared stack away for about a minute: it is marked to run after every other test.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import redis
from conftest import TAKES_THE_STACK_DOWN, require

from flows.backup_config import backup_config
from flows.backup_logs import backup_logs
from flows.backup_prometheus import backup_prometheus
from flows.backup_redis import backup_redis
from flows.recover_host import recover_host
from flows.support.failures import StepFailed
from sandbox import constants as stack
from sandbox import stack as sandbox_stack
from tasks.docker.compose import compose_command

pytestmark = pytest.mark.takes_the_stack_down
assert TAKES_THE_STACK_DOWN == "takes_the_stack_down"
TOKEN = stack.GATEWAY_SECRET_ENV["GATEWAY_API_TOKEN"]
PROJECT = "recovered"


def storage(prefix: str, backup_dir: Path) -> dict[str, str]:
    return {
        "backup_dir": str(backup_dir),
        "s3_bucket": stack.S3_BUCKET,
        "s3_prefix": prefix,
        "s3_endpoint_url": stack.S3_ENDPOINT,
    }


def back_up_everything(prefix: str, backup_dir: Path) -> dict[str, Any]:
    to = storage(prefix, backup_dir)
    return {
        "redis": backup_redis(redis_url=stack.REDIS_URL, container=stack.REDIS_CONTAINER, **to),
        "prometheus": backup_prometheus(
            prometheus_url=stack.PROMETHEUS_URL, container=stack.PROMETHEUS_CONTAINER, **to
        ),
        "config": backup_config(
            project_dir=str(stack.PROJECT_DIR), env_container=stack.GATEWAY_CONTAINER, **to
        ),
        "logs": backup_logs(containers=stack.GATEWAY_CONTAINER, **to),
    }


@pytest.fixture
def backed_up(tmp_path: Path, s3_prefix: str) -> dict[str, Any]:
    """All four kinds backed up to S3 (the old host's local copies then deleted)."""
    require(stack.GATEWAY_HOST, stack.GATEWAY_PORT, f"the gateway ({stack.GATEWAY_CONTAINER})")
    local = tmp_path / "old-host-backups"
    manifests = back_up_everything(s3_prefix, local)
    shutil.rmtree(local)  # the old host's disk is gone with it
    return manifests


@pytest.fixture
def host_lost(backed_up: dict[str, Any], tmp_path: Path) -> Iterator[Path]:
    """The sandbox host is gone: containers removed, the compose project moved aside
    (never deleted); only S3 is left. Afterwards: the recovered project removed, the
    sandbox's project put back and `sandbox up` run, whatever the test did."""
    aside = stack.STATE_DIR / f"project.host-lost-{uuid.uuid4().hex[:6]}"
    target = tmp_path / "new-host" / "proxilion"
    sandbox_stack.compose("down", "--timeout", "30")
    stack.PROJECT_DIR.rename(aside)
    try:
        yield target
    finally:
        compose_file = target / "docker-compose.yml"
        if compose_file.is_file():
            subprocess.run(
                [*compose_command(), "-f", str(compose_file), "-p", PROJECT, "down", "-t", "30"],
                capture_output=True,
                check=False,
            )
        aside.rename(stack.PROJECT_DIR)
        sandbox_stack.up()


def keys_per_db(url: str) -> dict[str, int]:
    """Key counts per db, less the keys recover-host's own /analyze check wrote after
    the restore (the gateway's db0: its session and rate-limit keys name the session)."""
    client = redis.Redis.from_url(url)
    try:
        counts = {db: int(v["keys"]) for db, v in client.info("keyspace").items()}
        checked = sum(1 for _ in client.scan_iter(match="*recover-host-check-*", count=1000))
        return counts | {"db0": counts.get("db0", 0) - checked}
    finally:
        client.close()


def test_recover_host_rebuilds_the_sandbox_from_s3_alone(
    backed_up: dict[str, Any], host_lost: Path, s3_prefix: str, tmp_path: Path
) -> None:
    target = host_lost
    fetched = tmp_path / "new-host" / "backups"  # empty: everything comes from S3
    run = {
        "target_dir": str(target),
        "source_project_dir": str(stack.PROJECT_DIR),  # the lost host's project folder
        "project_name": PROJECT,
        "gateway_url": stack.GATEWAY_URL,
        "redis_url": stack.REDIS_URL,
        "prometheus_url": stack.PROMETHEUS_URL,
        **storage(s3_prefix, fetched),
    }
    # The config backup withholds the gateway's token: the flow names it, writes nothing.
    with pytest.raises(StepFailed, match="withholds \\(or lacks\\) GATEWAY_API_TOKEN"):
        recover_host(**run)
    assert not target.exists()
    secrets_file = tmp_path / "secrets.env"
    secrets_file.write_text(f"# supplied by the operator\nGATEWAY_API_TOKEN={TOKEN}\n")

    result = recover_host(secrets_env_file=str(secrets_file), **run)

    print(f"\nrecover-host RTO {result['rto_seconds']:.1f} s (sandbox, backups from S3)")
    assert result["ok"], result
    # The gateway answers healthy, with the token the operator supplied.
    assert httpx.get(f"{stack.GATEWAY_URL}/health").json()["status"] == "healthy"
    gateway = docker.from_env().containers.get(stack.GATEWAY_CONTAINER)
    assert gateway.labels["com.docker.compose.project"] == PROJECT
    assert f"GATEWAY_API_TOKEN={TOKEN}" in gateway.attrs["Config"]["Env"]
    env = target / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600 and not (target / "env.txt").exists()
    # The sessions are back: key counts per db as the manifest says (TTL keys may expire).
    expected = backed_up["redis"]["source"]["keyspace"]
    actual = keys_per_db(stack.REDIS_URL)
    for db, facts in expected.items():
        assert facts["keys"] - facts["expires"] <= actual.get(db, 0) <= facts["keys"], db
    assert (target / "data" / "redis" / "dump.rdb").is_file()  # relative to the project
    # Prometheus answers an old query with the known backfilled value.
    at = stack.PROMETHEUS_BACKFILL_START + 3600
    query = f'{stack.PROMETHEUS_BACKFILL_METRIC}{{series="s007"}}'
    answer = httpx.get(
        f"{stack.PROMETHEUS_URL}/api/v1/query", params={"query": query, "time": at}
    ).json()["data"]["result"]
    assert [float(s["value"][1]) for s in answer] == [stack.backfill_value(7, at)]
    # The report is the runbook's checklist: what the flow does is ticked with evidence.
    checklist = result["checklist"]
    for section, item in [
        ("3. RESTORE GATEWAY", "curl localhost:8787/health returns OK"),
        ("4. RESTORE REDIS", "redis-cli PING returns PONG"),
        ("5. RESTORE MONITORING", "Prometheus data restored (optional)"),
        ("6. VERIFY", "Test /analyze endpoint"),
        ("6. VERIFY", "Confirm alerting works"),
    ]:
        assert checklist[section][item]["outcome"] == "ok", (item, checklist[section][item])
    assert "PONG" in checklist["4. RESTORE REDIS"]["redis-cli PING returns PONG"]["evidence"]
    assert checklist["1. ASSESS"]["Notify stakeholders"]["outcome"] == "by hand"
    assert result["backup"]["name"] == backed_up["redis"]["name"]
    assert result["rpo_seconds"] is not None
