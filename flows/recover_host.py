"""recover-host: runbook scenario 3, the host is gone; rebuild the stack on a new one.

A new machine with Docker and access to the S3 bucket, nothing else. Runbook steps:
find the config backup (here, else S3) and the Redis and Prometheus backups; check
that every variable the compose file needs is supplied (the ones the backup withheld
as secrets come from the operator's `secrets_env_file`); restore the project into
`target_dir` and write its `.env`; create the containers; put the Redis RDB into the
Redis service's data dir (also as the AOF base when it runs `appendonly yes`) and the
Prometheus blocks into its TSDB dir; start the services in the runbook's priority
order, gateway → redis → prometheus → grafana, each verified before the next; then
the rest of the project; verify /analyze, /metrics and the alert rules. The report
is the runbook's checklist, each line ticked or failed with its evidence.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis
from prefect import flow

from flows.support.hooks import FLOW_HOOKS
from flows.support.parameter_docs import shared_args
from flows.support.pushes import recovered, recovery_failed, with_hooks
from flows.support.recovery import Recovery, Step, one_line
from flows.support.settings import refuse_secret_parameters, resolve
from flows.support.steps import explains_failure, run_name
from tasks.common.aside import move_into_aside, unique_folder
from tasks.common.http_health import check_metrics, derive_url, health_url
from tasks.common.locks import exclusive, lock_name
from tasks.common.redis_url import parse_redis_url
from tasks.common.secrets import redact_url, url_server
from tasks.config.capture import COMPOSE_PATTERNS, ENV_FILE, archive_folder
from tasks.docker import containers
from tasks.docker.compose import ComposeService, compose_command, compose_container_id
from tasks.docker.containers import wait_started
from tasks.docker.project import (
    Service,
    compose_up,
    env_file_text,
    read_env_file,
    read_services,
    required_variables,
)
from tasks.prometheus.capture import restore_snapshot
from tasks.prometheus.restore import verify_history, wait_until_ready
from tasks.redis.restore import (
    check_gateway,
    place_staged,
    read_redis_setup,
    settle_aof,
    stage_rdb,
    verify_keyspace,
)
from tasks.redis.restore import wait_until_loaded as wait_until_redis_loaded
from tasks.redis.server import connect
from tasks.store.archive import extract_archive, open_decompressed
from tasks.store.find import FoundBackup, fetch_backup
from tasks.store.local import BackupNotFound
from tasks.store.sources import config_source_id, prometheus_source_id, redis_source_id

# The runbook's "DISASTER RECOVERY RUNBOOK" checklist, section by section.
RUNBOOK: dict[str, list[str]] = {
    "1. ASSESS": [
        "Identify failed components",
        "Check backup availability",
        "Notify stakeholders",
    ],
    "2. PROVISION INFRASTRUCTURE": [
        "New host or repair existing",
        "Docker installed",
        "Network connectivity verified",
    ],
    "3. RESTORE GATEWAY": [
        "docker-compose.yml in place",
        "Environment variables configured",
        "docker-compose up -d gateway",
        "curl localhost:8787/health returns OK",
    ],
    "4. RESTORE REDIS": [
        "dump.rdb restored to /var/lib/redis",
        "docker-compose up -d redis",
        "redis-cli PING returns PONG",
    ],
    "5. RESTORE MONITORING": [
        "Prometheus data restored (optional)",
        "docker-compose up -d prometheus grafana",
        "Grafana dashboards accessible",
    ],
    "6. VERIFY": [
        "Test /analyze endpoint",
        "Check metrics at /metrics",
        "Review Grafana dashboards",
        "Confirm alerting works",
    ],
    "7. POST-INCIDENT": [
        "Document incident timeline",
        "Update backup procedures if needed",
        "Schedule post-mortem",
    ],
}
BY_HAND = {  # what a flow cannot do; the report says so instead of ticking it
    "Notify stakeholders": "by the operator",
    "Review Grafana dashboards": "by the operator, in Grafana",
    "Update backup procedures if needed": "by the operator, after the post-mortem",
    "Schedule post-mortem": "by the operator",
}
MARKS = {"ok": "✅", "failed": "❌", "by hand": "✋", "n/a": "➖", "not reached": "⬜"}


class MissingSecrets(RuntimeError):
    """Variables the compose file needs are neither in the backup nor supplied."""


class TargetNotEmpty(FileExistsError):
    """The folder to restore into holds something already."""


class PortTaken(RuntimeError):
    """Something already answers where a restored service must listen."""


@dataclass
class HostRecovery(Recovery):
    """The Recovery record plus the runbook's checklist (item → outcome, evidence)."""

    checklist: dict[str, dict[str, tuple[str, str]]] = field(
        default_factory=lambda: {
            section: {
                item: ("by hand", BY_HAND[item]) if item in BY_HAND else ("not reached", "")
                for item in items
            }
            for section, items in RUNBOOK.items()
        }  # fmt: skip
    )

    def check(self, section: str, item: str, evidence: str, outcome: str = "ok") -> None:
        self.checklist[section][item] = (outcome, evidence)

    @contextmanager
    def step_for(self, name: str, section: str, item: str) -> Iterator[Step]:
        """A step whose failure also fails its checklist line, with the reason."""
        try:
            with self.step(name) as step:
                yield step
        except BaseException as error:
            self.check(section, item, f"step '{name}' failed: {one_line(error)}", "failed")
            raise

    def checklist_markdown(self) -> str:
        lines = ["", "## DISASTER RECOVERY RUNBOOK", ""]
        for section, items in self.checklist.items():
            lines.append(f"**{section}**")
            lines.append("")
            for item, (outcome, evidence) in items.items():
                if outcome == "not reached" and self.dry_run:
                    evidence = evidence or "planned (dry run)"
                box = "[x]" if outcome == "ok" else "[ ]"
                text = f"- {box} {MARKS[outcome]} {item}"
                lines.append(text + (f" — {evidence}" if evidence else f" — {outcome}"))
            lines.append("")
        return "\n".join(lines)

    def markdown(self) -> str:
        return super().markdown() + self.checklist_markdown()

    def result(self) -> dict[str, Any]:
        facts = super().result()
        facts["checklist"] = {
            section: {item: {"outcome": o, "evidence": e} for item, (o, e) in items.items()}
            for section, items in self.checklist.items()
        }
        return facts


@flow(
    name="recover-host",
    flow_run_name=run_name("host recovery"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, recovery_failed("host")),
)
@explains_failure
@shared_args
def recover_host(
    target_dir: str = "",
    backup: str = "latest",
    source_project_dir: str = "",
    secrets_env_file: str = "",
    redis_backup: str = "latest",
    prometheus_backup: str = "latest",
    project_name: str = "",
    gateway_url: str = "",
    redis_url: str = "",
    prometheus_url: str = "",
    dry_run: bool = False,
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
    age_identity_file: str = "",
    start_timeout_seconds: float = 300.0,
) -> dict[str, Any]:
    """Rebuild the whole stack on a new host from the backups alone (scenario 3).

    Empty parameters take their PROXILION_DR_* setting. Returns RTO (flow start →
    gateway, Redis and Prometheus verified), RPO (age of the Redis backup), the
    backups used, each step, and the runbook checklist.

    Args:
        target_dir: Folder to restore the compose project into (new or empty). Empty:
            PROXILION_DR_CONFIG_PROJECT_DIR (default /opt/proxilion).
        backup: Config backup to restore: `latest` (the newest of source_project_dir's
            project) or a name as listed, e.g.
            `config/config_20260101_000000_1a2b3c4d.tar.gz`. Looked for in backup_dir,
            then S3.
        source_project_dir: The project folder on the lost host, as its config backups
            name it (for `latest`); empty = target_dir (restoring to the same path).
        secrets_env_file: Path of a file of NAME=value lines holding the secrets the
            config backup withheld (the flow lists them when they are missing). Never
            put the values themselves in a parameter. Empty: none (enough when the
            backup withheld no secret).
        redis_backup: Redis backup to restore into the Redis service: `latest` (the newest
            of the Redis at redis_url) or a name.
        prometheus_backup: Prometheus backup to restore: `latest` (the newest of the
            Prometheus at prometheus_url) or a name; when there is none, Prometheus starts
            empty and the report says so.
        project_name: Compose project name; empty = the name of target_dir.
        gateway_url: The restored gateway's base URL (its /health, /metrics, /analyze).
            Empty: PROXILION_DR_GATEWAY_URL (default http://localhost:8787).
        redis_url: How to reach the restored Redis. Empty: PROXILION_DR_REDIS_URL
            (default redis://localhost:6379/0). A URL with a password is refused here:
            credentials belong in PROXILION_DR_REDIS_URL.
        prometheus_url: The restored Prometheus's URL. Empty:
            PROXILION_DR_PROMETHEUS_URL (default http://localhost:9090).
        dry_run: ON: find and verify the backups, check the secrets and the new host
            (target_dir new or empty, nothing answering at the three URLs), publish the
            plan; nothing is written or started. OFF (the default): the project is
            unpacked into target_dir, its containers are created, the Redis and
            Prometheus backups placed in their data folders and the services started.
            Nothing is replaced: a target_dir holding files, or a gateway, Redis or
            Prometheus already answering, stops the run before anything is written.
        {backup_source}
        start_timeout_seconds: Seconds each service may take to start and verify.
    """
    refuse_secret_parameters(locals(), "redis_url")
    p = resolve(locals(), target_dir="config_project_dir")
    recovery = HostRecovery("recover-host", dry_run=dry_run)
    with (
        recovery.reporting(),
        exclusive(lock_name("backup-redis", parse_redis_url(p["redis_url"]).server)),
        exclusive(lock_name("backup-prometheus", url_server(p["prometheus_url"]))),
    ):
        try:
            _recover(recovery, p)
        except BaseException:
            target = Path(p["target_dir"]).absolute()
            if not dry_run and (target / ".env").exists():
                recovery.notes.append(
                    f"the restored project stays in {target}, its containers as they are: fix "
                    "the cause and finish by hand (docker-compose up -d), or `docker-compose "
                    "down` there, empty the folder and run again"
                )
            raise
    result = recovery.result()
    recovered("host", result)
    return result


# ------------------------------------------------------------------------ the steps


@dataclass
class Archive:
    """What the flow reads from the config backup before anything is written."""

    compose_files: dict[str, str]
    env: dict[str, str]


def _fetch(r: Recovery, p: dict[str, Any], kind: str, name: str, source_id: str) -> FoundBackup:
    """A backup by name, or the newest of `source_id`: here, else from S3, verified."""
    return r.found(fetch_backup(
        Path(p["backup_dir"]), kind, name, p["s3_bucket"], p["s3_prefix"],
        p["s3_endpoint_url"] or None, source_id,
        Path(p["age_identity_file"]) if p.get("age_identity_file") else None,
    ))  # fmt: skip


def read_archive(found: FoundBackup) -> Archive:
    """The compose files and env.txt of a config backup, read in memory (small files),
    streamed from the verified archive."""
    folder = archive_folder(found.manifest.name)
    compose: dict[str, str] = {}
    env_text = ""
    with (
        open_decompressed(found.path, found.manifest.compression) as stream,
        tarfile.open(fileobj=stream, mode="r|") as archive,
    ):
        for member in archive:
            path = PurePosixPath(member.name)
            if not member.isfile() or path.parent != PurePosixPath(folder):
                continue
            source = archive.extractfile(member)
            assert source is not None
            if any(fnmatch(path.name, pattern) for pattern in COMPOSE_PATTERNS):
                compose[path.name] = source.read().decode()
            elif path.name == ENV_FILE:
                env_text = source.read().decode()
    if not compose:
        raise BackupNotFound(f"config backup {found.manifest.name} holds no compose file")
    env = dict(line.split("=", 1) for line in env_text.splitlines() if "=" in line)
    return Archive(compose, env)


def check_secrets(
    archive: Archive, withheld: list[str], secrets_file: str | None
) -> dict[str, str]:
    """The `.env` values: env.txt plus the operator's secrets file. Raises MissingSecrets
    naming every variable the compose files need that neither supplies."""
    supplied = read_env_file(Path(secrets_file)) if secrets_file else {}
    needed = set(withheld)
    for text in archive.compose_files.values():
        needed |= required_variables(text)
    missing = sorted(needed - set(archive.env) - set(supplied))
    if missing:
        where = f"add them to {secrets_file}" if secrets_file else (
            "write them as NAME=value lines into a file only you can read and give its path "
            "as secrets_env_file"
        )  # fmt: skip
        raise MissingSecrets(
            f"the config backup withholds (or lacks) {', '.join(missing)}: {where}, then run "
            "again (nothing was changed)"
        )
    return {**archive.env, **supplied}


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443, "redis": 6379, "rediss": 6379}[parts.scheme]
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=1):
            return True
    except OSError:
        return False


def check_new_host(target: Path, urls: dict[str, str]) -> str:
    """Target empty, Docker and compose answer, nothing listens where the services will."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TargetNotEmpty(
            f"target_dir {target} is not an empty folder: restore into a new or empty one "
            "(nothing was changed)"
        )
    version = containers.docker_client().version().get("Version", "?")
    command = compose_command()
    compose = " ".join([Path(command[0]).name, *command[1:]])
    taken = [f"{what} ({redact_url(url)})" for what, url in urls.items() if _answers(url)]
    if taken:
        raise PortTaken(
            f"something already answers at {', '.join(taken)}: this is not a fresh host, or "
            "the old stack still runs; stop it (or use recover-gateway / recover-redis) "
            "and run again (nothing was changed)"
        )
    return f"Docker {version}, {compose}; {', '.join(urls)} addresses free"


def restore_project(found: FoundBackup, target: Path, values: dict[str, str]) -> list[str]:
    """Unpack the config backup into `target` (safe extract into a staging folder
    beside it, then renamed in), write `.env` (0600) from `values`, drop env.txt."""
    staging = target.parent / f".{target.name}.restoring-{secrets.token_hex(3)}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        extract_archive(found.path, found.manifest.compression, staging)
        folder = staging / archive_folder(found.manifest.name)
        target.mkdir(exist_ok=True)
        names = sorted(entry.name for entry in folder.iterdir())
        for name in names:
            os.replace(folder / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (target / ENV_FILE).unlink(missing_ok=True)
    descriptor = os.open(target / ".env", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as env:
        env.write(env_file_text(values))
    return [name for name in names if name != ENV_FILE] + [".env"]


def pick(services: dict[str, Service], role: str, binary: str) -> Service | None:
    """The service playing `role`: the one of that name, else the one running `binary`."""
    if role in services:
        return services[role]
    for service in services.values():
        if service.command and Path(service.command[0]).name == binary:
            return service
        if PurePosixPath(service.image.split(":")[0]).name == binary:
            return service
    return None


@dataclass
class Project:
    """The restored compose project and its services by role."""

    compose_file: Path
    name: str | None
    services: dict[str, Service]
    roles: dict[str, Service]

    def container(self, service: Service) -> str:
        if service.container_name:
            return service.container_name
        target = ComposeService(self.compose_file, self.name, service.name, None)
        return compose_container_id(target)

    def up(self, *services: Service) -> str:
        return compose_up(self.compose_file, self.name, [s.name for s in services])


def data_dir(service: Service, inner: str) -> Path:
    path = service.host_path(inner)
    if path is None:
        raise FileNotFoundError(
            f"service {service.name!r} keeps its data in {inner}, which is not a bind mount: "
            "its data cannot be restored from the host; mount it in the compose file"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


def restore_redis(project: Project, service: Service, found: FoundBackup, url: str) -> str:
    """Place the RDB in the Redis service's data dir (its container created, not
    started: its settings come from its config file and arguments), as the AOF base too
    when the service runs `appendonly yes`."""
    container = project.container(service)
    setup = read_redis_setup(url, container)
    data = data_dir(service, setup.dir or "/data")
    settle_aof(setup, data)
    present = [name for name in setup.data_names() if (data / name).exists()]
    aside = ""
    if present:
        moved = move_into_aside(data, present, data / setup.dbfilename)
        aside = f"; {', '.join(present)} moved aside to {moved.folder}"
    staging = unique_folder(data, ".restore-staging")
    try:
        rdb = stage_rdb(found, setup, staging)
        placed = place_staged(staging, data, setup)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return (
        f"{found.manifest.name} → {data}: {', '.join(placed)} (RDB v{rdb.rdb_version}, "
        f"Redis {setup.redis_version}, appendonly {'yes' if setup.aof_enabled else 'no'}){aside}"
    )


def restore_prometheus(service: Service, found: FoundBackup) -> str:
    data = data_dir(service, service.flag("storage.tsdb.path") or "/prometheus")
    restored = restore_snapshot(found.backup_dir, found.manifest.name, data, found.path)
    return f"{found.manifest.name} → {data}: {len(restored.blocks)} blocks"


def _gateway_answers(url: str, container: str, timeout: float) -> str:
    """Wait until the gateway's /health answers at all: before Redis runs it answers
    503 `unhealthy` naming Redis, which proves the gateway itself is up."""
    answer: list[str] = []

    def probe() -> str | None:
        try:
            response = httpx.get(url, timeout=2)
            body = response.json()
        except (httpx.HTTPError, ValueError) as error:
            return one_line(error)
        answer.append(f"HTTP {response.status_code} {body}")
        return None

    wait_started(probe, container, timeout, f"the gateway at {url}")
    return answer[-1]


def _ping(url: str) -> str:
    client = connect(url)
    try:
        return "PONG" if client.ping() else "no PONG"
    except redis.RedisError as error:
        raise ConnectionError(f"Redis at {redact_url(url)}: {one_line(error)}") from None
    finally:
        client.close()


def _analyze(base_url: str) -> str:
    session = f"recover-host-check-{secrets.token_hex(4)}"
    response = httpx.post(
        derive_url(base_url, "/analyze"),
        json={"session_id": session, "tool": "read_file", "args": {"path": "/etc/hostname"}},
        timeout=10,
    )
    body = response.json() if response.status_code == 200 else {}
    if "decision" not in body:
        raise RuntimeError(f"POST /analyze answered HTTP {response.status_code}: {body}")
    return f"session {session}: decision {body['decision']}, score {body.get('score')}"


def _alert_rules(prometheus_url: str) -> str:
    response = httpx.get(derive_url(prometheus_url, "/api/v1/rules"), timeout=10)
    groups = response.json().get("data", {}).get("groups", [])
    rules = sum(len(g.get("rules", [])) for g in groups)
    if not rules:
        raise RuntimeError("Prometheus loaded no alerting rule: check rule_files")
    return f"{rules} rules in {len(groups)} groups loaded by Prometheus"


def _recover(r: HostRecovery, p: dict[str, Any]) -> None:  # noqa: PLR0915 - the runbook
    target = Path(p["target_dir"]).absolute()
    urls = {"gateway": p["gateway_url"], "redis": p["redis_url"], "prometheus": p["prometheus_url"]}
    a, g, rd, m, v = (list(RUNBOOK)[i] for i in (0, 2, 3, 4, 5))

    with r.step_for("find and verify the config backup", a, "Check backup availability") as step:
        source = config_source_id(p["source_project_dir"] or target)
        config = _fetch(r, p, "config", p["backup"], source)
        archive = read_archive(config)
        step.detail = f"{config.manifest.name} from {config.location}"
    with r.step_for("check the secrets", g, "Environment variables configured") as step:
        withheld = config.manifest.source.get("env_withheld") or []
        values = check_secrets(archive, withheld, p["secrets_env_file"])
        step.detail = f".env will hold {', '.join(sorted(values))}"
    with r.step_for(
        "find and verify the Redis and Prometheus backups", a, "Check backup availability"
    ) as step:
        redis_found = _fetch(r, p, "redis", p["redis_backup"], redis_source_id(p["redis_url"]))
        r.used_backup(redis_found.manifest, redis_found.location)
        try:
            prom_found: FoundBackup | None = _fetch(
                r,
                p,
                "prometheus",
                p["prometheus_backup"],
                prometheus_source_id(p["prometheus_url"]),
            )
        except BackupNotFound as missing:
            prom_found = None
            r.notes.append(f"no Prometheus backup ({one_line(missing)}): it starts empty")
        prom = prom_found.manifest.name if prom_found else "none (Prometheus starts empty)"
        step.detail = f"redis {redis_found.manifest.name}; prometheus {prom}"
    r.check(a, "Check backup availability", f"config {config.manifest.name} ({config.location}); "
            f"{step.detail}")  # fmt: skip
    with r.step_for("check the new host", list(RUNBOOK)[1], "New host or repair existing") as step:
        step.detail = check_new_host(target, urls)
    r.check(a, "Identify failed components", f"whole host: nothing answers at {', '.join(urls)}")
    prov = list(RUNBOOK)[1]
    r.check(prov, "New host or repair existing", f"restoring into {target}")
    r.check(prov, "Docker installed", step.detail.split(";")[0])
    r.check(prov, "Network connectivity verified", f"backups reached: {config.location}")
    if r.dry_run:
        r.skip("restore the project files", f"would unpack {config.manifest.name} into {target}")
        r.skip("restore data and start services", "gateway → redis → prometheus → grafana")
        return

    with r.step_for("restore the project files and .env", g, "docker-compose.yml in place") as step:
        written = restore_project(config, target, values)
        compose_name = next(n for n in written if n in archive.compose_files)
        step.detail = f"{len(written)} entries into {target}: {', '.join(written)}"
    r.check(
        g, "docker-compose.yml in place", f"{target / compose_name} from {config.manifest.name}"
    )
    r.check(g, "Environment variables configured", f".env (0600): {', '.join(sorted(values))}")
    with r.step_for("create the containers", g, "docker-compose up -d gateway") as step:
        services = read_services(target / compose_name, p["project_name"] or None)
        roles = {
            role: found
            for role, binary in (("gateway", "gateway"), ("redis", "redis-server"),
                                 ("prometheus", "prometheus"), ("grafana", "grafana-server"))
            if (found := pick(services, role, binary)) is not None
        }  # fmt: skip
        project = Project(target / compose_name, p["project_name"] or None, services, roles)
        compose_up(project.compose_file, project.name, [], start=False)
        step.detail = f"services {', '.join(services)} created (not started)"
    if "redis" in roles:
        with r.step_for("restore Redis data", rd, "dump.rdb restored to /var/lib/redis") as step:
            step.detail = restore_redis(project, roles["redis"], redis_found, p["redis_url"])
        r.check(rd, "dump.rdb restored to /var/lib/redis", step.detail)
    if "prometheus" in roles and prom_found is not None:
        with r.step_for(
            "restore Prometheus data", m, "Prometheus data restored (optional)"
        ) as step:
            step.detail = restore_prometheus(roles["prometheus"], prom_found)
        r.check(m, "Prometheus data restored (optional)", step.detail)
    elif "prometheus" in roles:
        r.check(m, "Prometheus data restored (optional)", "no backup: starts empty", "n/a")
    timeout = p["start_timeout_seconds"]
    gateway_health = health_url(p["gateway_url"])
    if "gateway" in roles:
        with r.step_for("start the gateway", g, "docker-compose up -d gateway") as step:
            gateway = roles["gateway"]
            project.up(gateway)
            answer = _gateway_answers(gateway_health, project.container(gateway), timeout)
            step.detail = f"/health answers: {answer}"
        r.check(g, "docker-compose up -d gateway", f"{project.container(gateway)} running")
    if "redis" in roles:
        with r.step_for("start Redis and verify", rd, "redis-cli PING returns PONG") as step:
            service = roles["redis"]
            project.up(service)
            load = wait_until_redis_loaded(p["redis_url"], project.container(service), timeout)
            pong = _ping(p["redis_url"])
            expected = redis_found.manifest.source.get("keyspace", {})
            step.detail = f"{pong}, loading:0; " + verify_keyspace(p["redis_url"], expected, load)
        r.check(rd, "docker-compose up -d redis", f"{project.container(service)} running")
        r.check(rd, "redis-cli PING returns PONG", step.detail)
    if "gateway" in roles:
        with r.step_for(
            "verify the gateway is healthy", g, "curl localhost:8787/health returns OK"
        ) as step:
            step.detail = check_gateway(gateway_health, timeout)
        r.check(g, "curl localhost:8787/health returns OK", step.detail)
    started = []
    if "prometheus" in roles:
        with r.step_for(
            "start Prometheus and verify", m, "docker-compose up -d prometheus grafana"
        ) as step:
            service = roles["prometheus"]
            project.up(service)
            wait_until_ready(p["prometheus_url"], project.container(service), timeout)
            if prom_found is not None:
                step.detail = "/-/ready; " + verify_history(p["prometheus_url"], prom_found)
            else:
                step.detail = "/-/ready (empty: no backup)"
        started.append(f"prometheus: {step.detail}")
    if "grafana" in roles:
        with r.step_for("start Grafana", m, "docker-compose up -d prometheus grafana") as step:
            project.up(roles["grafana"])
            reason = containers.exit_reason(project.container(roles["grafana"]))
            if reason:
                raise RuntimeError(reason)
            step.detail = f"{project.container(roles['grafana'])} running"
        started.append(f"grafana: {step.detail}")
    else:
        started.append("grafana: no such service in the compose file")
    r.check(m, "docker-compose up -d prometheus grafana", "; ".join(started))
    r.healthy()
    with r.step("start the other services") as step:
        others = [s for s in services.values() if s not in roles.values()]
        compose_up(project.compose_file, project.name, [])
        step.detail = ", ".join(s.name for s in others) or "none"

    dashboards = sorted((target / "grafana" / "dashboards").rglob("*.json"))
    board_note = f"{len(dashboards)} dashboards restored in {target / 'grafana' / 'dashboards'}"
    if "grafana" in roles:
        r.check(m, "Grafana dashboards accessible", board_note)
    else:
        r.check(m, "Grafana dashboards accessible", f"no Grafana service; {board_note}", "n/a")
    if "gateway" in roles:
        with r.step_for("verify /analyze and /metrics", v, "Test /analyze endpoint") as step:
            analyzed = _analyze(p["gateway_url"])
            samples = check_metrics(derive_url(p["gateway_url"], "/metrics"))
            step.detail = f"{analyzed}; /metrics {samples} samples"
        r.check(v, "Test /analyze endpoint", analyzed)
        r.check(v, "Check metrics at /metrics", f"{samples} samples")
    if "prometheus" in roles:
        with r.step_for("verify alerting rules", v, "Confirm alerting works") as step:
            step.detail = _alert_rules(p["prometheus_url"])
        r.check(v, "Confirm alerting works", step.detail)
    r.check(list(RUNBOOK)[6], "Document incident timeline", "this report: every step timed")


if __name__ == "__main__":
    recover_host()
