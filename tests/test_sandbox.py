"""The sandbox stack is up and behaves as the demo and the other tests expect.

These tests FAIL (never skip) when a service does not answer: start the stack with
``.venv/bin/python -m sandbox up``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import boto3
import botocore.exceptions
import docker
import docker.errors
import httpx
import pytest
import redis
from botocore import UNSIGNED
from botocore.config import Config
from gateway_traffic import gateway_state_kept
from redis_servers import running_redis

from sandbox import constants, stack
from sandbox.seed import seed, url_for_db
from sandbox.stack import (
    GATEWAY_CONTAINER,
    GATEWAY_URL,
    PROMETHEUS_CONTAINER,
    PROMETHEUS_HOST_DATA_DIR,
    PROMETHEUS_URL,
    REDIS_CONTAINER,
    REDIS_HOST_DATA_DIR,
    REDIS_URL,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_ENDPOINT,
    S3_REGION,
    S3_SECRET_KEY,
)

HINT = "start the sandbox stack with `.venv/bin/python -m sandbox up`"


def unreachable(what: str, exc: BaseException | str) -> NoReturn:
    pytest.fail(f"{what} is not reachable ({exc}); {HINT}", pytrace=False)


@pytest.fixture(scope="module")
def r0() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        unreachable(f"Redis at {REDIS_URL}", exc)
    yield client
    client.close()


@pytest.fixture(scope="module")
def r1() -> Iterator[redis.Redis]:
    url = url_for_db(REDIS_URL, 1)
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        unreachable(f"Redis at {url}", exc)
    yield client
    client.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[httpx.Client]:
    with httpx.Client(base_url=GATEWAY_URL, timeout=5) as client:
        try:
            client.get("/health")
        except httpx.HTTPError as exc:
            unreachable(f"the gateway at {GATEWAY_URL}", exc)
        yield client


@pytest.fixture(scope="module")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        unreachable("the Docker daemon", exc)
    yield client
    client.close()


def s3(**kwargs: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=S3_ENDPOINT,
        region_name=S3_REGION,
        config=Config(
            connect_timeout=3,
            read_timeout=10,
            retries={"max_attempts": 1},
            signature_version=kwargs.pop("signature_version", None),
            s3={"addressing_style": "path"},
        ),
        **kwargs,
    )


def test_redis_answers_and_holds_seeded_data(r0: redis.Redis, r1: redis.Redis) -> None:
    """Read only: the sandbox Redis is shared, and most seeded keys expire within a day
    by design: only keys without a TTL are counted (a fifth of the 2000 sessions)."""
    assert r0.ping() is True
    sessions = list(r0.scan_iter(match="session:*", count=1000))
    pipe = r0.pipeline(transaction=False)
    for key in sessions:
        pipe.ttl(key)
    lasting = sum(1 for ttl in pipe.execute() if ttl == -1)
    assert lasting >= 300, f"expected the seeded sessions without a TTL in db 0, found {lasting}"
    assert r0.type("stats:daily") == b"hash" and r0.type("killchain:scores") == b"zset"
    assert r1.dbsize() > 0, "expected keys in db 1"


def test_seed_writes_the_gateway_shaped_data(tmp_path: Path) -> None:
    """The seed's data shape, on a redis-server of its own (never re-seed the shared one)."""
    with running_redis(tmp_path / "r") as server:
        seed(server.url, sessions=1000)
        r0, r1 = server.client(db=0), server.client(db=1)
        sessions = list(r0.scan_iter(match="session:*", count=1000))
        assert len(sessions) >= 1000, "expected the seeded sessions in db 0"
        doc = json.loads(r0.get(sessions[0]) or b"{}")
        assert doc.get("history"), f"session document without history: {doc}"
        assert r0.type("stats:daily") == b"hash"
        assert r0.type("killchain:scores") == b"zset"
        assert r0.type("alerts:recent") == b"list"
        ttls = [r0.ttl(key) for key in sessions[:300]]
        assert any(t == -1 for t in ttls), "some sessions must have no TTL"
        assert any(t > 3600 for t in ttls), "some sessions must have a TTL of hours"
        ratelimits = list(r0.scan_iter(match="ratelimit:*", count=1000))
        assert ratelimits, "expected ratelimit:* counters"
        assert max(r0.ttl(key) for key in ratelimits[:100]) > 60
        assert r1.dbsize() > 0, "expected keys in db 1"


def test_redis_persists_to_the_host_data_dir(r0: redis.Redis) -> None:
    assert r0.config_get("dir") == {"dir": "/data"}
    assert r0.config_get("appendonly") == {"appendonly": "no"}
    assert (REDIS_HOST_DATA_DIR / "dump.rdb").is_file(), f"no dump.rdb in {REDIS_HOST_DATA_DIR}"
    assert (REDIS_HOST_DATA_DIR / "dump.rdb").read_bytes()[:5] == b"REDIS"


def test_gateway_health_and_metrics(gateway: httpx.Client) -> None:
    health = gateway.get("/health")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "healthy"
    metrics = gateway.get("/metrics")
    assert metrics.status_code == 200
    assert "# TYPE proxilion_http_requests_total counter" in metrics.text
    assert "proxilion_analysis_duration_seconds_bucket" in metrics.text


def test_analyze_records_the_session_in_redis(gateway: httpx.Client, r0: redis.Redis) -> None:
    session_id = f"test-{uuid.uuid4()}"
    try:
        with gateway_state_kept():
            response = gateway.post(
                "/analyze",
                json={
                    "session_id": session_id,
                    "tool": "read_file",
                    "args": {"path": "/etc/hosts"},
                },
            )
        assert response.status_code == 200, response.text
        verdict = response.json()
        assert verdict["decision"] == "allow"
        assert isinstance(verdict["score"], int)
        raw = r0.get(f"session:{session_id}")
        assert raw is not None, "POST /analyze did not create the session key"
        doc = json.loads(raw)
        assert doc["history"][-1]["tool"] == "read_file"
        assert 23 * 3600 < r0.ttl(f"session:{session_id}") <= 24 * 3600
        ratelimits = list(r0.scan_iter(match=f"ratelimit:{session_id}:*"))
        assert ratelimits and 0 < r0.ttl(ratelimits[0]) <= 60
    finally:
        r0.delete(f"session:{session_id}", *r0.scan_iter(match=f"ratelimit:{session_id}:*"))


def test_gateway_logs_hold_stdout_and_stderr(
    gateway: httpx.Client, docker_client: docker.DockerClient
) -> None:
    assert gateway.get("/health").status_code == 200
    bad = gateway.post("/analyze", content=b"not json")  # logged to stderr
    assert bad.status_code == 400
    try:
        container = docker_client.containers.get(GATEWAY_CONTAINER)
    except docker.errors.NotFound as exc:
        unreachable(f"container {GATEWAY_CONTAINER}", exc)
    out = container.logs(stdout=True, stderr=False, tail=200).decode()
    err = container.logs(stdout=False, stderr=True, tail=200).decode()
    assert '"GET /health" 200' in out
    assert "ERROR analyze: bad request" in err


def test_containers_are_the_sandbox_ones(docker_client: docker.DockerClient) -> None:
    for name in (REDIS_CONTAINER, GATEWAY_CONTAINER, PROMETHEUS_CONTAINER):
        try:
            container = docker_client.containers.get(name)
        except docker.errors.NotFound as exc:
            unreachable(f"container {name}", exc)
        assert container.status == "running"
        assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    env = docker_client.containers.get(GATEWAY_CONTAINER).attrs["Config"]["Env"]
    for setting in ("MODE=monitor", "SESSION_STORE=redis", "SESSION_TTL_HOURS=24"):
        assert setting in env
    assert any(e.startswith("GATEWAY_API_TOKEN=") for e in env)


@pytest.fixture(scope="module")
def prometheus() -> Iterator[httpx.Client]:
    with httpx.Client(base_url=PROMETHEUS_URL, timeout=5) as client:
        try:
            ready = client.get("/-/ready")
        except httpx.HTTPError as exc:
            unreachable(f"Prometheus at {PROMETHEUS_URL}", exc)
        if ready.status_code != 200:
            unreachable(f"Prometheus at {PROMETHEUS_URL}", f"/-/ready: HTTP {ready.status_code}")
        yield client


def test_prometheus_runs_with_admin_api_and_long_retention(prometheus: httpx.Client) -> None:
    flags = prometheus.get("/api/v1/status/flags").json()["data"]
    assert flags["web.enable-admin-api"] == "true"
    assert flags["storage.tsdb.path"] == "/prometheus"
    assert flags["storage.tsdb.retention.time"] == "10y"  # 3650d, as Prometheus prints it
    assert flags["web.listen-address"] == "127.0.0.1:9090"


def test_prometheus_scrapes_the_gateway_itself_and_the_pushgateway(
    prometheus: httpx.Client,
) -> None:
    deadline = time.monotonic() + 3 * constants.PROMETHEUS_SCRAPE_SECONDS + 5
    while True:
        targets = prometheus.get("/api/v1/targets").json()["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if health == {"proxilion-gateway": "up", "prometheus": "up", "pushgateway": "up"}:
            break
        assert time.monotonic() < deadline, f"scrape targets not all up: {targets}"
        time.sleep(1)
    answer = prometheus.get("/api/v1/query", params={"query": "proxilion_gateway_info"}).json()
    assert answer["data"]["result"], "no gateway series scraped yet"


def test_prometheus_holds_backfilled_blocks_with_known_values(prometheus: httpx.Client) -> None:
    at = constants.PROMETHEUS_BACKFILL_START + 3600
    answer = prometheus.get(
        "/api/v1/query",
        params={"query": f'{constants.PROMETHEUS_BACKFILL_METRIC}{{series="s007"}}', "time": at},
    ).json()["data"]["result"]
    assert [float(s["value"][1]) for s in answer] == [constants.backfill_value(7, at)]
    blocks = [p for p in PROMETHEUS_HOST_DATA_DIR.iterdir() if (p / "meta.json").is_file()]
    assert blocks, f"no persisted block in {PROMETHEUS_HOST_DATA_DIR}"
    assert (PROMETHEUS_HOST_DATA_DIR / "wal").is_dir(), "no head data (wal/)"


def test_s3_admin_credentials_work() -> None:
    client = s3(aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY)
    try:
        buckets = [b["Name"] for b in client.list_buckets()["Buckets"]]
    except botocore.exceptions.EndpointConnectionError as exc:
        unreachable(f"S3 at {S3_ENDPOINT}", exc)
    assert S3_BUCKET in buckets
    key = f"test-sandbox/{uuid.uuid4()}.txt"
    client.put_object(Bucket=S3_BUCKET, Key=key, Body=b"probe")
    try:
        assert client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read() == b"probe"
    finally:
        client.delete_object(Bucket=S3_BUCKET, Key=key)


def test_s3_refuses_anonymous_and_wrong_secret() -> None:
    anonymous = s3(signature_version=UNSIGNED)
    for call in (
        lambda: anonymous.list_buckets(),
        lambda: anonymous.list_objects_v2(Bucket=S3_BUCKET),
        lambda: anonymous.put_object(Bucket=S3_BUCKET, Key="anon.txt", Body=b"x"),
    ):
        try:
            call()
        except botocore.exceptions.EndpointConnectionError as exc:
            unreachable(f"S3 at {S3_ENDPOINT}", exc)
        except botocore.exceptions.ClientError as exc:
            assert exc.response["Error"]["Code"] in {"AccessDenied", "403"}
        else:
            pytest.fail("anonymous S3 access was allowed")
    wrong = s3(aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key="not-the-secret")
    with pytest.raises(botocore.exceptions.ClientError):
        wrong.list_buckets()


SERVICES = {
    "gateway": GATEWAY_CONTAINER,
    "redis": REDIS_CONTAINER,
    "prometheus": PROMETHEUS_CONTAINER,
    "pushgateway": constants.PUSHGATEWAY_CONTAINER,
}


def test_containers_belong_to_the_compose_project(docker_client: docker.DockerClient) -> None:
    for service, name in SERVICES.items():
        try:
            labels = docker_client.containers.get(name).labels
        except docker.errors.NotFound as exc:
            unreachable(f"container {name}", exc)
        assert labels["com.docker.compose.project"] == constants.COMPOSE_PROJECT
        assert labels["com.docker.compose.service"] == service
        assert labels["com.docker.compose.project.working_dir"] == str(constants.PROJECT_DIR)
    services = stack.compose("config", "--services").split()
    assert sorted(services) == sorted(SERVICES)


def test_project_has_the_production_layout_with_its_secret_in_env() -> None:
    project = constants.PROJECT_DIR
    for name in (
        "docker-compose.yml",
        "prometheus.yml",
        "alerts.yml",
        "proxilion-dr-alerts.yml",
        "grafana/dashboards/proxilion-dr-dashboard.json",
        "grafana/dashboards/proxilion-gateway.json",
        "redis/redis.conf",
    ):
        assert (project / name).is_file(), f"{name} missing in {project}"
    env = project / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    token = constants.GATEWAY_SECRET_ENV["GATEWAY_API_TOKEN"]
    assert f"GATEWAY_API_TOKEN={token}" in env.read_text().splitlines()
    compose_text = (project / "docker-compose.yml").read_text()
    assert "GATEWAY_API_TOKEN: ${GATEWAY_API_TOKEN}" in compose_text
    assert token not in compose_text
    # Data mounted by paths relative to the project: a restored copy finds it beside it.
    assert "./data/redis:/data" in compose_text
    assert "./data/prometheus:/prometheus" in compose_text
    assert constants.REDIS_HOST_DATA_DIR.parent == project / "data"


def test_prometheus_loads_the_project_rule_files(prometheus: httpx.Client) -> None:
    groups = prometheus.get("/api/v1/rules").json()["data"]["groups"]
    files = {group["file"] for group in groups}
    assert files == {f"/config/{name}" for name in constants.PROMETHEUS_RULE_FILES}


def test_env_points_backup_config_at_the_project() -> None:
    exports = subprocess.run(
        [sys.executable, "-m", "sandbox", "env"], capture_output=True, text=True, check=True
    ).stdout
    assert f"export PROXILION_DR_CONFIG_PROJECT_DIR={constants.PROJECT_DIR}" in exports


def test_another_checkout_cannot_take_over_or_stop_the_running_stack(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """`sandbox up` / `down` from another checkout (another PROXILION_SANDBOX_DIR) while
    this one's stack runs refuse, naming whose it is; nothing is restarted."""
    names = (REDIS_CONTAINER, GATEWAY_CONTAINER, PROMETHEUS_CONTAINER)
    started = {n: docker_client.containers.get(n).attrs["State"]["StartedAt"] for n in names}
    weed = stack._our_weed_pid()
    other = {**os.environ, "PROXILION_SANDBOX_DIR": str(tmp_path / "other-checkout")}
    for action in ("up", "down"):
        run = subprocess.run(
            [sys.executable, "-m", "sandbox", action],
            env=other,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode != 0, f"sandbox {action} from another checkout went ahead"
        assert f"the sandbox of another checkout runs on this machine ({constants.STATE_DIR}" in (
            run.stdout + run.stderr
        )
    after = {n: docker_client.containers.get(n).attrs["State"]["StartedAt"] for n in names}
    assert after == started
    assert stack._our_weed_pid() == weed
