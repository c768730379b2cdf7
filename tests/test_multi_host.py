"""Running on more than one machine: a Prefect server on PostgreSQL and a process
worker on a host's own work queue run the deployments, as docs/operations.md's
"Running on more than one machine" says.

A real `prefect server start` on a throwaway PostgreSQL cluster; the host's
deployments from `python -m deployments yaml --host host-a`, registered with
`prefect deploy --all`; `prefect worker start --pool proxilion-dr --type process
--work-queue host-a` with the host's PROXILION_DR_* settings (backups to the sandbox
S3 under the host's own prefix). Two runs go through the worker: a backup-redis
fired by a schedule (the server's scheduler creates the run, nobody launches it)
and a recover-redis dry run launched by hand with `prefect deployment run`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import boto3
import pytest
import redis
import yaml
from postgres_servers import running_postgres
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.schedules import RRuleSchedule
from prefect_servers import (
    PREFECT,
    PrefectServer,
    api,
    prefect_env,
    running_prefect_server,
    stop_group,
)
from throwaway_services import Service, redis_container

from deployments.__main__ import render_yaml
from deployments.hosts import for_host
from sandbox import constants as stack

REPO = Path(__file__).resolve().parent.parent
HOST = "host-a"
POOL = "proxilion-dr"
RUN_TIMEOUT = 240.0


def run_cli(server: PrefectServer, *args: str, env: dict[str, str] | None = None) -> str:
    """A `prefect` command against `server` from the repository; fails with its output."""
    done = subprocess.run(
        [PREFECT, "--no-prompt", *args],
        cwd=REPO,
        env=env or prefect_env(server),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def worker_host(
    tmp_path: Path, s3_prefix: str
) -> Iterator[tuple[PrefectServer, Service, dict[str, str]]]:
    """Server on PostgreSQL, host-a's deployments, its worker; yields the server, the
    throwaway Redis the worker backs up and the worker's settings."""
    with (
        running_postgres() as postgres,
        running_prefect_server(
            tmp_path / "prefect",
            database_url=postgres.prefect_url,
            PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
        ) as server,
        redis_container(tmp_path) as service,
    ):
        redis.Redis(port=service.port).mset({f"session:{i}": f"s{i}" for i in range(50)})
        host_yaml = tmp_path / "prefect-host-a.yaml"
        host_yaml.write_text(for_host(render_yaml(), HOST))
        run_cli(server, "work-pool", "create", POOL, "--type", "process")
        settings = {
            "PROXILION_DR_HOME": str(REPO),
            "PROXILION_DR_BACKUP_DIR": str(tmp_path / "backups"),
            "PROXILION_DR_REDIS_URL": f"redis://127.0.0.1:{service.port}/0",
            "PROXILION_DR_REDIS_CONTAINER": service.name,
            "PROXILION_DR_S3_BUCKET": stack.S3_BUCKET,
            "PROXILION_DR_S3_PREFIX": f"{s3_prefix}/{HOST}",
            "PROXILION_DR_S3_ENDPOINT_URL": stack.S3_ENDPOINT,
        }
        worker_log = tmp_path / "worker.log"
        with worker_log.open("wb") as log:
            worker = subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"]
                + ["--work-queue", HOST, "--name", f"worker-{HOST}"],
                cwd=tmp_path,
                env=prefect_env(server, PREFECT_WORKER_QUERY_SECONDS="2", **settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            # Registered while the worker starts: it polls its queue until runs come.
            run_cli(server, "deploy", "--all", "--prefect-file", str(host_yaml))
            yield server, service, settings
        finally:
            stop_group(worker)
            print(f"\nworker log: {worker_log}\n" + worker_log.read_text(errors="replace")[-3000:])


def deployment_id(name: str) -> UUID:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name).id


def wait_for_run(deployment: UUID, started_after: datetime, what: str) -> FlowRun:
    """The run of `deployment` created after `started_after` and due now (not one the
    catalog's own schedules put hours ahead), once final."""
    deadline = time.monotonic() + RUN_TIMEOUT
    runs: list[FlowRun] = []
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = [
                r
                for r in client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment]))
                )
                if r.created
                and r.created >= started_after
                and r.expected_start_time
                and r.expected_start_time < datetime.now(UTC) + timedelta(minutes=1)
            ]
            if runs and runs[0].state and runs[0].state.is_final():
                return runs[0]
            time.sleep(1)
    pytest.fail(f"{what} did not finish within {RUN_TIMEOUT:.0f} s: {runs}", pytrace=False)


def test_scheduled_backup_and_manual_recovery_go_through_the_host_worker(
    worker_host: tuple[PrefectServer, Service, dict[str, str]],
) -> None:
    server, _service, settings = worker_host
    started = datetime.now(UTC) - timedelta(seconds=1)
    with api(server):
        backup = deployment_id(f"backup-redis/every-6-hours-{HOST}")
        # far enough ahead that the scheduler (every 5 s here) sees it before it is due:
        # an occurrence already past when the scheduler looks is never created
        fire_at = (datetime.now(UTC) + timedelta(seconds=20)).strftime("%Y%m%dT%H%M%SZ")
        with get_client(sync_client=True) as client:
            client.create_deployment_schedules(
                backup,
                [(RRuleSchedule(rrule=f"DTSTART:{fire_at}\nRRULE:FREQ=DAILY;COUNT=1"), True)],
            )
        scheduled = wait_for_run(backup, started, "the scheduled backup-redis")
        assert scheduled.auto_scheduled, "the backup run was not created by the schedule"
        assert scheduled.state.is_completed(), scheduled.state
        assert scheduled.work_queue_name == HOST

        run_cli(
            server,
            "deployment",
            "run",
            f"recover-redis/redis-data-lost-{HOST}",
            "--param",
            "dry_run=true",
        )
        recovery = wait_for_run(
            deployment_id(f"recover-redis/redis-data-lost-{HOST}"), started, "recover-redis"
        )
        assert recovery.state.is_completed(), recovery.state
        assert recovery.work_queue_name == HOST
        assert not recovery.auto_scheduled

    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    keys = [
        o["Key"]
        for o in s3.list_objects_v2(
            Bucket=stack.S3_BUCKET, Prefix=settings["PROXILION_DR_S3_PREFIX"] + "/"
        ).get("Contents", [])
    ]
    stored = [k for k in keys if k.endswith(".rdb.gz")]
    assert len(stored) == 1 and stored[0].startswith(f"{settings['PROXILION_DR_S3_PREFIX']}/redis/")
    assert any(k.startswith(stored[0]) and k != stored[0] for k in keys), keys  # its manifest


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
