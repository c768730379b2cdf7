"""Running on more than one machine: one Prefect server on PostgreSQL, a process
worker per host on the host's own work queue, each host's backups under its own prefix
of one bucket, as docs/operations.md's "Running on more than one machine" says.

A real `prefect server start` on a throwaway PostgreSQL cluster; hosts `host-a` and
`host-b`, each with its own Redis (a throwaway container), its deployments from
`python -m deployments yaml --host <host> --schedules-off` registered with `prefect
deploy --all` (schedules off: a run falling due would use settings the test did not
choose), and `prefect worker start --pool proxilion-dr --type process --work-queue
<host>` with that host's PROXILION_DR_* settings (the sandbox S3, prefix
`<test prefix>/<host>`). Runs are launched by hand through the deployments, as an
operator launches them: a backup-redis on each host, then a live recover-redis on
host-b from its S3 copy alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import boto3
import pytest
import redis
import yaml
from postgres_servers import running_postgres
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect_servers import (
    PREFECT,
    PrefectServer,
    api,
    prefect_env,
    running_prefect_server,
    stop_group,
)
from redis_servers import assert_same_keyspace, keyspace_snapshot
from throwaway_services import Service, redis_container

from deployments.__main__ import render_yaml
from deployments.hosts import for_host
from sandbox import constants as stack

REPO = Path(__file__).resolve().parent.parent
HOSTS = ("host-a", "host-b")
POOL = "proxilion-dr"
RUN_TIMEOUT = 240.0


def run_cli(server: PrefectServer, *args: str) -> str:
    """A `prefect` command against `server` from the repository; fails with its output."""
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args],
        cwd=REPO,
        env=prefect_env(server),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass
class Host:
    """A Docker host of the test: its Redis and the settings its worker runs with."""

    name: str
    redis: Service
    settings: dict[str, str]

    @property
    def s3_prefix(self) -> str:
        return self.settings["PROXILION_DR_S3_PREFIX"]


@contextmanager
def worker(server: PrefectServer, host: Host, log_path: Path) -> Iterator[None]:
    """`prefect worker start` on `host`'s work queue with its settings; its log's tail is
    printed when it stops."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"]
            + ["--work-queue", host.name, "--name", f"worker-{host.name}"],
            cwd=log_path.parent,
            env=prefect_env(server, PREFECT_WORKER_QUERY_SECONDS="1", **host.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield
    finally:
        # In full runs of the suite (never alone, even with -n 2) neither worker stops
        # on SIGTERM within 20 s, nor within 5; each log ends at "Received SIGINT".
        # Cause not found; no test here is about their shutdown: 2 s, then SIGKILL.
        stop_group(process, timeout=2.0)
        print(f"\n{log_path}:\n" + log_path.read_text(errors="replace")[-3000:])


@pytest.fixture
def two_hosts(tmp_path: Path, s3_prefix: str) -> Iterator[tuple[PrefectServer, dict[str, Host]]]:
    """The server on PostgreSQL, each host's deployments (schedules off), Redis and
    worker; each Redis holds sessions of its own host."""
    with ExitStack() as stack_:
        postgres = stack_.enter_context(running_postgres())
        server = stack_.enter_context(
            running_prefect_server(tmp_path / "prefect", database_url=postgres.prefect_url)
        )
        run_cli(server, "work-pool", "create", POOL, "--type", "process")
        hosts = {}
        for name in HOSTS:
            root = tmp_path / name
            root.mkdir()
            service = stack_.enter_context(redis_container(root))
            redis.Redis(port=service.port).mset({f"session:{name}:{i}": i for i in range(50)})
            host = Host(
                name,
                service,
                {
                    "PROXILION_DR_HOME": str(REPO),
                    "PROXILION_DR_BACKUP_DIR": str(root / "backups"),
                    "PROXILION_DR_REDIS_URL": service.url,
                    "PROXILION_DR_REDIS_CONTAINER": service.name,
                    "PROXILION_DR_S3_BUCKET": stack.S3_BUCKET,
                    "PROXILION_DR_S3_PREFIX": f"{s3_prefix}/{name}",
                    "PROXILION_DR_S3_ENDPOINT_URL": stack.S3_ENDPOINT,
                },
            )
            stack_.enter_context(worker(server, host, root / "worker.log"))
            (root / "prefect.yaml").write_text(for_host(render_yaml(schedules_on=False), name))
            hosts[name] = host
        # Both hosts register at once, while their workers start (they poll until runs come).
        files = [tmp_path / name / "prefect.yaml" for name in HOSTS]
        with ThreadPoolExecutor() as registering:
            list(
                registering.map(
                    lambda f: run_cli(server, "deploy", "--all", "--prefect-file", str(f)), files
                )
            )
        yield server, hosts


def launch(deployment: str, **parameters: object) -> UUID:
    """A run of `deployment` launched by hand, as `prefect deployment run` does."""
    return run_deployment(deployment, parameters=parameters, timeout=0).id


def finished(run_id: UUID) -> FlowRun:
    """The run once in a final state, or fail after RUN_TIMEOUT."""
    deadline = time.monotonic() + RUN_TIMEOUT
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                pytest.fail(f"{run.name} did not finish within {RUN_TIMEOUT:.0f} s: {run.state}")
            time.sleep(1)


def s3_keys(prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    listing = s3.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=prefix + "/")
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_each_host_backs_up_to_its_prefix_and_recovers_through_its_worker(
    two_hosts: tuple[PrefectServer, dict[str, Host]],
) -> None:
    server, hosts = two_hosts
    a, b = hosts["host-a"], hosts["host-b"]
    with api(server):
        backups = {name: launch(f"backup-redis/every-6-hours-{name}") for name in HOSTS}
        for name, run_id in backups.items():
            run = finished(run_id)
            assert run.state.is_completed(), (name, run.state)
            assert run.work_queue_name == name
        for host in (a, b):
            stored = [k for k in s3_keys(host.s3_prefix) if k.endswith(".rdb.gz")]
            assert len(stored) == 1 and stored[0].startswith(f"{host.s3_prefix}/redis/")
            assert f"{stored[0]}.manifest.json" in s3_keys(host.s3_prefix)

        backed_up = {host.name: keyspace_snapshot(host.redis.url) for host in (a, b)}
        for host in (a, b):  # written after the backups: gone after host-b's restore only
            live = redis.Redis(port=host.redis.port)
            live.set("written:after-backup", host.name)
            live.delete(f"session:{host.name}:0")
            live.close()
        shutil.rmtree(b.settings["PROXILION_DR_BACKUP_DIR"])  # host-b restores from S3
        recovery = finished(launch("recover-redis/redis-data-lost-host-b", dry_run=False))

    assert recovery.state.is_completed(), recovery.state
    assert recovery.work_queue_name == "host-b"
    # host-b holds its own backup (from its prefix: its local copy is gone), host-a its data
    assert_same_keyspace(backed_up["host-b"], keyspace_snapshot(b.redis.url))
    edited = {(0, b"session:host-a:0"), (0, b"written:after-backup")}  # deleted, written
    assert set(keyspace_snapshot(a.redis.url)) == set(backed_up["host-a"]) ^ edited


def compose_config(deploy: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` of `deploy`/compose.yaml with every profile, `env` set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PROXILION_", "PREFECT_"))}
    return subprocess.run(
        ["docker-compose", "-f", str(deploy / "compose.yaml")]
        + ["--profile", "server", "--profile", "register", "config"],
        env={**clean, **env},
        cwd=deploy,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_production_compose_file_is_valid_and_names_what_is_missing(tmp_path: Path) -> None:
    # A copy beside the example env file filled in, as an operator does on a host.
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    shutil.copy(REPO / "deploy" / "compose.yaml", deploy)
    shutil.copy(REPO / "deploy" / "proxilion-dr.env.example", deploy / "proxilion-dr.env")
    good = compose_config(
        deploy,
        PROXILION_DR_HOST="db-1",
        PROXILION_DR_S3_PREFIX="proxilion/db-1",
        PREFECT_DB_PASSWORD="x",
    )
    assert good.returncode == 0, good.stderr
    config = yaml.safe_load(good.stdout)
    assert set(config["services"]) == {"postgres", "prefect-server", "worker", "register"}
    worker = config["services"]["worker"]
    assert worker["environment"]["PROXILION_DR_HOST"] == "db-1"
    assert any("/var/run/docker.sock" in str(v) for v in worker["volumes"])
    assert "postgresql+asyncpg://" in str(config["services"]["prefect-server"]["environment"])
    missing = compose_config(deploy, PREFECT_DB_PASSWORD="x")
    assert missing.returncode != 0
    assert "name this Docker host" in missing.stderr, missing.stderr
