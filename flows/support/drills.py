"""The restore drill of each component (verify-restore): restore the newest backup into
scratch containers beside the live stack with the component's own restore path, then
run its prove function, each step recorded. A failure stops that component only."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from docker.types import Mount

from flows.support.recovery import BackupSource, Recovery, Step, find_backup
from tasks.config.prove import prove_config
from tasks.config.restore import Secrets, read_archive, restore_project
from tasks.docker.compose import project_files
from tasks.drill import compose as drill_compose
from tasks.drill import services as drill_services
from tasks.drill.scratch import (
    LiveShape,
    Scratch,
    free_port,
    inspect_live,
    program_argv,
    start_scratch,
)
from tasks.logs.prove import prove_logs
from tasks.logs.restore import restore_log
from tasks.prometheus.prove import check_archive, prove_prometheus
from tasks.prometheus.restore import restore_blocks, wait_until_ready
from tasks.redis.pitr import (
    Where,
    fetch_chain,
    load_generations,
    newest_aof_source,
    place_chain,
    plan_drill_cut,
    stage_chain,
)
from tasks.redis.prove import check_gateway, connections_received, prove_aof, prove_redis
from tasks.redis.restore import (
    RdbTooNew,
    check_loadable,
    load_while_checking,
    rdb_version_of,
    stage_rdb,
    wait_until_loaded,
)
from tasks.redis.setup import RedisSetup, read_redis_setup
from tasks.store.find import FoundBackup


class DrillCheckFailed(RuntimeError):
    """A restored backup does not hold what its manifest says."""


@dataclass(frozen=True)
class Drill:
    """What one drill restores and where: the backups (`latest` or a name per kind),
    the live containers whose images and settings the scratch ones copy (or other
    images), and how long a scratch service may take to start."""

    source: BackupSource
    backups: dict[str, str]
    redis_container: str
    gateway_container: str
    prometheus_container: str
    redis_image: str | None
    gateway_image: str | None
    prometheus_image: str | None
    timeout: float

    def backup(self, r: Recovery, kind: str) -> FoundBackup:
        """Find and verify (size, SHA-256) the backup of `kind` this drill restores."""
        return find_backup(r, self.source, kind, self.backups[kind], None)


def _listen(live: LiveShape) -> tuple[str, str]:
    """(address a scratch service listens on, host its scratch peers reach it by)."""
    return ("127.0.0.1", "127.0.0.1") if live.host_network else ("0.0.0.0", "drill-redis")


# ------------------------------------------------------------------------- Redis

DRILL_RDB = "dump.rdb"  # drill-redis's dbfilename
# What the RDB is staged for before drill-redis tells its version (checked after).
STAGING_SETUP = RedisSetup("", False, "/data", DRILL_RDB, False, "", "appendonly.aof")


def drill_redis(r: Recovery, d: Drill, scratch: Scratch) -> None:
    found = d.backup(r, "redis")
    data = scratch.data_dir("redis")
    # The RDB is decompressed (and its CRC-64 checked) while drill-redis starts empty to
    # tell its version; drill-redis then loads it while redis-check-rdb parses it.
    staging = stage_rdb.submit(found, STAGING_SETUP, data, deep=False, durable=False)
    try:
        with r.step("start drill-redis (empty)") as step:
            live = inspect_live(d.redis_container, d.redis_image)
            port = free_port()
            listen, peer = _listen(live)
            flags = ["--bind", listen, "--port", str(port), "--dir", "/data"]
            flags += ["--dbfilename", DRILL_RDB, "--appendonly", "no", "--save", ""]
            flags += ["--protected-mode", "yes" if live.host_network else "no"]
            entrypoint, command = program_argv(live, "redis-server", flags)
            mounts = [Mount("/data", str(data), type="bind")]
            name = start_scratch(scratch, "drill-redis", live, entrypoint, command, port, mounts)
            url = f"redis://127.0.0.1:{port}/0"
            wait_until_loaded(url, name, d.timeout)
            setup = read_redis_setup(url, name)
            step.detail = f"{name} from image {live.image}: Redis {setup.redis_version} on :{port}"
        with r.step("validate the RDB (version, CRC-64) and stage it") as step:
            try:
                check_loadable(rdb_version_of(found), setup, found.manifest.name)
            except RdbTooNew as error:
                raise RdbTooNew(
                    f"{error}; for the drill, give redis_image of a newer Redis"
                ) from None
            staged = staging.result()
            rdb = staged.rdb
            step.detail = f"RDB v{rdb.rdb_version}, {rdb.size} bytes, {rdb.checksum_detail}"
    finally:
        staging.wait()  # never tear the scratch folder down under it
    with r.step("load the RDB, redis-check-rdb alongside") as step:
        checked = load_while_checking(found, staged, data, setup, url, name, d.timeout)
        load = checked.load
        step.detail = (
            f"loaded {load.get('rdb_last_load_keys_loaded', '?')} keys "
            f"({load.get('rdb_last_load_keys_expired', 0)} expired on load); "
            f"{checked.deep_check}"
        )
    checks = prove_redis(url, found.manifest, load, checked.started_at, checked.file_keys)
    r.prove(checks, found.manifest)
    with r.step("gateway /health against the restored Redis") as step:
        step.detail = _gateway(d, scratch, peer, port, url)


def _gateway(d: Drill, scratch: Scratch, redis_host: str, redis_port: int, redis_url: str) -> str:
    """drill-gateway: the live gateway's image, command and settings, but pointed at
    drill-redis and listening on a free port; /health must answer healthy, and
    drill-redis must see the gateway connect. Every setting the drill controls is set,
    whether or not the live environment has it: one left out keeps the gateway's
    default (REDIS_HOST alone: the default port, which is the live Redis's)."""
    live = inspect_live(d.gateway_container, d.gateway_image)
    port = free_port()
    env = {
        **live.environment,
        "REDIS_HOST": redis_host,
        "REDIS_PORT": str(redis_port),
        "REDIS_URL": f"redis://{redis_host}:{redis_port}/0",
        "GATEWAY_HOST": "127.0.0.1" if live.host_network else "0.0.0.0",
        "GATEWAY_PORT": str(port),
    }
    before = connections_received(redis_url)
    start_scratch(scratch, "drill-gateway", live, live.entrypoint, live.command, port, [], env)
    health = check_gateway(f"http://127.0.0.1:{port}/health", d.timeout)
    seen = connections_received(redis_url) - before - 1  # less the count's own connection
    if seen < 1:
        raise DrillCheckFailed(
            "drill-gateway answered healthy without connecting to drill-redis: it takes its "
            "Redis from a setting the drill does not set (it sets REDIS_HOST, REDIS_PORT, "
            "REDIS_URL), so that answer may have come from another Redis"
        )
    return f"{health}; drill-redis saw {seen} connection(s) from the gateway"


# -------------------------------------------------------------- Redis, to a time

AOF_SETUP = RedisSetup("", False, "/data", DRILL_RDB, True, "appendonlydir", "appendonly.aof")


def drill_redis_aof(r: Recovery, d: Drill, scratch: Scratch) -> None:
    """The newest AOF chain shipped, restored in scratch to the time of a marker key
    with a later marker after it: markers written up to that time must be there, the
    later ones not (and Redis must load the base's keys and every byte of the cut)."""
    where = Where(
        d.source.backup_dir,
        d.source.s3_bucket,
        d.source.s3_prefix,
        d.source.s3_endpoint_url,
        d.source.age_identity_file,
    )
    with r.step("find the AOF pieces") as step:
        source_id = newest_aof_source(where)
        if source_id is None:
            step.outcome = "skipped"
            step.detail = "no AOF shipped (backup-redis-aof does not run here): nothing to drill"
            return
        plan = plan_drill_cut(load_generations(where, source_id))
        found = [r.found(piece) for piece in fetch_chain(where, plan)]
        r.used_chain(plan.generation.name, plan.cut.ts, found[-1].location.split(" (")[0])
        step.detail = f"{source_id}: {plan.describe()}; each piece's size and sha256 verified"
    data = scratch.data_dir("redis-aof")
    with r.step("assemble, cut and validate the AOF") as step:
        staged = stage_chain(plan, found, data, AOF_SETUP.appendfilename)
        step.detail = f"{staged.cut_detail}; {staged.check}"
        r.point(plan.cut.ts, staged.last_command, plan.cut.how, plan.cut.undone)
        place_chain(staged, data, AOF_SETUP)
    with r.step("start drill-redis-aof on it") as step:
        live = inspect_live(d.redis_container, d.redis_image)
        port = free_port()
        flags = ["--bind", _listen(live)[0], "--port", str(port), "--dir", "/data"]
        flags += ["--appendonly", "yes", "--appenddirname", AOF_SETUP.appenddirname]
        flags += ["--appendfilename", AOF_SETUP.appendfilename, "--save", ""]
        flags += ["--protected-mode", "yes" if live.host_network else "no"]
        entrypoint, command = program_argv(live, "redis-server", flags)
        mounts = [Mount("/data", str(data), type="bind")]
        started_at = time.time()
        name = start_scratch(scratch, "drill-redis-aof", live, entrypoint, command, port, mounts)
        url = f"redis://127.0.0.1:{port}/0"
        load = wait_until_loaded(url, name, d.timeout)
        step.detail = f"{name} from image {live.image} on :{port}"
    checks = prove_aof(url, load, started_at, staged.base_keys, staged.size, plan.markers())
    r.prove(checks, found[-1].manifest)


# -------------------------------------------------------------------- Prometheus


def drill_prometheus(r: Recovery, d: Drill, scratch: Scratch) -> None:
    found = d.backup(r, "prometheus")
    with r.step("check the archive's blocks") as step:
        step.detail = f"{len(check_archive(found))} complete blocks"
    data = scratch.data_dir("prometheus")
    with r.step("place the blocks") as step:
        restored = restore_blocks(found, data)
        step.detail = f"{len(restored.blocks)} blocks into the drill's data dir"
    with r.step("start drill-prometheus and wait for /-/ready") as step:
        live = inspect_live(d.prometheus_container, d.prometheus_image)
        port = free_port()
        conf = scratch.data_dir("prometheus-conf")
        (conf / "prometheus.yml").write_text("scrape_configs: []\n")
        oldest = found.manifest.source.get("min_time_ms") or time.time() * 1000
        days = int((time.time() - oldest / 1000) // 86400) + 2  # keeps every restored block
        flags = [
            "--config.file=/drill-conf/prometheus.yml",
            f"--web.listen-address={_listen(live)[0]}:{port}",
            "--storage.tsdb.path=/prometheus",
            f"--storage.tsdb.retention.time={days}d",
        ]
        entrypoint, command = program_argv(live, "prometheus", flags)
        mounts = [
            Mount("/prometheus", str(data), type="bind"),
            Mount("/drill-conf", str(conf), type="bind", read_only=True),
        ]
        name = start_scratch(scratch, "drill-prometheus", live, entrypoint, command, port, mounts)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, name, d.timeout)
        step.detail = f"{name} from image {live.image} on :{port}, retention {days}d"
    r.prove(prove_prometheus(url, found.manifest), found.manifest)


# ------------------------------------------------------------------------ config


def drill_config(r: Recovery, d: Drill, scratch: Scratch) -> None:
    found = d.backup(r, "config")
    target = scratch.data_dir("config")
    fill = drill_compose.placeholder_value()
    with r.step("extract safely") as step:
        archive = read_archive(found, need_compose=False)
        env = archive.env
        names = restore_project(found, target, Secrets(env, {s.name: fill for s in archive.slots}))
        step.detail = f"{len(names)} entries, tarfile 'data' filter (nothing outside the folder)"
        if archive.slots:
            step.detail += f"; {len(archive.slots)} secrets withheld in files get the placeholder"
    r.prove(prove_config(target, found.manifest, env), found.manifest)
    if not project_files(target):
        r.skip("restored project up", "no default compose file (compose.yaml, docker-compose.yml)")
        return
    withheld = list(found.manifest.source.get("env_withheld") or [])
    _project_up(r, target, scratch, env, withheld, d.timeout, fill)


def _project_up(
    r: Recovery,
    folder: Path,
    scratch: Scratch,
    env: dict[str, str],
    withheld: list[str],
    timeout: float,
    fill: str,
) -> None:
    """Bring the restored project up isolated (tasks/drill/compose.py), check each of its
    services comes up, and take it down again (`down -v`, its folder) whatever happened."""
    project = None
    try:
        with r.step("bring up the restored project (isolated)") as step:
            project = drill_compose.prepare(folder, scratch.folder, env, withheld, fill)
            drill_compose.up(project, timeout)
            filled = ", ".join(project.placeholders) or "none"
            step.detail = (
                f"compose project {project.name}: services {', '.join(project.services)}; "
                f"placeholders for {filled}; isolation: {drill_compose.summary(project.changes)}"
            )
        results: list[drill_services.ServiceUp] = []
        failed: list[drill_services.ServiceUp] = []
        try:
            with r.step("every service of the restored project up") as step:
                results = drill_services.wait_until_up(project, timeout)
                failed = [s for s in results if not s.up]
                services = [s for s in results if s.service != project.holder]
                step.detail = f"{sum(s.up for s in services)} of {len(services)} up"
                if failed:
                    step.detail += ": " + "; ".join(f"{s.service} {s.evidence}" for s in failed)
                    raise DrillCheckFailed(step.detail)
        finally:
            for s in results:
                outcome = "ok" if s.up else "failed"
                what = "the drill's network namespace" if s.service == project.holder else "service"
                r.steps.append(Step(f"{what} {s.service} up", outcome, s.seconds, s.evidence))
            for s in failed:
                title = f"last {len(s.log_lines)} log lines of service {s.service} (restored)"
                r.attach(title, s.log_lines)
    finally:
        left = drill_compose.down(project) if project else None
        if left:
            r.notes.append(f"could not take down {left}; the next drill removes it")


# -------------------------------------------------------------------------- logs


def drill_logs(r: Recovery, d: Drill, scratch: Scratch) -> None:
    found = d.backup(r, "logs")
    restored = restore_log(found, scratch.data_dir("logs"))
    r.prove(prove_logs(restored, found.manifest), found.manifest)


DRILLS: dict[str, Callable[[Recovery, Drill, Scratch], None]] = {
    "redis": drill_redis,
    "redis-aof": drill_redis_aof,
    "prometheus": drill_prometheus,
    "config": drill_config,
    "logs": drill_logs,
}
