"""Benchmark: recover-gateway on a killed gateway against the container's own start time.

In one run, on one throwaway gateway container (hostfs image, host network,
sandbox/gateway.py on a free port, its own redis-server; never the sandbox's
gateway):

- floor: the container killed (SIGKILL), then `docker start` until `/health`
         answers healthy (polled every 10 ms): the container's own start-to-healthy;
- ours:  the container killed, then the real `recover_gateway` flow (on a temporary
         Prefect server, warmed up first): its measured RTO (flow start → verified
         healthy) and the whole flow's wall time (with the /metrics check and report);
- recreate: a gateway whose restart cannot work (stale lock file in its filesystem),
         killed, recovered by restart + recreate: its RTO, for the record.

Target: ours' RTO <= floor + 5 s. Medians of `--runs` rounds.

    .venv/bin/python -m bench.recover_gateway [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import httpx
import redis

from sandbox import constants as stack
from sandbox.stack import gateway_mounts

STALE_LOCK = (
    "if [ -e /tmp/gateway.lock ]; then echo 'stale lock' >&2; exit 4; fi; touch /tmp/gateway.lock"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server(work: Path) -> Iterator[int]:
    """A bare redis-server for the gateway (no persistence), stopped afterwards."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--dir", str(work)],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                redis.Redis(port=port, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait()


@contextmanager
def gateway(client: docker.DockerClient, redis_port: int, before: str = "") -> Iterator[Any]:
    """A healthy throwaway gateway container; removed afterwards (with any replacement)."""
    port, ident = free_port(), uuid.uuid4().hex[:8]
    name = f"proxilion-dr-bench-gateway-{ident}"
    script = "; ".join(
        p for p in (before, f"exec /usr/bin/python3 -u {stack.GATEWAY_CONTAINER_SCRIPT}") if p
    )
    container = client.containers.run(
        stack.HOSTFS_IMAGE,
        ["/bin/sh", "-c", script],
        name=name,
        environment={
            **stack.GATEWAY_SETTINGS,
            "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": str(redis_port),
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "PYTHONDONTWRITEBYTECODE": "1",
        },
        mounts=gateway_mounts(),
        network_mode="host",
        labels={stack.SANDBOX_LABEL: "bench", "proxilion-dr.bench-id": ident},
        detach=True,
    )
    container.url = f"http://127.0.0.1:{port}/health"
    try:
        wait_healthy(container.url, 30)
        yield container
    finally:
        for leftover in client.containers.list(
            all=True, filters={"label": f"proxilion-dr.bench-id={ident}"}
        ):
            leftover.remove(force=True)


def wait_healthy(url: str, timeout: float, started: float | None = None) -> float:
    """Seconds from `started` (default now) until `url` answers healthy (10 ms polls)."""
    started = time.perf_counter() if started is None else started
    while time.perf_counter() - started < timeout:
        try:
            if httpx.get(url, timeout=1).json().get("status") == "healthy":
                return time.perf_counter() - started
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.01)
    raise SystemExit(f"{url} not healthy within {timeout} s")


def kill(client: docker.DockerClient, name: str) -> None:
    container = client.containers.get(name)
    container.kill()
    container.wait(timeout=30)


def floor(client: docker.DockerClient, container: Any) -> float:
    kill(client, container.name)
    started = time.perf_counter()
    client.containers.get(container.name).start()
    return wait_healthy(container.url, 30, started)


def ours(client: docker.DockerClient, container: Any) -> tuple[float, float]:
    from flows.recover_gateway import recover_gateway

    kill(client, container.name)
    started = time.perf_counter()
    result = recover_gateway(container=container.name, health_url=container.url)
    wall = time.perf_counter() - started
    assert result["ok"], result
    return float(result["rto_seconds"]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    @flow
    def warm_up() -> None:
        pass

    client = docker.from_env()
    with (
        tempfile.TemporaryDirectory() as tmp,
        redis_server(Path(tmp)) as redis_port,
        prefect_test_harness(server_startup_timeout=120),
    ):
        warm_up()
        with gateway(client, redis_port) as container:
            floors = [floor(client, container) for _ in range(args.runs)]
            runs = [ours(client, container) for _ in range(args.runs)]
        with gateway(client, redis_port, STALE_LOCK) as container:
            recreated = [ours(client, container) for _ in range(args.runs)]
    base = statistics.median(floors)
    rto = statistics.median(r for r, _ in runs)
    wall = statistics.median(w for _, w in runs)
    rto_recreate = statistics.median(r for r, _ in recreated)
    print(f"\nmedians of {args.runs} rounds, gateway killed with SIGKILL each time")
    print(f"  floor    docker start → /health healthy        {base:6.2f} s")
    print(
        f"  ours     recover-gateway RTO (restart path)    {rto:6.2f} s  "
        f"difference {rto - base:+.2f} s (target <= +5.00 s)"
    )
    print(f"           whole flow incl. /metrics and report  {wall:6.2f} s")
    print(
        f"  recreate recover-gateway RTO (restart fails)   {rto_recreate:6.2f} s  "
        f"difference {rto_recreate - base:+.2f} s"
    )


if __name__ == "__main__":
    main()
