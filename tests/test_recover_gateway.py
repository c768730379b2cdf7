"""recover-gateway on throwaway gateway containers (never the sandbox's proxilion-gateway):
killed, failing its first start, poisoned so that only a recreate helps, failing even
when recreated, removed entirely (with and without a compose file), recreated by compose
while the original is kept aside; the report."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import tarfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from docker.types import Mount
from prefect.client.orchestration import get_client
from prefect_records import module_text
from redis_servers import RedisServer, free_port, running_redis

from flows.recover_gateway import recover_gateway
from flows.support.failures import StepFailed
from sandbox import constants as stack
from sandbox.images import host_mounts
from sandbox.stack import gateway_mounts
from tasks.common.certificates import verified
from tasks.docker.compose import compose_command

TEST_LABEL = "proxilion-dr.test-id"
TOKEN_PREFIX = "tok-recover-gateway-"
# The start script prints the token (as a careless gateway might): the report must not.
SAY_TOKEN = (
    'echo "gateway starting with token $GATEWAY_API_TOKEN (redis://gw:$GATEWAY_API_TOKEN@x)"'
)
RUN_GATEWAY = f"exec /usr/bin/python3 -u {stack.GATEWAY_CONTAINER_SCRIPT}"
# Fails its first start, then works: the restart is enough.
FIRST_START_FAILS = (
    "if [ ! -e /tmp/started-once ]; then touch /tmp/started-once; "
    "echo 'first start: config not ready' >&2; exit 3; fi"
)
# Leaves a lock file in the container's own filesystem that makes every restart fail:
# only a new container (from the same configuration) starts again.
STALE_LOCK = (
    "if [ -e /tmp/gateway.lock ]; then "
    "echo 'stale lock /tmp/gateway.lock: refusing to start' >&2; exit 4; fi; "
    "touch /tmp/gateway.lock"
)
ALWAYS_FAILS = "echo 'gateway: fatal: broken for good' >&2; exit 5"


class Gateway:
    """A throwaway gateway container: its name, port, secret token and Docker handle."""

    def __init__(self, name: str, port: int, token: str, client: docker.DockerClient) -> None:
        self.name, self.port, self.token, self.client = name, port, token, client
        self.url = f"http://127.0.0.1:{port}/health"

    def container(self) -> Any:
        return self.client.containers.get(self.name)

    def exists(self) -> bool:
        return bool(self.client.containers.list(all=True, filters={"name": f"^/{self.name}$"}))

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (
                    httpx.get(self.url, timeout=1, verify=verified()).json().get("status")
                    == "healthy"
                ):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        logs = self.container().logs().decode(errors="replace")
        pytest.fail(f"throwaway gateway {self.name} never became healthy:\n{logs}")

    def wait_exited(self) -> None:
        self.container().wait(timeout=30)

    def healthy(self) -> bool:
        return httpx.get(self.url, timeout=2, verify=verified()).json().get("status") == "healthy"


def gateway_environment(port: int, redis_port: int, token: str) -> dict[str, str]:
    return {
        **stack.GATEWAY_SETTINGS,
        "GATEWAY_API_TOKEN": token,
        "REDIS_HOST": "127.0.0.1",
        "REDIS_PORT": str(redis_port),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def start_script(before: str) -> str:
    return "; ".join(part for part in (SAY_TOKEN, before, RUN_GATEWAY) if part)


@pytest.fixture(scope="module")
def gateway_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The throwaway gateways' own Redis (never the sandbox's)."""
    with running_redis(tmp_path_factory.mktemp("gateway-redis")) as server:
        yield server


@pytest.fixture
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    try:
        client.images.get(stack.HOSTFS_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(
            f"image {stack.HOSTFS_IMAGE} missing: build it with `python -m sandbox up`",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture
def test_id(docker_client: docker.DockerClient) -> Iterator[str]:
    """A unique id; every container labelled with it is removed afterwards, then the
    images (an original kept aside from compose is committed to one, carrying its labels)."""
    ident = uuid.uuid4().hex[:10]
    yield ident
    for container in docker_client.containers.list(
        all=True, filters={"label": f"{TEST_LABEL}={ident}"}
    ):
        container.remove(force=True)
    for image in docker_client.images.list(filters={"label": f"{TEST_LABEL}={ident}"}):
        docker_client.images.remove(image.id, force=True)


@pytest.fixture
def make_gateway(
    docker_client: docker.DockerClient, gateway_redis: RedisServer, test_id: str
) -> Callable[..., Gateway]:
    """Start a gateway container (hostfs image, host network, sandbox/gateway.py on a
    free port) whose start script first runs `before`; `wait` for it to be healthy."""

    def make(
        before: str = "",
        wait: bool = True,
        restart_policy: str = "no",
        redis_port: int = 0,
        mounts: list[Mount] | None = None,
    ) -> Gateway:
        port, token = free_port(), TOKEN_PREFIX + uuid.uuid4().hex
        name = f"proxilion-dr-test-gateway-{test_id}"
        docker_client.containers.run(
            stack.HOSTFS_IMAGE,
            ["/bin/sh", "-c", start_script(before)],
            name=name,
            environment=gateway_environment(port, redis_port or gateway_redis.port, token),
            mounts=[*gateway_mounts(), *(mounts or [])],
            network_mode="host",
            labels={stack.SANDBOX_LABEL: "test-recover-gateway", TEST_LABEL: test_id},
            restart_policy={"Name": restart_policy},
            working_dir="/tmp",
            detach=True,
        )
        gateway = Gateway(name, port, token, docker_client)
        if wait:
            gateway.wait_healthy()
        return gateway

    return make


def set_aside(client: docker.DockerClient, name: str) -> list[str]:
    """Containers renamed aside from `name` and still there (listed without inspecting
    every container on the machine, which other engineers' runs keep busy)."""
    found = client.containers.list(all=True, sparse=True, filters={"name": f"^/{name}-replaced"})
    return [c.attrs["Names"][0] for c in found]


def recover(gateway: Gateway, **parameters: Any) -> dict[str, Any]:
    parameters.setdefault("deadline_seconds", 20)
    return recover_gateway(container=gateway.name, health_url=gateway.url, **parameters)


def step_names(result: dict[str, Any]) -> list[str]:
    return [step["name"] for step in result["steps"]]


def outcome(result: dict[str, Any], name: str) -> str:
    return next(step["outcome"] for step in result["steps"] if step["name"] == name)


def latest_report() -> str:
    with get_client(sync_client=True) as client:
        [artifact] = [a for a in client.read_latest_artifacts() if a.key == "recover-gateway"]
    return str(artifact.data)


# ------------------------------------------------------------------------ restart


def test_killed_gateway_is_restarted_and_healthy(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()
    before = gateway.container().id
    gateway.container().kill()  # SIGKILL: the gateway process dies, the container exits
    gateway.wait_exited()
    assert gateway.container().attrs["State"]["ExitCode"] == 137

    result = recover(gateway)

    assert result["ok"] and gateway.healthy()
    assert result["rto_seconds"] > 0 and result["rpo_seconds"] is None
    assert step_names(result) == [
        "inspect container",
        "restart container",
        "wait for /health after restart",
        "check /metrics",
    ]
    inspected = result["steps"][0]["detail"]
    assert "exited" in inspected and "exit code 137" in inspected and "OOM-killed no" in inspected
    assert gateway.container().id == before  # restarted, not replaced


def test_first_start_failure_is_fixed_by_the_restart(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(FIRST_START_FAILS, wait=False)
    gateway.wait_exited()
    before = gateway.container().id

    result = recover(gateway)

    assert result["ok"] and gateway.healthy()
    assert "exit code 3" in result["steps"][0]["detail"]
    assert not any(name.startswith("recreate") for name in step_names(result))
    assert gateway.container().id == before


def test_healthy_gateway_is_left_alone(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()
    started = gateway.container().attrs["State"]["StartedAt"]

    result = recover(gateway)

    assert result["ok"]
    assert step_names(result) == ["inspect container", "check /health", "check /metrics"]
    assert gateway.container().attrs["State"]["StartedAt"] == started  # not restarted


# ----------------------------------------------------------------------- recreate


def test_restart_is_not_enough_so_it_is_recreated_from_its_configuration(
    make_gateway: Callable[..., Gateway], docker_client: docker.DockerClient
) -> None:
    gateway = make_gateway(STALE_LOCK, restart_policy="on-failure")
    old = gateway.container().attrs
    gateway.container().kill()
    gateway.container().stop()  # on-failure may have restarted it into its failure loop

    result = recover(gateway, deadline_seconds=5)  # it restarts in a loop: never "exited"

    assert result["ok"] and gateway.healthy()
    assert outcome(result, "wait for /health after restart") == "unhealthy"
    assert outcome(result, "recreate container from its configuration") == "ok"
    assert outcome(result, "wait for /health after recreate") == "ok"
    new = gateway.container().attrs
    assert new["Id"] != old["Id"]
    for part, key in [
        ("Config", "Image"),
        ("Config", "Cmd"),
        ("Config", "Entrypoint"),
        ("Config", "Env"),
        ("Config", "Labels"),
        ("Config", "WorkingDir"),
        ("Config", "User"),
        ("HostConfig", "Mounts"),
        ("HostConfig", "NetworkMode"),
        ("HostConfig", "RestartPolicy"),
    ]:
        assert new[part][key] == old[part][key], f"{part}.{key} changed"
    assert set_aside(docker_client, gateway.name) == [], "removed once the new one is healthy"


def test_recreate_keeps_network_aliases_published_port_and_anonymous_volume(
    docker_client: docker.DockerClient, test_id: str
) -> None:
    """A gateway as compose would run it on a bridge: a user-defined network with an
    alias, its port published on 127.0.0.1, an anonymous volume holding a file."""
    network = docker_client.networks.create(
        f"proxilion-dr-test-{test_id}", labels={TEST_LABEL: test_id}
    )
    try:
        docker_client.containers.run(  # its Redis, reached by name on the network
            stack.HOSTFS_IMAGE,
            ["/usr/bin/redis-server", "--port", "6379", "--protected-mode", "no", "--save", ""],
            name=f"proxilion-dr-test-redis-{test_id}",
            mounts=host_mounts(),
            network=network.name,
            labels={stack.SANDBOX_LABEL: "test-recover-gateway", TEST_LABEL: test_id},
            detach=True,
        )
        port, token = free_port(), TOKEN_PREFIX + uuid.uuid4().hex
        environment = gateway_environment(8787, 6379, token)
        environment.update(GATEWAY_HOST="0.0.0.0", REDIS_HOST=f"proxilion-dr-test-redis-{test_id}")
        name = f"proxilion-dr-test-gateway-{test_id}"
        first_start = "[ -e /data/first ] || cat /proc/sys/kernel/random/uuid > /data/first"
        docker_client.containers.run(
            stack.HOSTFS_IMAGE,
            ["/bin/sh", "-c", start_script(f"{first_start}; {STALE_LOCK}")],
            name=name,
            environment=environment,
            mounts=[*gateway_mounts(), Mount(target="/data", source=None, type="volume")],
            network=network.name,
            ports={"8787/tcp": ("127.0.0.1", port)},
            labels={stack.SANDBOX_LABEL: "test-recover-gateway", TEST_LABEL: test_id},
            detach=True,
        )
        gateway = Gateway(name, port, token, docker_client)
        gateway.wait_healthy()
        docker_client.api.disconnect_container_from_network(name, network.name)
        docker_client.api.connect_container_to_network(name, network.name, aliases=["gateway"])
        old = gateway.container().attrs
        gateway.container().kill()

        result = recover(gateway, deadline_seconds=5)

        assert result["ok"] and gateway.healthy()
        assert outcome(result, "recreate container from its configuration") == "ok"
        new = gateway.container().attrs
        assert new["Id"] != old["Id"]
        assert new["HostConfig"]["PortBindings"] == old["HostConfig"]["PortBindings"]
        assert list(new["NetworkSettings"]["Networks"]) == [network.name]
        assert "gateway" in new["NetworkSettings"]["Networks"][network.name]["Aliases"]
        volume = {m["Destination"]: m.get("Name") for m in old["Mounts"]}["/data"]
        assert (
            volume and {m["Destination"]: m.get("Name") for m in new["Mounts"]}["/data"] == volume
        )
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{TEST_LABEL}={test_id}"}
        ):
            container.remove(force=True, v=True)
        network.remove()


def test_running_but_unhealthy_gateway_that_nothing_fixes_is_left_running_as_found(
    make_gateway: Callable[..., Gateway], docker_client: docker.DockerClient
) -> None:
    """Its Redis is gone: /health answers 503 whatever we do. The original container
    is back under its name and running, as it was found."""
    gateway = make_gateway(wait=False, redis_port=free_port())  # nothing listens there
    before = gateway.container().id

    with pytest.raises(StepFailed, match="original container is back under its name, now running"):
        recover(gateway, deadline_seconds=3)

    assert gateway.container().id == before and gateway.container().status == "running"
    assert set_aside(docker_client, gateway.name) == []
    report = latest_report()
    assert "| check /health | unhealthy |" in report and "HTTP 503" in report


def test_restart_not_enough_and_recreate_off_fails_naming_the_fix(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(STALE_LOCK)
    before = gateway.container().id
    gateway.container().kill()

    with pytest.raises(StepFailed, match="recreate is off.*recreate=true"):
        recover(gateway, recreate=False)

    assert gateway.container().id == before  # left as it was: restarted, exited again
    assert gateway.container().status == "exited"


def test_recreated_container_unhealthy_too_puts_the_original_back(
    make_gateway: Callable[..., Gateway], docker_client: docker.DockerClient
) -> None:
    gateway = make_gateway(ALWAYS_FAILS, wait=False)
    gateway.wait_exited()
    before = gateway.container().id

    with pytest.raises(StepFailed) as failed:
        recover(gateway)

    message = str(failed.value)
    assert "wait for /health after recreate" in message
    assert "original container is back under its name" in message
    assert gateway.container().id == before  # the very same container, not a new one
    assert set_aside(docker_client, gateway.name) == []
    report = latest_report()
    assert "broken for good" in report and "log lines of the recreated" in report


def test_docker_refusing_restart_and_recreate_leaves_the_original_as_found(
    make_gateway: Callable[..., Gateway], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """A bind mount's source directory is gone: Docker refuses to start the container,
    and a recreated one too. The report says the original is back, exited."""
    config = tmp_path / "gateway-config"
    config.mkdir()
    gateway = make_gateway(mounts=[Mount(target="/config", source=str(config), type="bind")])
    before = gateway.container().id
    gateway.container().stop()
    config.rmdir()

    with pytest.raises(StepFailed, match="docker refused to recreate") as failed:
        recover(gateway)

    assert "original container is back under its name, now exited" in str(failed.value)
    assert "| restart container | refused |" in latest_report()
    assert gateway.container().id == before and gateway.container().status == "exited"
    assert set_aside(docker_client, gateway.name) == []


# ----------------------------------------------------------------- removed entirely


def write_compose_project(
    directory: Path,
    name: str,
    port: int,
    redis_port: int,
    token: str,
    test_id: str,
    before: str = "",
) -> Path:
    """A compose project like production's: the gateway service, its secret in .env."""
    directory.mkdir(parents=True, exist_ok=True)
    volumes = [f"{m['Source']}:{m['Target']}:ro" for m in gateway_mounts()]  # all read-only
    environment = gateway_environment(port, redis_port, "${GATEWAY_API_TOKEN}")
    env_lines = "\n".join(f'      {k}: "{v}"' for k, v in environment.items())
    volume_lines = "\n".join(f"      - {v}" for v in volumes)
    compose = directory / "docker-compose.yml"
    compose.write_text(
        textwrap.dedent(
            """\
            version: "2.4"
            services:
              gateway:
                image: {image}
                container_name: {name}
                network_mode: host
                command: {command}
                environment:
            {env}
                volumes:
            {volumes}
                labels:
                  {sandbox}: test-recover-gateway
                  {test_label}: {test_id}
                restart: "no"
            """
        ).format(
            image=stack.HOSTFS_IMAGE,
            name=name,
            command=json.dumps(["/bin/sh", "-c", start_script(before).replace("$", "$$")]),
            env=env_lines,
            volumes=volume_lines,
            sandbox=stack.SANDBOX_LABEL,
            test_label=TEST_LABEL,
            test_id=test_id,
        )
    )
    (directory / ".env").write_text(
        f"COMPOSE_PROJECT_NAME=proxilion-dr-test-{test_id}\nGATEWAY_API_TOKEN={token}\n"
    )
    return compose


@pytest.fixture
def compose_gateway(
    tmp_path: Path, gateway_redis: RedisServer, docker_client: docker.DockerClient, test_id: str
) -> Callable[..., tuple[Gateway, Path]]:
    """A gateway defined by a compose project of its own; `up` starts it with compose."""

    def make(before: str = "", up: bool = True) -> tuple[Gateway, Path]:
        port, token = free_port(), TOKEN_PREFIX + uuid.uuid4().hex
        name = f"proxilion-dr-test-gateway-{test_id}"
        compose = write_compose_project(
            tmp_path / "proxilion", name, port, gateway_redis.port, token, test_id, before
        )
        gateway = Gateway(name, port, token, docker_client)
        if up:
            command = [*compose_command(), "-f", str(compose), "up", "-d"]
            subprocess.run(command, check=True, capture_output=True)
            gateway.wait_healthy()
        return gateway, compose

    return make


def test_removed_container_is_recreated_from_the_compose_file(
    compose_gateway: Callable[..., tuple[Gateway, Path]], test_id: str
) -> None:
    gateway, compose = compose_gateway()
    gateway.container().remove(force=True)
    assert not gateway.exists()

    result = recover(gateway, compose_file=str(compose))

    assert result["ok"] and gateway.healthy()
    assert outcome(result, "restart container") == "skipped"
    assert outcome(result, "recreate container from compose file") == "ok"
    labels = gateway.container().labels
    assert labels["com.docker.compose.project"] == f"proxilion-dr-test-{test_id}"
    assert labels["com.docker.compose.service"] == "gateway"
    assert gateway.token not in module_text()


def test_compose_service_that_a_restart_cannot_fix_is_recreated_by_compose(
    compose_gateway: Callable[..., tuple[Gateway, Path]],
) -> None:
    gateway, compose = compose_gateway(STALE_LOCK)
    before = gateway.container().id
    gateway.container().kill()

    result = recover(gateway, compose_file=str(compose))

    assert result["ok"] and gateway.healthy()
    assert outcome(result, "wait for /health after restart") == "unhealthy"
    assert outcome(result, "recreate container from compose file") == "ok"
    assert gateway.container().id != before
    assert gateway.container().labels["com.docker.compose.service"] == "gateway"


def test_container_made_outside_compose_is_moved_aside_for_the_compose_service(
    compose_gateway: Callable[..., tuple[Gateway, Path]],
    make_gateway: Callable[..., Gateway],
    docker_client: docker.DockerClient,
) -> None:
    old = make_gateway(STALE_LOCK)  # same name as the compose service's container_name
    old.container().kill()
    gateway, compose = compose_gateway(up=False)
    assert gateway.name == old.name

    result = recover(gateway, compose_file=str(compose))

    assert result["ok"] and gateway.healthy()
    assert gateway.container().labels["com.docker.compose.service"] == "gateway"
    assert set_aside(docker_client, gateway.name) == []


def test_removed_container_without_compose_file_fails_naming_the_fix(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway()
    gateway.container().remove(force=True)

    with pytest.raises(StepFailed, match=r"does not exist.*compose_file=") as failed:
        recover(gateway)

    assert "recreate container from its configuration" in str(failed.value)
    assert not gateway.exists()  # nothing was created


def test_dry_run_changes_nothing_and_checks_the_recreate_path(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway()
    gateway.container().kill()
    gateway.wait_exited()
    finished = gateway.container().attrs["State"]["FinishedAt"]

    result = recover(gateway, dry_run=True)

    assert result["ok"] and result["rto_seconds"] is None
    assert outcome(result, "restart container") == "planned"
    assert outcome(result, "check the recreate path") == "planned"
    assert "restart policy no" in result["steps"][-1]["detail"]
    container = gateway.container()
    assert container.status == "exited" and container.attrs["State"]["FinishedAt"] == finished


# ----------------------------------------------------- compose keeps the original

# Written into the container's own filesystem at its first start: only the original has it.
MARK_FIRST_START = "[ -e /tmp/first ] || cat /proc/sys/kernel/random/uuid > /tmp/first"


def read_file(container: docker.models.containers.Container, path: str) -> str:
    """A file of a container's filesystem (running or not), through the archive API."""
    stream, _ = container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.extractfile(tar.getmembers()[0])
        assert member is not None
        return member.read().decode()


def set_aside_images(client: docker.DockerClient, test_id: str) -> list[str]:
    found = client.images.list(filters={"label": f"{TEST_LABEL}={test_id}"})
    return [tag for image in found for tag in image.tags]


def compose_ids(compose: Path, service: str) -> list[str]:
    done = subprocess.run(
        [*compose_command(), "-f", str(compose), "ps", "-q", service],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_compose_recreate_that_fails_puts_the_original_back_as_it_was(
    compose_gateway: Callable[..., tuple[Gateway, Path]],
    gateway_redis: RedisServer,
    docker_client: docker.DockerClient,
    test_id: str,
) -> None:
    """The restart cannot help (stale lock in its filesystem); the compose file was
    edited since, into a gateway that never starts: compose's new container fails, and
    the original is back under its name, its own filesystem and configuration, still
    compose's container of the service."""
    gateway, compose = compose_gateway(f"{MARK_FIRST_START}; {STALE_LOCK}")
    original = gateway.container()
    first_start = read_file(original, "/tmp/first")
    original.kill()
    write_compose_project(
        compose.parent, gateway.name, gateway.port, gateway_redis.port, gateway.token, test_id,
        ALWAYS_FAILS,
    )  # fmt: skip

    with pytest.raises(StepFailed, match="wait for /health after recreate") as failed:
        recover(gateway, compose_file=str(compose), deadline_seconds=5)

    assert "original container is back under its name" in str(failed.value)
    back = gateway.container()
    assert read_file(back, "/tmp/first") == first_start, "not the original's filesystem"
    assert back.attrs["Config"]["Cmd"] == original.attrs["Config"]["Cmd"]
    assert back.attrs["Config"]["Env"] == original.attrs["Config"]["Env"]
    assert back.labels == original.labels
    assert back.status == "created"  # not running, as found (made again from its image)
    assert compose_ids(compose, "gateway") == [back.id], "compose no longer manages it"
    assert set_aside(docker_client, gateway.name) == []
    report = latest_report()
    assert f"docker inspect of {gateway.name} (kept aside)" in report
    assert original.attrs["Id"] in report and "GATEWAY_API_TOKEN=***" in report
    assert "stale lock /tmp/gateway.lock: refusing to start" in report
    assert "broken for good" in report  # the new container's last lines
    assert gateway.token not in module_text()


def test_compose_recreate_keeps_the_original_aside_until_the_new_one_is_healthy(
    compose_gateway: Callable[..., tuple[Gateway, Path]],
    docker_client: docker.DockerClient,
    test_id: str,
) -> None:
    gateway, compose = compose_gateway(STALE_LOCK)
    original = gateway.container()
    original.kill()

    result = recover(gateway, compose_file=str(compose))

    assert result["ok"] and gateway.healthy()
    assert gateway.container().id != original.id
    assert compose_ids(compose, "gateway") == [gateway.container().id]
    step = next(s for s in result["steps"] if s["name"] == "recreate container from compose file")
    assert step["outcome"] == "ok" and "kept aside as" in step["detail"]
    assert outcome(result, "wait for /health after recreate") == "ok"
    report = latest_report()
    assert f"docker inspect of {gateway.name} (kept aside)" in report
    assert original.id in report and "stale lock" in report
    assert set_aside(docker_client, gateway.name) == [], "removed once the new one is healthy"
    assert set_aside_images(docker_client, test_id) == []


# --------------------------------------------------------------- replicas (HA)

# A replica refuses to start while this file is in its own filesystem: only a new
# container (from the same configuration) starts again.
REFUSE_IF_STALE = (
    "if [ -e /tmp/stale ]; then echo 'stale state /tmp/stale: refusing to start' >&2; exit 4; fi"
)
REPLICAS = 3


class Replicas:
    """A compose project whose gateway service runs REPLICAS containers on a bridge
    network (each publishing 8787 on an ephemeral 127.0.0.1 port), with its own Redis."""

    def __init__(self, compose: Path, client: docker.DockerClient) -> None:
        self.compose, self.client = compose, client

    def containers(self) -> list[Any]:
        return sorted(
            (self.client.containers.get(i) for i in compose_ids(self.compose, "gateway")),
            key=lambda c: c.name,
        )

    def url(self, container: Any) -> str:
        container.reload()
        [binding] = container.attrs["NetworkSettings"]["Ports"]["8787/tcp"]
        return f"http://{binding['HostIp']}:{binding['HostPort']}/health"

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                if all(self.healthy(c) for c in self.containers()):
                    return
            time.sleep(0.1)
        pytest.fail("the throwaway replicas never all became healthy")

    def healthy(self, container: Any) -> bool:
        return (
            httpx.get(self.url(container), timeout=2, verify=verified()).json().get("status")
            == "healthy"
        )


@pytest.fixture
def replicas(
    tmp_path: Path, docker_client: docker.DockerClient, test_id: str
) -> Iterator[Replicas]:
    token = TOKEN_PREFIX + uuid.uuid4().hex
    volumes = [f"{m['Source']}:{m['Target']}:ro" for m in gateway_mounts()]
    labels = {stack.SANDBOX_LABEL: "test-recover-gateway", TEST_LABEL: test_id}
    environment = gateway_environment(8787, 6379, "${GATEWAY_API_TOKEN}")
    environment.update(GATEWAY_HOST="0.0.0.0", REDIS_HOST="redis")
    command = ["/bin/sh", "-c", start_script(REFUSE_IF_STALE).replace("$", "$$")]
    project = {
        "version": "2.4",
        "services": {
            "redis": {
                "image": stack.HOSTFS_IMAGE,
                "command": ["/usr/bin/redis-server", "--protected-mode", "no", "--save", ""],
                "volumes": volumes,
                "labels": labels,
            },
            "gateway": {
                "image": stack.HOSTFS_IMAGE,
                "command": command,
                "environment": environment,
                "ports": ["127.0.0.1::8787"],
                "volumes": volumes,
                "labels": labels,
                "depends_on": ["redis"],
                "scale": REPLICAS,
            },
        },
    }
    folder = tmp_path / "ha"
    folder.mkdir()
    compose = folder / "docker-compose.yml"
    compose.write_text(json.dumps(project))  # JSON is YAML
    (folder / ".env").write_text(
        f"COMPOSE_PROJECT_NAME=proxilion-dr-test-ha-{test_id}\nGATEWAY_API_TOKEN={token}\n"
    )
    up = [*compose_command(), "-f", str(compose), "up", "-d"]
    subprocess.run(up, check=True, capture_output=True)
    ha = Replicas(compose, docker_client)
    try:
        ha.wait_healthy()
        yield ha
    finally:
        down = [*compose_command(), "-f", str(compose), "down", "-v", "--remove-orphans"]
        subprocess.run(down, check=False, capture_output=True)


def make_stale(container: Any) -> None:
    """Put /tmp/stale into the container's own filesystem (the archive API)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("stale"), io.BytesIO(b""))
    container.put_archive("/tmp", data.getvalue())


def test_replicas_are_recovered_one_by_one_and_only_the_unhealthy_ones_touched(
    replicas: Replicas, docker_client: docker.DockerClient
) -> None:
    killed, stale, untouched = replicas.containers()
    started = untouched.attrs["State"]["StartedAt"]
    killed.kill()
    make_stale(stale)
    stale.kill()
    parameters = {
        "compose_file": str(replicas.compose),
        "service": "gateway",
        "health_url": "http://127.0.0.1:8787/health",  # the port inside each replica
        "deadline_seconds": 20,
    }

    planned = recover_gateway(**parameters, dry_run=True)

    assert planned["ok"] and [c.id for c in replicas.containers()] == [
        killed.id, stale.id, untouched.id
    ]  # fmt: skip
    assert outcome(planned, f"{killed.name}: restart container") == "planned"
    assert outcome(planned, f"{untouched.name}: check /health") == "ok"

    result = recover_gateway(**parameters)

    assert result["ok"], result
    now = replicas.containers()
    assert [c.name for c in now] == [killed.name, stale.name, untouched.name]
    assert now[0].id == killed.id, "a restart was enough"
    assert now[1].id != stale.id, "recreated from its configuration"
    assert now[2].id == untouched.id and now[2].attrs["State"]["StartedAt"] == started
    assert all(replicas.healthy(c) for c in now)
    assert set_aside(docker_client, stale.name) == []
    assert outcome(result, f"{killed.name}: wait for /health after restart") == "ok"
    assert outcome(result, f"{stale.name}: wait for /health after restart") == "unhealthy"
    assert outcome(result, f"{stale.name}: recreate container from its configuration") == "ok"
    assert outcome(result, f"{untouched.name}: check /health") == "ok"
    for replica in now:
        assert outcome(result, f"{replica.name}: check /metrics") == "ok"
    assert result["replicas"] == {
        killed.name: "restarted, healthy",
        stale.name: "recreated from its configuration, healthy",
        untouched.name: "healthy, untouched",
    }
    report = latest_report()
    assert all(f"| {c.name}: inspect container |" in report for c in now)
    assert "stale state /tmp/stale: refusing to start" in report


def test_one_replica_named_with_the_compose_file_is_refused_and_the_others_left_alone(
    replicas: Replicas, docker_client: docker.DockerClient
) -> None:
    """compose recreates every container of a service: recreating one replica that way
    would take every other replica down too."""
    first, stale, third = replicas.containers()
    make_stale(stale)
    stale.kill()

    with pytest.raises(StepFailed, match=r"compose would recreate them all.*service=gateway"):
        recover_gateway(
            container=stale.name,
            health_url="http://127.0.0.1:9/health",  # nothing there: the restart fails anyway
            compose_file=str(replicas.compose),
            deadline_seconds=5,
        )

    assert [c.id for c in replicas.containers()] == [first.id, stale.id, third.id]
    assert replicas.healthy(first) and replicas.healthy(third)
    assert set_aside(docker_client, stale.name) == []


# ------------------------------------------------------------------------- report


def test_report_has_the_log_tail_and_steps_and_no_secret(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(STALE_LOCK)
    gateway.container().kill()

    result = recover(gateway)

    assert result["ok"]
    report = latest_report()
    assert f"log lines of {gateway.name} (before recovery)" in report
    assert "gateway starting with token *** (redis://***@x)" in report  # redacted, not dropped
    for name in step_names(result):
        assert name in report
    assert "RTO measured" in report
    assert gateway.token not in module_text()
