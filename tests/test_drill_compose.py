"""verify-restore brings the restored compose project up, isolated from the live stack.

The sandbox's own project (host networking, fixed ports 6379/8787/9090/9091, fixed
container names, data under ./data) is backed up with backup-config and brought up by
the drill while the live sandbox stack runs on the same ports: the live containers
must stay as they were. A project whose service exits fails the drill naming it; a
killed drill's compose project is removed by the next drill."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import redis as redis_py
import yaml
from conftest import require
from test_verify_restore import drill_report

from flows.backup_config import backup_config
from flows.verify_restore import DrillFailed, verify_restore
from sandbox import constants as stack
from tasks.docker.compose import PROJECT_LABEL
from tasks.drill import compose as drill_compose
from tasks.drill.scratch import DRILL_DIR_LABEL, DRILL_LABEL

LIVE = (
    stack.REDIS_CONTAINER,
    stack.GATEWAY_CONTAINER,
    stack.PROMETHEUS_CONTAINER,
    stack.PUSHGATEWAY_CONTAINER,
)
# The project's files as backup-config takes them; never its data or .env.
PROJECT_FILES = ("docker-compose.yml", "prometheus.yml", "alerts.yml", "proxilion-dr-alerts.yml")
PROJECT_DIRS = ("grafana", "redis")


def live_containers() -> dict[str, tuple[str, str]]:
    """Each live sandbox container's id and start time (inspecting one waits while
    another engineer's backup streams an archive out of it: a long timeout)."""
    client = docker.from_env(timeout=600)
    found = {}
    for name in LIVE:
        attrs = client.containers.get(name).attrs
        found[name] = (attrs["Id"], attrs["State"]["StartedAt"])
    return found


def drill_projects() -> set[str]:
    """Compose projects that drill containers belong to."""
    listed = docker.from_env().containers.list(all=True, filters={"label": DRILL_LABEL})
    return {c.labels[PROJECT_LABEL] for c in listed if PROJECT_LABEL in c.labels}


def copy_project(target: Path, edit: Any = None) -> Path:
    """The sandbox project's config files (not its data, not .env) in `target`; `edit`
    changes the parsed compose file."""
    for name in PROJECT_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stack.PROJECT_DIR / name, target / name)
    for name in PROJECT_DIRS:
        shutil.copytree(stack.PROJECT_DIR / name, target / name)
    if edit is not None:
        compose = yaml.safe_load((target / "docker-compose.yml").read_text())
        edit(compose)
        (target / "docker-compose.yml").write_text(yaml.safe_dump(compose, sort_keys=False))
    return target


def config_backup(project: Path, backups: Path) -> dict[str, Any]:
    return backup_config(
        project_dir=str(project),
        env_container=stack.GATEWAY_CONTAINER,
        backup_dir=str(backups),
        s3_bucket="",
    )


@pytest.fixture(scope="module")
def sandbox_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A config backup of the live sandbox project itself (read only); its backup dir."""
    require(stack.REDIS_HOST, stack.REDIS_PORT, "the sandbox Redis")
    backups = tmp_path_factory.mktemp("drill-compose") / "backups"
    manifest = config_backup(stack.PROJECT_DIR, backups)
    assert "docker-compose.yml" in manifest["source"]["files"]
    yield backups


def drill_config(backups: Path, tmp_path: Path) -> dict[str, Any]:
    return verify_restore(
        components=["config"],
        backup_dir=str(backups),
        s3_bucket="",
        scratch_dir=str(tmp_path / "scratch"),
        start_timeout_seconds=60.0,
    )


def test_the_sandbox_projects_config_backup_runs_beside_the_live_stack(
    sandbox_config: Path, tmp_path: Path
) -> None:
    before = live_containers()

    result = drill_config(sandbox_config, tmp_path)

    steps = {s["name"]: s for s in result["components"]["config"]["steps"]}
    assert all(s["outcome"] == "ok" for s in steps.values()), steps
    up = steps["bring up the restored project (isolated)"]["detail"]
    assert "services gateway, prometheus, pushgateway, redis" in up
    assert "placeholders for GATEWAY_API_TOKEN" in up
    assert "container_name dropped" in up and "private namespace" in up
    assert steps["every service of the restored project up"]["detail"] == "4 of 4 up"
    # each service listens on its fixed port, in the drill's namespace, not the host's
    for service, port in [
        ("redis", stack.REDIS_PORT),
        ("gateway", stack.GATEWAY_PORT),
        ("prometheus", stack.PROMETHEUS_PORT),
        ("pushgateway", stack.PUSHGATEWAY_PORT),
    ]:
        evidence = steps[f"service {service} up"]["detail"]
        assert f"listening on 127.0.0.1:{port}" in evidence, evidence
        assert "proxilion-dr-drill-" in evidence  # compose's name, not the live one

    assert live_containers() == before  # not stopped, restarted or recreated
    assert redis_py.Redis.from_url(stack.REDIS_URL).ping()
    assert not drill_projects()  # `down -v` in the finally
    assert not any((tmp_path / "scratch").iterdir())
    report = drill_report()
    assert "service redis up" in report
    assert stack.GATEWAY_SECRET_ENV["GATEWAY_API_TOKEN"] not in report


def test_a_restored_project_whose_service_exits_fails_the_drill_naming_it(
    tmp_path: Path,
) -> None:
    def break_pushgateway(compose: dict[str, Any]) -> None:
        compose["services"]["pushgateway"]["command"].append("--no-such-flag")
        compose["services"]["redis"]["healthcheck"] = {
            "test": ["CMD", "/usr/bin/redis-cli", "ping"],
            "interval": "1s",
        }

    project = copy_project(tmp_path / "project", break_pushgateway)
    config_backup(project, tmp_path / "backups")

    with pytest.raises(DrillFailed) as failed:
        drill_config(tmp_path / "backups", tmp_path)

    message = str(failed.value)
    assert "config: step 'every service of the restored project up' failed" in message
    assert "3 of 4 up: pushgateway exited (exit code" in message
    report = drill_report()
    assert "service pushgateway up | failed" in report
    assert "log lines of service pushgateway" in report and "no-such-flag" in report
    assert "docker health healthy" in report  # redis: its healthcheck passed
    assert not drill_projects()


def test_a_one_shot_service_that_completed_is_up_and_a_stray_exit_is_not(
    tmp_path: Path,
) -> None:
    """`migrate` runs once before the gateway (compose waits for it to complete): its
    exit 0 is its success. `stray` exits 0 too, but nothing waits for it: a service
    that stops is down, whatever its exit code."""

    def add_jobs(compose: dict[str, Any]) -> None:
        like = compose["services"]["pushgateway"]
        job = {"image": like["image"], "network_mode": "host", "restart": "no"}
        job |= {"volumes": ["/usr:/usr:ro"], "command": ["/usr/bin/true"]}
        compose["services"]["migrate"] = dict(job)
        compose["services"]["stray"] = dict(job)
        compose["services"]["gateway"]["depends_on"] = {
            "redis": {"condition": "service_started"},
            "migrate": {"condition": "service_completed_successfully"},
        }

    project = copy_project(tmp_path / "project", add_jobs)
    config_backup(project, tmp_path / "backups")

    with pytest.raises(DrillFailed) as failed:
        drill_config(tmp_path / "backups", tmp_path)

    assert "5 of 6 up: stray exited (exit code 0, restarts 0)" in str(failed.value)
    report = drill_report()
    assert "service migrate up | ok" in report
    assert "completed: exited 0 (a one-shot service another waits for)" in report
    assert "service gateway up | ok" in report
    assert not drill_projects()


def test_a_restored_project_that_cannot_be_brought_up_fails_the_drill_saying_why(
    tmp_path: Path,
) -> None:
    """The image of a service is not on this host (and no registry can be reached)."""

    def gone_image(compose: dict[str, Any]) -> None:
        compose["services"]["pushgateway"]["image"] = "proxilion-dr/no-such-image:1"

    project = copy_project(tmp_path / "project", gone_image)
    config_backup(project, tmp_path / "backups")

    with pytest.raises(DrillFailed) as failed:
        drill_config(tmp_path / "backups", tmp_path)

    message = str(failed.value)
    assert "\n" not in message
    assert "config: step 'bring up the restored project (isolated)' failed" in message
    assert "`up` of the restored project proxilion-dr-drill-" in message
    assert "no-such-image" in message
    assert not drill_projects()
    assert not any((tmp_path / "scratch").iterdir())


def test_a_killed_drills_compose_project_is_removed_by_the_next(
    sandbox_config: Path, tmp_path: Path
) -> None:
    """A drill killed while its compose project ran: the project's containers, network
    and scratch folder remain, found by their label."""
    killed = tmp_path / "scratch" / "drill-killed"
    folder = copy_project(killed / "config" / "project")
    project = drill_compose.prepare(folder, killed, {}, ["GATEWAY_API_TOKEN"])
    drill_compose.up(project, 120.0)
    assert drill_projects() == {project.name}
    network = f"{project.name}_default"
    assert docker.from_env().networks.list(names=[network])

    result = drill_config(sandbox_config, tmp_path)

    assert result["ok"]
    assert any(project.name in note and str(killed) in note for note in result["notes"])
    assert network in " ".join(result["notes"])
    assert not drill_projects()
    assert not docker.from_env().networks.list(names=[network])
    assert not killed.exists()


def test_the_derivation_isolates_every_way_a_project_reaches_the_host(tmp_path: Path) -> None:
    """`isolate` on a resolved config (as `docker-compose config` prints it) of a bridge
    project: published ports, a read-write host path, external network and volume."""
    live_data = tmp_path / "live-data"
    live_data.mkdir()
    (live_data / "keep").write_text("live")
    config = {
        "version": "2.4",
        "services": {
            "web": {
                "image": "web:1",
                "container_name": "web",
                "ports": [{"published": 8787, "target": 8787}, "127.0.0.1:9000:9000/udp"],
                "volumes": [
                    f"{live_data}:/data:rw",
                    "/usr:/usr:ro",
                    f"{tmp_path / 'project' / 'conf'}:/conf:rw",
                    "cache:/cache:rw",
                ],
                "networks": {"front": None},
                "labels": {"traefik.enable": "true"},
            },
            "worker": {"image": "worker:1", "network_mode": "bridge", "ports": ["9100:9100"]},
        },
        "networks": {"front": {"external": True, "name": "front"}},
        "volumes": {"cache": {"external": True, "name": "live_cache"}},
    }
    folder = tmp_path / "project"

    derived, changes, holder = drill_compose.isolate(config, folder, "proxilion-dr-drill-t", "/x")

    web = derived["services"]["web"]
    assert holder is None and "container_name" not in web
    assert web["ports"] == ["127.0.0.1::8787/tcp", "127.0.0.1::9000/udp"]
    redirected = folder / ".drill-mounts" / str(live_data).lstrip("/")
    assert web["volumes"] == [
        f"{redirected}:/data:rw",
        "/usr:/usr:ro",
        f"{folder / 'conf'}:/conf:rw",
        "cache:/cache:rw",
    ]
    assert redirected.is_dir() and not (redirected / "keep").exists()  # live data not copied
    assert web["labels"] == {DRILL_LABEL: "proxilion-dr-drill-t", DRILL_DIR_LABEL: "/x"}
    assert derived["networks"]["front"] == {"labels": web["labels"], "internal": True}
    assert derived["networks"]["default"]["internal"]
    assert derived["volumes"]["cache"] == {"labels": web["labels"]}
    worker = derived["services"]["worker"]
    assert "network_mode" not in worker and worker["ports"] == ["127.0.0.1::9100/tcp"]
    assert any("read-write" in c for c in changes)
    assert any("external network front" in c for c in changes)


def test_joining_a_live_containers_namespace_is_refused() -> None:
    config = {"services": {"sidecar": {"image": "x", "network_mode": "container:proxilion-redis"}}}
    with pytest.raises(drill_compose.DrillComposeError) as refused:
        drill_compose.isolate(config, Path("/tmp/p"), "proxilion-dr-drill-t", "/x")
    assert "sidecar" in str(refused.value) and "container:proxilion-redis" in str(refused.value)


def test_host_networking_becomes_one_private_namespace(tmp_path: Path) -> None:
    config = {
        "services": {
            "redis": {
                "image": "hostfs",
                "network_mode": "host",
                "ports": ["6379:6379"],
                "volumes": ["/usr:/usr:ro", "/srv/redis:/data:rw"],
            },
            "exporter": {"image": "exp", "network_mode": "service:redis"},
        }
    }
    derived, changes, holder = drill_compose.isolate(config, tmp_path, "proxilion-dr-drill-t", "/x")

    services = derived["services"]
    assert holder == drill_compose.HOLDER
    assert services["redis"]["network_mode"] == f"service:{holder}"
    assert services["exporter"]["network_mode"] == f"service:{holder}"
    assert "ports" not in services["redis"]
    assert services[holder]["entrypoint"][0] == "sleep"
    assert services[holder]["volumes"] == ["/usr:/usr:ro"]  # its programs, never data
    assert "labels" in derived["networks"]["default"]


def test_a_drill_with_another_scratch_root_keeps_its_project_running(
    sandbox_config: Path, tmp_path: Path
) -> None:
    """Two drills with different scratch roots may run at once (the lock is per root):
    one's start must not remove what the other is running."""
    running = tmp_path / "other-root" / "drill-running"
    folder = copy_project(running / "config" / "project")
    project = drill_compose.prepare(folder, running, {}, ["GATEWAY_API_TOKEN"])
    try:
        drill_compose.up(project, 120.0)

        result = drill_config(sandbox_config, tmp_path)

        assert result["ok"] and not result["notes"]
        assert project.name in drill_projects()
        assert folder.is_dir()
    finally:
        assert drill_compose.down(project) is None
    assert project.name not in drill_projects()
