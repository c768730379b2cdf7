"""Throwaway service containers for recovery tests: built like the sandbox's (local
hostfs image, host networking, the host's /usr and /etc read-only), but each with a
unique name, a free port, its own data and config folders, a label, and removed
when the test ends. The shared sandbox containers are never touched.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
import redis
from docker.types import Mount
from redis_servers import free_port

from sandbox import constants as stack
from sandbox import images
from tasks.common.certificates import verified

TEST_LABEL = "proxilion-dr.test"
START_TIMEOUT = 45.0
PORT_ATTEMPTS = 5
PORT_TAKEN = "address already in use"  # Redis's and Prometheus's bind error


@dataclass
class Service:
    """A throwaway container running a service on 127.0.0.1:`port`."""

    name: str
    port: int
    url: str
    data_dir: Path
    conf_dir: Path

    def container(self) -> docker.models.containers.Container:
        return docker.from_env().containers.get(self.name)


def wait_for(probe: Callable[[], bool], what: str, service: Service) -> None:
    if not _came_up(probe, service):
        pytest.fail(f"{what} in {service.name} exited: port {service.port} was taken")


def _came_up(probe: Callable[[], bool], service: Service) -> bool:
    """Poll `probe` until it answers (True); False when the container exited because
    its port was taken meanwhile (another process bound it after free_port())."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if probe():
                return True
        container = service.container()
        if container.status == "exited":
            if PORT_TAKEN in container.logs(tail=30).decode(errors="replace").lower():
                return False
            break
        time.sleep(0.1)
    logs = service.container().logs(tail=30).decode(errors="replace")
    pytest.fail(f"{service.name} did not come up:\n{logs}")


@contextmanager
def throwaway(
    tmp_path: Path,
    kind: str,
    command: Callable[[int], list[str]],
    inner_data: str,
    configure: Callable[[Service], None],
    ready: Callable[[Service], bool],
) -> Iterator[Service]:
    """A started container of `kind` running `command(port)`, data at `inner_data`
    bind-mounted from `<tmp_path>/<kind>-data`, config folder at /conf from
    `<tmp_path>/<kind>-conf` (`configure(service)` writes it before each start), once
    `ready`; on another free port when the first was taken before it bound it."""
    client = docker.from_env()
    image = images.ensure_hostfs_image(client)
    data, conf = tmp_path / f"{kind}-data", tmp_path / f"{kind}-conf"
    data.mkdir(exist_ok=True)
    conf.mkdir(exist_ok=True)
    for _attempt in range(PORT_ATTEMPTS):
        port = free_port()
        name = f"proxilion-dr-test-{kind}-{uuid.uuid4().hex[:8]}"
        container = client.containers.create(
            image,
            command(port),
            name=name,
            mounts=images.host_mounts()
            + [Mount(inner_data, str(data), type="bind"), Mount("/conf", str(conf), type="bind")],
            network_mode="host",
            labels={stack.SANDBOX_LABEL: "test-throwaway", TEST_LABEL: kind},
            restart_policy={"Name": "no"},
        )
        service = Service(name, port, f"127.0.0.1:{port}", data, conf)
        try:
            configure(service)
            container.start()
            up = _came_up(lambda s=service: ready(s), service)
        except BaseException:
            container.remove(force=True)
            raise
        if up:
            break
        container.remove(force=True)
    else:
        pytest.fail(f"no free port for a throwaway {kind} in {PORT_ATTEMPTS} tries")
    try:
        yield service
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


def redis_ready(service: Service) -> bool:
    client = redis.Redis(port=service.port, socket_timeout=2)
    try:
        return int(client.info("persistence")["loading"]) == 0
    finally:
        client.close()


@contextmanager
def redis_container(
    tmp_path: Path, appendonly: bool = False, extra: tuple[str, ...] = ()
) -> Iterator[Service]:
    """Redis 7 in a throwaway container, config in /conf/redis.conf (save points on;
    `extra` config lines appended)."""

    def command(port: int) -> list[str]:
        return ["/usr/bin/redis-server", "/conf/redis.conf"]

    def configure(service: Service) -> None:
        service.url = f"redis://127.0.0.1:{service.port}/0"
        (service.conf_dir / "redis.conf").write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {service.port}",
                    "dir /data",
                    "dbfilename dump.rdb",
                    "save 900 1 300 10",
                    f"appendonly {'yes' if appendonly else 'no'}",
                    'logfile ""',
                    *extra,
                    "",
                ]
            )
        )

    with throwaway(tmp_path, "redis", command, "/data", configure, redis_ready) as service:
        yield service


def restart(service: Service, ready: Callable[[Service], bool]) -> None:
    """Restart the container (graceful stop, start) and wait until it is ready."""
    service.container().restart(timeout=30)
    wait_for(lambda: ready(service), service.name, service)


def prometheus_ready(service: Service) -> bool:
    return httpx.get(f"{service.url}/-/ready", timeout=2, verify=verified()).status_code == 200


@contextmanager
def prometheus_container(
    tmp_path: Path,
    before_start: Callable[[Path], None],
    retention: str | None = stack.PROMETHEUS_RETENTION,
) -> Iterator[Service]:
    """Prometheus 2 in a throwaway container (admin API on, long retention unless
    `retention` says otherwise, None: no retention flag; scraping nothing), its TSDB at
    /prometheus; `before_start(data_dir)` runs before it starts."""

    def command(port: int) -> list[str]:
        flags = [f"--storage.tsdb.retention.time={retention}"] if retention else []
        return [
            "/usr/bin/prometheus",
            "--config.file=/conf/prometheus.yml",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-admin-api",
            "--storage.tsdb.path=/prometheus",
            *flags,
        ]

    def configure(service: Service) -> None:
        service.url = f"http://127.0.0.1:{service.port}"
        (service.conf_dir / "prometheus.yml").write_text("scrape_configs: []\n")

    data = tmp_path / "prometheus-data"
    data.mkdir()
    before_start(data)
    with throwaway(
        tmp_path, "prometheus", command, "/prometheus", configure, prometheus_ready
    ) as service:
        yield service


@contextmanager
def gateway_healthy_when(release: threading.Event) -> Iterator[str]:
    """A real HTTP /health that answers "starting" (503) until `release` is set: it
    stands in for the gateway's health endpoint in recovery tests that run beside the
    sandbox (whose gateway another test may be restarting)."""

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            healthy = release.is_set()
            body = json.dumps({"status": "healthy" if healthy else "starting"}).encode()
            self.send_response(200 if healthy else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health"
    finally:
        server.shutdown()
        server.server_close()
