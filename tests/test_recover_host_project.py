"""recover-host (runbook scenario 3) on a project laid out as operators write them, not
the sandbox's: a Redis called `cache` with a `requirepass` in its redis.conf and its
data in a named volume, a gateway called `api` with two replicas behind a port range,
its secrets in an `env_file`, a secret with `$` in `.env`, an override file, the
project name in COMPOSE_PROJECT_NAME, a Prometheus running as `nobody` with its
history and alert rules. Rebuilt end to end from the S3 bucket alone; each broken
variant refused by the dry run before anything is written.

Its own compose project, ports and S3 prefix: the shared sandbox is never taken down."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import docker
import httpx
import pytest
import redis
import waiting
import yaml
from redis_servers import free_port
from throwaway_services import PORT_ATTEMPTS, PORT_TAKEN

from flows.backup_config import backup_config
from flows.backup_prometheus import backup_prometheus
from flows.backup_redis import backup_redis
from flows.recover_host import recover_host
from flows.support.failures import StepFailed
from sandbox import constants as stack
from sandbox.images import host_mounts
from sandbox.stack import backfill_openmetrics
from tasks.common.certificates import verified
from tasks.docker.compose import PROJECT_LABEL, compose_command
from tasks.docker.project import env_file_text

PASSWORD = "p@ss w0rd#1"  # a space and a `#`: quoting in redis.conf and the env file
API_TOKEN = "x${HOME}y$z"  # compose 1.29 used to expand it: x/rooty
HOST = [f"{m['Source']}:{m['Target']}:ro" for m in host_mounts()]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


NOBODY = 65534
RULES = "groups:\n  - name: shop\n    rules:\n      - alert: CacheDown\n        expr: up == 0\n"


def make_project(folder: Path, name: str, ports: dict[str, int]) -> None:
    low, high = ports["api"], ports["api"] + 1
    prometheus = [
        "/usr/bin/prometheus",
        "--config.file=/config/prometheus.yml",
        "--web.listen-address=0.0.0.0:9090",
        "--web.enable-admin-api",
        "--storage.tsdb.path=/prometheus",
        f"--storage.tsdb.retention.time={stack.PROMETHEUS_RETENTION}",
    ]
    compose = {
        "services": {
            "metrics": {
                "image": stack.HOSTFS_IMAGE,
                "command": prometheus,
                "user": f"{NOBODY}:{NOBODY}",
                "ports": [f"127.0.0.1:{ports['metrics']}:9090"],
                "volumes": [
                    "./prometheus.yml:/config/prometheus.yml:ro",
                    "./alerts.yml:/config/alerts.yml:ro",
                    "./data/prometheus:/prometheus",
                    *HOST,
                ],
            },
            "cache": {
                "image": stack.HOSTFS_IMAGE,
                "command": ["/usr/bin/redis-server", "/conf/redis.conf"],
                "ports": [f"127.0.0.1:{ports['cache']}:6379"],
                "volumes": ["cachedata:/data", "./redis:/conf:ro", *HOST],
            },
            "api": {
                "image": stack.HOSTFS_IMAGE,
                "command": ["/usr/bin/python3", "-u", "/app/gateway.py"],
                "env_file": ["gateway.env"],
                "environment": {
                    "REDIS_HOST": "cache",
                    "REDIS_PORT": "6379",
                    "GATEWAY_HOST": "0.0.0.0",
                    "GATEWAY_PORT": "8787",
                    "API_TOKEN": "${API_TOKEN}",
                },
                "ports": [f"127.0.0.1:{low}-{high}:8787"],
                "volumes": [*HOST, f"{stack.GATEWAY_SCRIPT}:/app/gateway.py:ro"],
                "deploy": {"replicas": 2},
                "depends_on": ["cache"],
            },
        },
        "volumes": {"cachedata": {}},
    }
    write(folder / "docker-compose.yml", yaml.safe_dump(compose, sort_keys=False))
    write(folder / "prometheus.yml", "rule_files: [alerts.yml]\nscrape_configs: []\n")
    write(folder / "alerts.yml", RULES)
    history = folder / "data" / "prometheus"
    history.mkdir(parents=True)
    (folder / "history.om").write_text(backfill_openmetrics())
    subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", folder / "history.om", history],
        check=True,
        capture_output=True,
    )
    (folder / "history.om").unlink()
    for path in [history, *history.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    override = {"services": {"api": {"environment": {"MODE": "enforce"}}}}
    write(folder / "docker-compose.override.yml", yaml.safe_dump(override))
    write(
        folder / "redis" / "redis.conf",
        f'bind 0.0.0.0\nport 6379\ndir /data\nrequirepass "{PASSWORD}"\n'
        'protected-mode no\nsave ""\nappendonly no\n',
    )
    write(
        folder / "gateway.env",
        env_file_text({"REDIS_PASSWORD": PASSWORD, "GATEWAY_API_TOKEN": "t-1"}),
    )
    write(folder / ".env", env_file_text({"COMPOSE_PROJECT_NAME": name, "API_TOKEN": API_TOKEN}))


def compose(folder: Path, *args: str) -> str:
    done = subprocess.run(
        [*compose_command(), *args], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def wait_until(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Poll with a deadline; a failure shows every container's state."""
    waiting.wait_until(condition, what, timeout, lambda: ":\n" + docker_ps())


def docker_ps() -> str:
    return subprocess.run(["docker", "ps", "-a"], capture_output=True, text=True).stdout


def healthy(port: int) -> bool:
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2, verify=verified()).json()
        return bool(answer.get("status") == "healthy")
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def ready(port: int) -> bool:
    try:
        return (
            httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2, verify=verified()).status_code
            == 200
        )
    except httpx.HTTPError:
        return False


def project_containers(name: str) -> list[str]:
    listed = docker.from_env().containers.list(
        all=True, filters={"label": f"{PROJECT_LABEL}={name}"}
    )
    return sorted(c.name for c in listed)


def secrets_file(path: Path, **leave_out: bool) -> Path:
    given = {
        "API_TOKEN": API_TOKEN,
        "REDIS_REDIS_CONF_REQUIREPASS": PASSWORD,
        "REDIS_PASSWORD": PASSWORD,
        "GATEWAY_API_TOKEN": "t-1",
    }
    lines = [f"{k}='{v}'" for k, v in given.items() if not leave_out.get(k)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lost_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The project ran, was backed up to S3 (config and Redis), then its host was lost
    (containers and named volume gone). Yields what recover-host needs; the dry runs
    below share it, the rebuild (last) uses it up."""
    tmp_path = tmp_path_factory.mktemp("lost-host")
    yield from _lost_host(tmp_path, f"test-host-{secrets.token_hex(5)}")


@pytest.fixture
def redis_setting(lost_host: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The Redis URL with its password, as a setting (never a parameter)."""
    monkeypatch.setenv("PROXILION_DR_REDIS_URL", lost_host["url"])


def _lost_host(tmp_path: Path, s3_prefix: str) -> Iterator[dict[str, Any]]:
    tag = secrets.token_hex(3)
    name = f"shop-{tag}"
    old = tmp_path / "shop"
    s3 = {
        "s3_bucket": stack.S3_BUCKET,
        "s3_prefix": s3_prefix,
        "s3_endpoint_url": stack.S3_ENDPOINT,
    }
    try:
        ports = up_on_free_ports(old, name)
        url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{ports['cache']}/0"
        client = redis.Redis.from_url(url)
        wait_until(lambda: _answers(client), "the project's Redis")
        wait_until(lambda: healthy(ports["api"]) and healthy(ports["api"] + 1), "both replicas")
        wait_until(lambda: ready(ports["metrics"]), "the project's Prometheus")
        client.mset({f"session:{i}": f"value-{i}" for i in range(500)})
        lost_backups = tmp_path / "lost-host-backups"
        backup_config(project_dir=str(old), env_container="", backup_dir=str(lost_backups), **s3)
        with pytest.MonkeyPatch.context() as setting:  # a password: never a parameter
            setting.setenv("PROXILION_DR_REDIS_URL", url)
            backup_redis(container="", fetch="network", backup_dir=str(lost_backups), **s3)
        backup_prometheus(
            prometheus_url=f"http://127.0.0.1:{ports['metrics']}",
            container=f"{name}_metrics_1",
            fetch="container",
            backup_dir=str(lost_backups),
            **s3,
        )
        compose(old, "down", "-v", "--timeout", "5")
        yield {
            "name": name,
            "ports": ports,
            "url": url,
            "client": client,
            "parameters": {
                "source_project_dir": str(old),
                "backup_dir": str(tmp_path / "new-host-backups"),
                "gateway_url": f"http://127.0.0.1:{ports['api']}",
                "prometheus_url": f"http://127.0.0.1:{ports['metrics']}",
                "start_timeout_seconds": 60,
                **s3,
            },
        }
    finally:
        for folder in (old, *tmp_path.parent.glob("*/new-host")):
            if (folder / "docker-compose.yml").is_file():
                subprocess.run(
                    [*compose_command(), "-p", name, "down", "-v", "--timeout", "5"],
                    cwd=folder,
                    capture_output=True,
                    timeout=300,
                )
        bucket = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
        listed = bucket.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=s3_prefix + "/")
        for item in listed.get("Contents", []):
            bucket.delete_object(Bucket=stack.S3_BUCKET, Key=item["Key"])


def up_on_free_ports(folder: Path, name: str) -> dict[str, int]:
    """The project made in `folder` and up, on free ports; made again on others when
    one was taken before Docker bound it (another test's server started meanwhile)."""
    for _attempt in range(PORT_ATTEMPTS):
        ports = {"cache": free_port(), "api": free_port(), "metrics": free_port()}
        while _taken(ports["api"] + 1):
            ports["api"] = free_port()
        make_project(folder, name, ports)
        up = [*compose_command(), "up", "-d"]
        done = subprocess.run(up, cwd=folder, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return ports
        compose(folder, "down", "-v", "--timeout", "5")
        assert PORT_TAKEN in done.stderr, done.stderr[-2000:]
        shutil.rmtree(folder)
    pytest.fail(f"no free ports for the project {name} in {PORT_ATTEMPTS} tries")


def _taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.parametrize(
    ("variant", "refusal"),
    [
        (
            {"leave_out": "REDIS_REDIS_CONF_REQUIREPASS"},
            r"REDIS_REDIS_CONF_REQUIREPASS \(redis/redis.conf: requirepass\)",
        ),
        ({"leave_out": "REDIS_PASSWORD"}, r"REDIS_PASSWORD \(gateway.env: REDIS_PASSWORD\)"),
        ({"leave_out": "API_TOKEN"}, r"withholds \(or lacks\) API_TOKEN"),
        ({"port_taken": True}, r"ports \d+ are taken on this host"),
        (
            {"compose_files": "docker-compose.prod.yml"},
            r"docker-compose.prod.yml is not in the restored project",
        ),
    ],
    ids=["file-secret", "env-file-secret", "compose-secret", "port-taken", "compose-file"],
)
def test_the_dry_run_refuses_each_broken_variant_before_writing(
    lost_host: dict[str, Any],
    redis_setting: None,
    tmp_path: Path,
    variant: dict[str, Any],
    refusal: str,
) -> None:
    target = tmp_path / "new-host"
    leave_out = {variant["leave_out"]: True} if "leave_out" in variant else {}
    parameters = dict(lost_host["parameters"])
    if "compose_files" in variant:
        parameters["compose_files"] = variant["compose_files"]
    blocker = socket.socket()
    try:
        if variant.get("port_taken"):
            blocker.bind(("127.0.0.1", lost_host["ports"]["api"] + 1))
            blocker.listen()
        with pytest.raises(StepFailed, match=refusal):
            recover_host(
                target_dir=str(target),
                secrets_env_file=str(secrets_file(tmp_path / "secrets.env", **leave_out)),
                dry_run=True,
                **parameters,
            )
    finally:
        blocker.close()
    assert not target.exists()
    assert list(Path(parameters["backup_dir"]).rglob("*")) == []
    assert project_containers(lost_host["name"]) == []


def test_the_project_is_rebuilt_from_the_bucket_alone(
    lost_host: dict[str, Any], redis_setting: None, tmp_path: Path
) -> None:
    """Runs after the dry runs above (they share the lost host; this one rebuilds it)."""
    target = tmp_path / "new-host"
    started = time.monotonic()
    result = recover_host(
        target_dir=str(target),
        secrets_env_file=str(secrets_file(tmp_path / "secrets.env")),
        **lost_host["parameters"],
    )
    took = time.monotonic() - started
    assert result["ok"], result["steps"]
    print(f"recover-host of the project: RTO {result['rto_seconds']} s, whole run {took:.1f} s")
    ports, client = lost_host["ports"], lost_host["client"]
    keys = [f"session:{i}" for i in range(500)]
    assert client.mget(keys) == [f"value-{i}".encode() for i in range(500)]  # key for key
    loaded = next(s for s in result["steps"] if s["name"] == "what Redis loaded")
    assert loaded["detail"].startswith("Redis loaded 500 keys + 0 expired on load")
    assert healthy(ports["api"]) and healthy(ports["api"] + 1)  # both replicas
    project = next(s for s in result["steps"] if s["name"] == "check the project's services")
    assert "docker-compose.yml + docker-compose.override.yml" in project["detail"]
    assert "redis = cache" in project["detail"] and "gateway = api" in project["detail"]
    assert f'requirepass "{PASSWORD}"' in (target / "redis" / "redis.conf").read_text()
    config = [
        p for p in target.rglob("*") if p.is_file() and "data" not in p.relative_to(target).parts
    ]
    restored = "".join(p.read_text() for p in config)
    assert "<redacted>" not in restored
    api = docker.from_env().containers.get(f"{lost_host['name']}_api_1")
    assert api.exec_run(["printenv", "API_TOKEN"]).output.decode().strip() == API_TOKEN
    assert api.exec_run(["printenv", "MODE"]).output.decode().strip() == "enforce"  # override
    volume = docker.from_env().volumes.get(f"{lost_host['name']}_cachedata")
    assert (Path(volume.attrs["Mountpoint"]) / "dump.rdb").is_file()
    # Prometheus, running as nobody, has its old history back in a folder it can write.
    assert (target / "data" / "prometheus").stat().st_uid == NOBODY
    at = stack.PROMETHEUS_BACKFILL_START + 3600
    query = f'{stack.PROMETHEUS_BACKFILL_METRIC}{{series="s007"}}'
    answer = httpx.get(
        f"http://127.0.0.1:{ports['metrics']}/api/v1/query", params={"query": query, "time": at}
    ).json()["data"]["result"]
    assert [float(sample["value"][1]) for sample in answer] == [stack.backfill_value(7, at)]
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
    assert checklist["1. ASSESS"]["Notify stakeholders"]["outcome"] == "by hand"
    assert result["rpo_seconds"] is not None
