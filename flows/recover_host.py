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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.support.checklist import (
    ASSESS,
    GATEWAY,
    MONITORING,
    POST_INCIDENT,
    PROVISION,
    REDIS,
    VERIFY,
    HostRecovery,
)
from flows.support.failures import explains_failure, run_name
from flows.support.hooks import FLOW_HOOKS
from flows.support.parameter_docs import shared_args
from flows.support.parameters import dr_flow
from flows.support.pushes import recovered, recovery_failed, with_hooks
from flows.support.recovery import BackupSource, fetch
from flows.support.settings import resolve
from tasks.common.errors import one_line
from tasks.common.files import require_free_space
from tasks.common.http_health import analyze_once, check_metrics, derive_url, health_url
from tasks.common.locks import exclusive, lock_name
from tasks.common.redis_url import parse_redis_url
from tasks.common.secrets import url_server
from tasks.config.prove import prove_config
from tasks.config.restore import (
    Archive,
    Secrets,
    check_secrets,
    previewed,
    read_archive,
    require_empty,
    restore_project,
)
from tasks.docker import containers
from tasks.docker.compose import ComposeFiles
from tasks.docker.containers import wait_until_answers
from tasks.docker.host import check_images, check_new_host, check_ports_free
from tasks.docker.project import (
    Project,
    Service,
    compose_up,
    data_dir,
    read_services,
    required_variables,
)
from tasks.docker.roles import check_data_mounts, find_roles, require_role
from tasks.prometheus.prove import check_alert_rules, prove_prometheus
from tasks.prometheus.restore import restore_blocks, wait_until_ready
from tasks.prometheus.setup import check_retention_covers, read_prometheus_setup
from tasks.redis.prove import check_gateway, ping, prove_redis
from tasks.redis.restore import restore_rdb, wait_until_loaded
from tasks.redis.server import RedisAccessError
from tasks.redis.setup import read_redis_setup
from tasks.store.find import FoundBackup
from tasks.store.kinds import config_source_id, prometheus_source_id, redis_source_id
from tasks.store.local import BackupNotFound


@dataclass(frozen=True)
class Urls:
    """Where the restored services answer on this host."""

    gateway: str
    redis: str
    prometheus: str

    def named(self) -> dict[str, str]:
        return {"gateway": self.gateway, "redis": self.redis, "prometheus": self.prometheus}


@dataclass(frozen=True)
class Backups:
    """The verified backups the host is rebuilt from."""

    config: FoundBackup
    archive: Archive
    redis: FoundBackup
    prometheus: FoundBackup | None  # none: Prometheus starts empty


@dr_flow(
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
    compose_files: str = "",
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
        project_name: Compose project name. Empty: COMPOSE_PROJECT_NAME from the backup's
            environment, else the name of target_dir.
        compose_files: The project's compose files, comma-separated, relative to
            target_dir (e.g. `docker-compose.yml,docker-compose.prod.yml`). Empty:
            COMPOSE_FILE from the backup's environment, else compose's own choice
            (compose.yaml or docker-compose.yml, with its override).
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
    p = resolve(locals(), target_dir="config_project_dir")
    source = BackupSource.of(p)
    target = Path(p["target_dir"]).absolute()
    urls = Urls(p["gateway_url"], p["redis_url"], p["prometheus_url"])
    timeout = start_timeout_seconds
    r = HostRecovery("recover-host", dry_run=dry_run)
    with (
        r.reporting(),
        exclusive(lock_name("backup-redis", parse_redis_url(urls.redis).server)),
        exclusive(lock_name("backup-prometheus", url_server(urls.prometheus))),
    ):
        try:
            project_of = config_source_id(source_project_dir or target)
            config, archive = find_the_config_backup(r, source, backup, project_of)
            values = check_the_secrets(r, config, archive, secrets_env_file)
            files = ComposeFiles.of(compose_files, archive.env)
            name = project_name or archive.env.get("COMPOSE_PROJECT_NAME") or target.name
            data = find_the_data_backups(r, source, redis_backup, prometheus_backup, urls, config)
            backups = Backups(config, archive, *data)
            check_the_new_host(r, target, urls)
            roles = check_the_project(r, backups, values, urls, files, name, target)
            if dry_run:
                what = f"would unpack {config.manifest.name} into {target}"
                r.skip("restore the project files", what)
                r.skip("restore data and start services", "gateway → redis → prometheus → grafana")
            else:
                project = restore_the_project(r, backups, target, values, files, name, roles)
                restore_the_data(r, project, backups, urls)
                start_the_gateway(r, project, urls, timeout)
                start_redis(r, project, backups.redis, urls, timeout, redis_secrets(archive))
                verify_the_gateway(r, project, urls, timeout)
                start_monitoring(r, project, backups.prometheus, urls, timeout)
                r.healthy()
                start_the_other_services(r, project)
                verify_the_stack(r, project, target, urls)
        except BaseException:
            if not dry_run and (target / ".env").exists():
                r.notes.append(
                    f"the restored project stays in {target}, its containers as they are: fix "
                    "the cause and finish by hand (docker-compose up -d), or `docker-compose "
                    "down` there, empty the folder and run again"
                )
            raise
    result = r.result()
    recovered("host", result)
    return result


# ------------------------------------------------------------ 1. ASSESS, 2. PROVISION


def find_the_config_backup(
    r: HostRecovery, source: BackupSource, name: str, project_of: str
) -> tuple[FoundBackup, Archive]:
    """The config backup of the lost project (`latest`: its newest), verified, and
    its compose files and env.txt read (nothing is written yet)."""
    item = "Check backup availability"
    with r.step_for("find and verify the config backup", ASSESS, item) as step:
        config = fetch(r, source, "config", name, project_of)
        archive = read_archive(config)
        step.detail = f"{config.manifest.name} from {config.location}"
    return config, archive


def check_the_secrets(
    r: HostRecovery, config: FoundBackup, archive: Archive, secrets_env_file: str
) -> Secrets:
    """Every variable the compose files need, from env.txt or the operator's file."""
    with r.step_for("check the secrets", GATEWAY, "Environment variables configured") as step:
        withheld = config.manifest.source.get("env_withheld") or []
        values = check_secrets(archive, withheld, secrets_env_file or None)
        step.detail = f".env will hold {', '.join(sorted(values.env))}"
        if values.in_files:
            step.detail += f"; written back into files: {', '.join(sorted(values.in_files))}"
    return values


def find_the_data_backups(
    r: HostRecovery,
    source: BackupSource,
    redis_name: str,
    prometheus_name: str,
    urls: Urls,
    config: FoundBackup,
) -> tuple[FoundBackup, FoundBackup | None]:
    """The Redis and Prometheus backups of the servers at `urls` (`latest`: the newest
    of each), verified; without a Prometheus backup it starts empty. Ticks "Check
    backup availability" with all three."""
    item = "Check backup availability"
    with r.step_for("find and verify the Redis and Prometheus backups", ASSESS, item) as step:
        redis_found = fetch(r, source, "redis", redis_name, redis_source_id(urls.redis))
        r.used_backup(redis_found.manifest, redis_found.location)
        try:
            prometheus: FoundBackup | None = fetch(
                r, source, "prometheus", prometheus_name, prometheus_source_id(urls.prometheus)
            )
        except BackupNotFound as missing:
            prometheus = None
            r.notes.append(f"no Prometheus backup ({one_line(missing)}): it starts empty")
        prom = prometheus.manifest.name if prometheus else "none (Prometheus starts empty)"
        step.detail = f"redis {redis_found.manifest.name}; prometheus {prom}"
    r.check(ASSESS, item, f"config {config.manifest.name} ({config.location}); {step.detail}")
    return redis_found, prometheus


def check_the_new_host(r: HostRecovery, target: Path, urls: Urls) -> None:
    """target_dir new or empty, Docker and compose answer, nothing where services go."""
    with r.step_for("check the new host", PROVISION, "New host or repair existing") as step:
        require_empty(target)
        step.detail = check_new_host(urls.named())
    r.check(ASSESS, "Identify failed components",
            f"whole host: nothing answers at {', '.join(urls.named())}")  # fmt: skip
    r.check(PROVISION, "New host or repair existing", f"restoring into {target}")
    r.check(PROVISION, "Docker installed", step.detail.split(";")[0])
    r.check(PROVISION, "Network connectivity verified", "backups reached")


def check_the_project(
    r: HostRecovery,
    backups: Backups,
    values: Secrets,
    urls: Urls,
    chosen: ComposeFiles,
    name: str,
    target: Path,
) -> dict[str, str]:
    """The project as compose resolves it with the restored files and secrets (in a
    temporary folder): which service plays each role, by what it really runs and the
    port of its URL (a project without a Redis service is refused: its backup would be
    reported restored and never be); the Redis and Prometheus data on mounts; every
    port it needs free; its images here or pullable; room for the data. What the live
    run would refuse on, refused before anything is written. Returns role → service."""
    item = "docker-compose.yml in place"
    with r.step_for("check the project's services", GATEWAY, item) as step:
        with previewed(backups.config, values) as folder:
            files = chosen.paths(folder)
            services = read_services(files, name)
            roles = find_roles(services, urls.named())
            require_role("redis", roles, services, files[0])
            evidence = [check_data_mounts(roles), check_ports_free(services)]
        evidence.append(check_images(services))
        needed = sum(b.manifest.raw_size for b in (backups.redis, backups.prometheus) if b)
        free = require_free_space(existing(target), needed, "the restored Redis and Prometheus")
        played = ", ".join(f"{role} = {service.name}" for role, service in roles.items())
        others = [s for s in services if s not in {v.name for v in roles.values()}]
        step.detail = f"{' + '.join(f.name for f in files)}: {played}; others: "
        step.detail += ", ".join(others) or "none"
        step.detail += "; " + "; ".join(evidence) + f"; {free / 1e9:.1f} GB free"
    if backups.prometheus is not None and "prometheus" not in roles:
        r.notes.append(
            f"no service runs prometheus: backup {backups.prometheus.manifest.name} is not restored"
        )
    return {role: service.name for role, service in roles.items()}


def existing(path: Path) -> Path:
    """`path`, or its nearest existing parent (a target_dir not made yet)."""
    while not path.exists():
        path = path.parent
    return path


# ------------------------------------------------------ 3. to 5. RESTORE, in order


def restore_the_project(
    r: HostRecovery,
    backups: Backups,
    target: Path,
    values: Secrets,
    chosen: ComposeFiles,
    name: str,
    roles: dict[str, str],
) -> Project:
    """The project's files and `.env` into target_dir; its containers created."""
    config = backups.config
    item = "docker-compose.yml in place"
    with r.step_for("restore the project files and .env", GATEWAY, item) as step:
        written = restore_project(config, target, values)
        step.detail = f"{len(written)} entries into {target}: {', '.join(written)}"
    r.prove(prove_config(target, config.manifest, values.env, complete=False), config.manifest)
    files = chosen.paths(target)
    r.check(GATEWAY, item, f"{' + '.join(str(f) for f in files)} from {config.manifest.name}")
    names = ", ".join(sorted(values.env))
    r.check(GATEWAY, "Environment variables configured", f".env (0600): {names}")
    with r.step_for("create the containers", GATEWAY, "docker-compose up -d gateway") as step:
        services = read_services(files, name)
        played = {role: services[service] for role, service in roles.items()}
        project = Project(files, name, services, played)
        compose_up(project.compose_files, project.name, [], start=False)
        step.detail = f"services {', '.join(services)} created (not started)"
    return project


def restore_the_data(r: HostRecovery, project: Project, backups: Backups, urls: Urls) -> None:
    """The Redis backup into the Redis service's data dir, the Prometheus backup into
    its TSDB dir: the folders the created (not started) containers mount there, bind
    mounts or named volumes, owned as each image's user needs."""
    if "redis" in project.roles:
        item = "dump.rdb restored to /var/lib/redis"
        with r.step_for("restore Redis data", REDIS, item) as step:
            service = project.roles["redis"]
            step.detail = restore_redis_data(project, service, backups.redis, urls.redis)
        r.check(REDIS, item, step.detail)
    item = "Prometheus data restored (optional)"
    if "prometheus" in project.roles and backups.prometheus is not None:
        with r.step_for("restore Prometheus data", MONITORING, item) as step:
            found = backups.prometheus
            container = project.container(project.roles["prometheus"])
            setup = read_prometheus_setup(urls.prometheus, container)
            keeps = check_retention_covers(found, setup)
            data = data_dir(container, project.roles["prometheus"], setup.tsdb_path)
            restored = restore_blocks(found, data)
            step.detail = f"{found.manifest.name} → {data}: {len(restored.blocks)} blocks; {keeps}"
        r.check(MONITORING, item, step.detail)
    elif "prometheus" in project.roles:
        r.check(MONITORING, item, "no backup: starts empty", "n/a")


def restore_redis_data(project: Project, service: Service, found: FoundBackup, url: str) -> str:
    """The RDB into the Redis service's data dir (its container created, not started:
    its settings come from its config file and arguments), as the AOF base too when
    the service runs `appendonly yes`."""
    container = project.container(service)
    setup = read_redis_setup(url, container)
    data = data_dir(container, service, setup.dir or "/data")
    restored = restore_rdb(found, data, setup)
    moved = restored.moved_aside
    aside = f"; {', '.join(moved.names)} moved aside to {moved.folder}" if moved else ""
    return (
        f"{found.manifest.name} → {data}: {', '.join(restored.placed)} (RDB v"
        f"{restored.rdb.rdb_version}, Redis {setup.redis_version}, appendonly "
        f"{'yes' if setup.aof_enabled else 'no'}){aside}"
    )


def start_the_gateway(r: HostRecovery, project: Project, urls: Urls, timeout: float) -> None:
    """The gateway first: its /health answers (503 naming Redis until Redis runs)."""
    if "gateway" not in project.roles:
        return
    gateway = project.roles["gateway"]
    with r.step_for("start the gateway", GATEWAY, "docker-compose up -d gateway") as step:
        project.up(gateway)
        replicas = project.containers(gateway)
        answer = wait_until_answers(health_url(urls.gateway), replicas[0], timeout)
        running = replicas_running(replicas)
        step.detail = f"/health answers: {answer}; {running}"
    r.check(GATEWAY, "docker-compose up -d gateway", f"{gateway.name}: {running}")


def replicas_running(replicas: list[str]) -> str:
    """Every replica of a service runs (a replica that exited fails the step, by name)."""
    for replica in replicas:
        reason = containers.exit_reason(replica)
        if reason:
            raise RuntimeError(f"replica {replica[:12]} of {len(replicas)}: {reason}")
    return f"{len(replicas)} replica(s) running" if len(replicas) > 1 else "running"


def start_redis(
    r: HostRecovery,
    project: Project,
    found: FoundBackup,
    urls: Urls,
    timeout: float,
    password_secrets: list[str],
) -> None:
    """Redis next: PING, loading:0, and the restored data proven against the manifest."""
    if "redis" not in project.roles:
        return
    service = project.roles["redis"]
    with r.step_for("start Redis and verify", REDIS, "redis-cli PING returns PONG") as step:
        since = time.time()
        project.up(service)
        try:
            load = wait_until_loaded(urls.redis, project.container(service), timeout)
        except RedisAccessError as refused:
            given = ", ".join(password_secrets) or "the restored project's Redis password"
            raise RedisAccessError(
                f"{refused}; the restored Redis takes its password from {given}: give the "
                "same one in both, then run again"
            ) from None
        step.detail = f"{ping(urls.redis)}, loading:0"
    r.prove(prove_redis(urls.redis, found.manifest, load, since), found.manifest)
    r.check(REDIS, "docker-compose up -d redis", f"{project.container(service)} running")
    r.check(REDIS, "redis-cli PING returns PONG", step.detail)


def redis_secrets(archive: Archive) -> list[str]:
    """The secrets that give the restored Redis a password (a `requirepass` or ACL user
    withheld in its config, a withheld variable of its compose files), by name."""
    named = [s.name for s in archive.slots if "requirepass" in s.key or s.key.startswith("user ")]
    for text in archive.compose_files.values():
        named += [n for n in sorted(required_variables(text)) if "REDIS" in n and "PASS" in n]
    return list(dict.fromkeys(named))


def verify_the_gateway(r: HostRecovery, project: Project, urls: Urls, timeout: float) -> None:
    """With Redis back, the gateway answers healthy."""
    if "gateway" not in project.roles:
        return
    item = "curl localhost:8787/health returns OK"
    with r.step_for("verify the gateway is healthy", GATEWAY, item) as step:
        step.detail = check_gateway(health_url(urls.gateway), timeout)
    r.check(GATEWAY, item, step.detail)


def start_monitoring(
    r: HostRecovery, project: Project, found: FoundBackup | None, urls: Urls, timeout: float
) -> None:
    """Prometheus (its restored history proven), then Grafana."""
    item = "docker-compose up -d prometheus grafana"
    started = []
    if "prometheus" in project.roles:
        with r.step_for("start Prometheus and verify", MONITORING, item) as step:
            service = project.roles["prometheus"]
            project.up(service)
            wait_until_ready(urls.prometheus, project.container(service), timeout)
            step.detail = "/-/ready" + ("" if found else " (empty: no backup)")
        if found is not None:
            r.prove(prove_prometheus(urls.prometheus, found.manifest), found.manifest)
        started.append(f"prometheus: {step.detail}")
    if "grafana" in project.roles:
        with r.step_for("start Grafana", MONITORING, item) as step:
            grafana = project.container(project.roles["grafana"])
            project.up(project.roles["grafana"])
            reason = containers.exit_reason(grafana)
            if reason:
                raise RuntimeError(reason)
            step.detail = f"{grafana} running"
        started.append(f"grafana: {step.detail}")
    else:
        started.append("grafana: no such service in the compose file")
    r.check(MONITORING, item, "; ".join(started))


def start_the_other_services(r: HostRecovery, project: Project) -> None:
    """The rest of the project, once the core services are verified."""
    with r.step("start the other services") as step:
        others = [s for s in project.services.values() if s not in project.roles.values()]
        compose_up(project.compose_files, project.name, [])
        step.detail = ", ".join(s.name for s in others) or "none"


# -------------------------------------------------------------------------- 6. VERIFY


def verify_the_stack(r: HostRecovery, project: Project, target: Path, urls: Urls) -> None:
    """/analyze, /metrics, the dashboards restored, the alert rules loaded."""
    dashboards = sorted((target / "grafana" / "dashboards").rglob("*.json"))
    board_note = f"{len(dashboards)} dashboards restored in {target / 'grafana' / 'dashboards'}"
    if "grafana" in project.roles:
        r.check(MONITORING, "Grafana dashboards accessible", board_note)
    else:
        r.check(
            MONITORING, "Grafana dashboards accessible", f"no Grafana service; {board_note}", "n/a"
        )
    if "gateway" in project.roles:
        with r.step_for("verify /analyze and /metrics", VERIFY, "Test /analyze endpoint") as step:
            analyzed = analyze_once(urls.gateway)
            samples = check_metrics(derive_url(urls.gateway, "/metrics"))
            step.detail = f"{analyzed}; /metrics {samples} samples"
        r.check(VERIFY, "Test /analyze endpoint", analyzed)
        r.check(VERIFY, "Check metrics at /metrics", f"{samples} samples")
    if "prometheus" in project.roles:
        with r.step_for("verify alerting rules", VERIFY, "Confirm alerting works") as step:
            step.detail = check_alert_rules(urls.prometheus)
        r.check(VERIFY, "Confirm alerting works", step.detail)
    r.check(POST_INCIDENT, "Document incident timeline", "this report: every step timed")


if __name__ == "__main__":
    recover_host()
