"""verify-restore: the monthly restore drill; proves every kind of backup restores.

Runbook steps ("Monthly restore test"): remove what a killed drill left behind, then
for each component — find the backup (newest complete one, or the one named; here,
else S3) and verify its checksum, restore it into a scratch environment beside the
live stack (`drill-redis`, `drill-gateway`, `drill-prometheus`: the live containers'
images, free ports, their own data folders, the `proxilion-dr.drill` label) and prove
it (the config backup's compose project is brought up too, isolated under its own
project name: tasks/drill/compose.py); tear the scratch environment down whatever
happened; publish one report (per
component: backup used, its age = RPO, restore time = RTO, each check with its
evidence), push the outcome to the Pushgateway, and fail naming every failed check.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

from docker.types import Mount
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.support.hooks import FLOW_HOOKS
from flows.support.parameter_docs import shared_args
from flows.support.pushes import drill_failed, pushgateway_url, with_hooks
from flows.support.recovery import Recovery, Step, _escape, age_text, one_line
from flows.support.restoring import find_backup
from flows.support.settings import SETTING, resolve
from flows.support.steps import run_name
from tasks.common import pushgateway as metrics
from tasks.common.locks import exclusive, lock_name
from tasks.config.capture import ENV_FILE, archive_folder
from tasks.config.redact import COMPOSE_PATTERNS
from tasks.docker.compose import validate_compose
from tasks.drill import compose as drill_compose
from tasks.drill import services as drill_services
from tasks.drill.scratch import (
    LiveShape,
    Scratch,
    free_port,
    inspect_live,
    new_scratch,
    one_drill_per_host,
    program_argv,
    remove_leftovers,
    start_scratch,
    tear_down,
)
from tasks.prometheus.capture import restore_snapshot
from tasks.prometheus.restore import (
    check_archive,
    check_recorded_values,
    verify_history,
    wait_until_ready,
)
from tasks.redis.restore import (
    RdbTooNew,
    check_gateway,
    check_loadable,
    decompress_staged,
    load_while_checking,
    rdb_version_of,
    read_redis_setup,
    verify_keyspace,
    wait_until_loaded,
)
from tasks.redis.sample import check_sample, open_clients
from tasks.store.archive import extract_archive, iter_chunks, open_decompressed
from tasks.store.find import FoundBackup

Component = Literal["redis", "prometheus", "config", "logs"]
COMPONENTS: tuple[Component, ...] = ("redis", "prometheus", "config", "logs")
FLOW = "verify-restore"


class DrillCheckFailed(RuntimeError):
    """A restored backup does not hold what its manifest says."""


class DrillFailed(RuntimeError):
    """One or more checks of the drill failed; the message names each."""


@flow(
    name=FLOW,
    flow_run_name=run_name("restore drill"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, drill_failed(), states=("on_crashed",)),
)
@shared_args
def verify_restore(
    components: list[Component] | None = None,
    redis_backup: str = "latest",
    prometheus_backup: str = "latest",
    config_backup: str = "latest",
    logs_backup: str = "latest",
    redis_container: str = SETTING,
    gateway_container: str = SETTING,
    prometheus_container: str = SETTING,
    redis_image: str = "",
    gateway_image: str = "",
    prometheus_image: str = "",
    scratch_dir: str = "",
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
    age_identity_file: str = "",
    start_timeout_seconds: float = 300.0,
) -> dict[str, Any]:
    """Restore backups into scratch containers beside the live stack and prove them.

    Nothing live is touched: the live containers are only inspected for their image,
    programs and settings. Fails when any check fails, naming each failed check.
    Returns per component: backup used, RPO, RTO and every check with its evidence.

    Args:
        components: What to drill: redis (with a gateway against it), prometheus,
            config, logs. Empty: all four.
        redis_backup: `latest` (newest complete Redis backup of any server) or a name
            as listed, e.g. `redis/dump_20260101_000000_1a2b3c4d.rdb.gz`.
        prometheus_backup: `latest` or a Prometheus backup's name.
        config_backup: `latest` or a config backup's name.
        logs_backup: `latest` or a log backup's name.
        redis_container: Live Redis container whose image the drill's Redis runs.
            `setting`: PROXILION_DR_REDIS_CONTAINER (default proxilion-redis).
        gateway_container: Live gateway container whose image, command and settings the
            drill's gateway uses (its Redis and port replaced by the drill's).
            `setting`: PROXILION_DR_GATEWAY_CONTAINER (default proxilion-gateway).
        prometheus_container: Live Prometheus container whose image the drill uses.
            `setting`: PROXILION_DR_PROMETHEUS_CONTAINER (default prometheus).
        redis_image: Run the drill's Redis from this image instead (e.g. a newer Redis);
            empty = the live container's image.
        gateway_image: Run the drill's gateway from this image instead; empty = live's.
        prometheus_image: Run the drill's Prometheus from this image instead; empty =
            the live container's image.
        scratch_dir: Host folder for the drill's data (a `drill-<run>` folder inside,
            removed afterwards). Empty: PROXILION_DR_DRILL_SCRATCH_DIR
            (default /var/tmp/proxilion-dr-drill).
        {backup_source}
        start_timeout_seconds: Seconds each scratch service may take to start and load.
    """
    chosen = list(dict.fromkeys(components or COMPONENTS))
    parameters = {k: v for k, v in locals().items() if k not in ("components", "chosen")}
    # No run parameter (yet) for the age identity: the drill decrypts with the setting.
    p = resolve(parameters, scratch_dir="drill_scratch_dir")
    started = time.perf_counter()
    records: list[Recovery] = []
    notes: list[str] = []
    try:
        with exclusive(lock_name(FLOW, str(p["scratch_dir"]))), one_drill_per_host():
            removed = remove_leftovers(Path(p["scratch_dir"]))
            if removed:
                notes.append(f"removed leftovers of an earlier drill: {', '.join(removed)}")
                print(f"Removed leftovers of an earlier drill: {', '.join(removed)}")
            run = str(flow_run.get_id() or time.time_ns())
            scratch = new_scratch(Path(p["scratch_dir"]), run)
            try:
                for component in chosen:
                    records.append(_drill(component, p, scratch))
            finally:
                left = tear_down(scratch)
                if left:
                    notes.append(f"could not remove: {', '.join(left)} (the next drill will)")
    except Exception:  # the drill could not even run (Docker down, lock busy): say so
        metrics.push_drill(pushgateway_url(), False, time.perf_counter() - started)
        raise
    return _finish(records, notes, time.perf_counter() - started)


def _drill(component: Component, p: dict[str, Any], scratch: Scratch) -> Recovery:
    """One component's drill, recorded; a failure stops that component only."""
    r = Recovery(component)
    try:
        DRILLS[component](r, p, scratch)
        r.healthy()
    except Exception as error:  # noqa: BLE001 - recorded; the drill goes on
        if r.failed_step() is None:
            r.steps.append(Step("drill", "failed", 0.0, one_line(error)))
    finally:
        r.discard_temporary()
    return r


def _backup(r: Recovery, p: dict[str, Any], kind: str) -> FoundBackup:
    """Find and verify (size, SHA-256) the backup of `kind` named by `<kind>_backup`."""
    return find_backup(r, {**p, "backup": p[f"{kind}_backup"]}, kind, None)


def _listen(live: LiveShape) -> tuple[str, str]:
    """(address a scratch service listens on, host its scratch peers reach it by)."""
    return ("127.0.0.1", "127.0.0.1") if live.host_network else ("0.0.0.0", "drill-redis")


# ------------------------------------------------------------------------- Redis

DRILL_RDB = "dump.rdb"  # drill-redis's dbfilename


def drill_redis(r: Recovery, p: dict[str, Any], scratch: Scratch) -> None:
    found = _backup(r, p, "redis")
    timeout = p["start_timeout_seconds"]
    data = scratch.data_dir("redis")
    staging = data / ".staging"
    # The RDB is decompressed (and its CRC-64 checked) while drill-redis starts empty to
    # tell its version; drill-redis then loads it while redis-check-rdb parses it.
    staged = decompress_staged.submit(found, staging, DRILL_RDB, deep=False, durable=False)
    try:
        with r.step("start drill-redis (empty)") as step:
            live = inspect_live(p["redis_container"], p["redis_image"] or None)
            port = free_port()
            listen, peer = _listen(live)
            flags = ["--bind", listen, "--port", str(port), "--dir", "/data"]
            flags += ["--dbfilename", DRILL_RDB, "--appendonly", "no", "--save", ""]
            flags += ["--protected-mode", "yes" if live.host_network else "no"]
            entrypoint, command = program_argv(live, "redis-server", flags)
            mounts = [Mount("/data", str(data), type="bind")]
            name = start_scratch(scratch, "drill-redis", live, entrypoint, command, port, mounts)
            url = f"redis://127.0.0.1:{port}/0"
            wait_until_loaded(url, name, timeout)
            setup = read_redis_setup(url, name)
            step.detail = f"{name} from image {live.image}: Redis {setup.redis_version} on :{port}"
        with r.step("validate the RDB (version, CRC-64) and stage it") as step:
            try:
                check_loadable(rdb_version_of(found), setup, found.manifest.name)
            except RdbTooNew as error:
                raise RdbTooNew(
                    f"{error}; for the drill, give redis_image of a newer Redis"
                ) from None
            rdb = staged.result()
            step.detail = f"RDB v{rdb.rdb_version}, {rdb.size} bytes, {rdb.checksum_detail}"
    finally:
        staged.wait()  # never tear the scratch folder down under it
    with r.step("load the RDB, redis-check-rdb alongside") as step:
        checked = load_while_checking(found, rdb, staging, data, setup, url, name, timeout)
        load = checked.load
        step.detail = (
            f"loaded {load.get('rdb_last_load_keys_loaded', '?')} keys "
            f"({load.get('rdb_last_load_keys_expired', 0)} expired on load); "
            f"{checked.deep_check}"
        )
    with r.step("key counts per db") as step:
        step.detail = verify_keyspace(url, found.manifest.source.get("keyspace", {}), load)
    sample = found.manifest.source.get("sample") or []
    if not sample:
        r.skip("keyed sample", "the backup records no sample (taken before backups did)")
    else:
        with r.step("keyed sample") as step:
            problems = check_sample(open_clients(url, sorted({e["db"] for e in sample})), sample)
            if problems:
                more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
                raise DrillCheckFailed(
                    f"{len(problems)} of {len(sample)} sampled keys differ: "
                    + "; ".join(problems[:3])
                    + more
                )
            step.detail = f"{len(sample)} keys: type and value digest match"
    with r.step("gateway /health against the restored Redis") as step:
        step.detail = _gateway(p, scratch, peer, port)


GATEWAY_SETTINGS = ("REDIS_HOST", "REDIS_PORT", "REDIS_URL", "GATEWAY_HOST", "GATEWAY_PORT")


def _gateway(p: dict[str, Any], scratch: Scratch, redis_host: str, redis_port: int) -> str:
    """drill-gateway: the live gateway's image, command and settings, but pointed at
    drill-redis and listening on a free port; /health must answer healthy."""
    live = inspect_live(p["gateway_container"], p["gateway_image"] or None)
    port = free_port()
    listen = "127.0.0.1" if live.host_network else "0.0.0.0"
    wanted = {
        "REDIS_HOST": redis_host,
        "REDIS_PORT": str(redis_port),
        "REDIS_URL": f"redis://{redis_host}:{redis_port}/0",
        "GATEWAY_HOST": listen,
        "GATEWAY_PORT": str(port),
    }
    env = {**live.environment, **{k: v for k, v in wanted.items() if k in live.environment}}
    env.setdefault("GATEWAY_PORT", str(port))
    start_scratch(scratch, "drill-gateway", live, live.entrypoint, live.command, port, [], env)
    return check_gateway(f"http://127.0.0.1:{port}/health", p["start_timeout_seconds"])


# -------------------------------------------------------------------- Prometheus


def drill_prometheus(r: Recovery, p: dict[str, Any], scratch: Scratch) -> None:
    found = _backup(r, p, "prometheus")
    with r.step("check the archive's blocks") as step:
        step.detail = f"{len(check_archive(found))} complete blocks"
    data = scratch.data_dir("prometheus")
    with r.step("place the blocks") as step:
        restored = restore_snapshot(found.backup_dir, found.manifest.name, data, found.path)
        step.detail = f"{len(restored.blocks)} blocks into the drill's data dir"
    with r.step("start drill-prometheus and wait for /-/ready") as step:
        live = inspect_live(p["prometheus_container"], p["prometheus_image"] or None)
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
        wait_until_ready(url, name, p["start_timeout_seconds"])
        step.detail = f"{name} from image {live.image} on :{port}, retention {days}d"
    with r.step("query the oldest restored block") as step:
        step.detail = verify_history(url, found)
    recorded = found.manifest.source.get("recorded") or {}
    if not recorded.get("values"):
        r.skip("values recorded at backup time", "the backup records none (made before)")
    else:
        with r.step("values recorded at backup time") as step:
            step.detail = check_recorded_values(url, recorded)


# ------------------------------------------------------------------------ config


def drill_config(r: Recovery, p: dict[str, Any], scratch: Scratch) -> None:
    found = _backup(r, p, "config")
    source = found.manifest.source
    target = scratch.data_dir("config")
    with r.step("extract safely") as step:
        names = extract_archive(found.path, found.manifest.compression, target)
        step.detail = f"{len(names)} entries, tarfile 'data' filter (nothing outside the folder)"
    folder = target / archive_folder(found.manifest.name)
    with r.step("expected files present") as step:
        expected = list(source.get("files") or [])
        absent = [name for name in expected if not (folder / name).is_file()]
        if absent:
            raise DrillCheckFailed(
                f"the archive lacks {', '.join(absent)} (its manifest lists them)"
            )
        if source.get("missing"):
            raise DrillCheckFailed(
                f"the backup lacks {', '.join(source['missing'])}: missing from the project "
                "folder when it was taken"
            )
        step.detail = f"all {len(expected)} files: {', '.join(expected)}"
    with r.step("withheld secrets listed") as step:
        redacted = source.get("redacted") or {}
        in_files = "; ".join(f"{f}: {', '.join(names)}" for f, names in redacted.items())
        step.detail = (
            f"environment withheld: {', '.join(source.get('env_withheld') or []) or 'none'}; "
            f"replaced in files: {in_files or 'none'}"
        )
    composes = [n for n in source.get("files") or [] if _is_compose(n)]
    if not composes:
        r.skip("compose file validates", "the backup holds no compose file")
        return
    env = _env_file(folder / ENV_FILE)
    with r.step("compose file validates") as step:
        checks = []
        for name in composes:
            check = validate_compose(folder / name, env)
            dummies = ", ".join(check.dummies) or "none"
            checks.append(f"{name}: services {', '.join(check.services)}; dummies for {dummies}")
        step.detail = " | ".join(checks)
    if not drill_compose.compose_files(folder):
        r.skip("restored project up", "no default compose file (compose.yaml, docker-compose.yml)")
        return
    _project_up(r, folder, scratch, env, list(source.get("env_withheld") or []), p)


def _project_up(
    r: Recovery,
    folder: Path,
    scratch: Scratch,
    env: dict[str, str],
    withheld: list[str],
    p: dict[str, Any],
) -> None:
    """Bring the restored project up isolated (tasks/drill/compose.py), check each of its
    services comes up, and take it down again (`down -v`, its folder) whatever happened."""
    project = None
    try:
        with r.step("bring up the restored project (isolated)") as step:
            project = drill_compose.prepare(folder, scratch.folder, env, withheld)
            drill_compose.up(project, p["start_timeout_seconds"])
            filled = ", ".join(project.placeholders) or "none"
            step.detail = (
                f"compose project {project.name}: services {', '.join(project.services)}; "
                f"placeholders for {filled}; isolation: {drill_compose.summary(project.changes)}"
            )
        results: list[drill_services.ServiceUp] = []
        failed: list[drill_services.ServiceUp] = []
        try:
            with r.step("every service of the restored project up") as step:
                results = drill_services.wait_until_up(project, p["start_timeout_seconds"])
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


def _is_compose(name: str) -> bool:
    return "/" not in name and any(fnmatch(name, pattern) for pattern in COMPOSE_PATTERNS)


def _env_file(path: Path) -> dict[str, str]:
    """env.txt of a config backup (`NAME=value` lines) as a dict."""
    if not path.is_file():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


# -------------------------------------------------------------------------- logs


def drill_logs(r: Recovery, p: dict[str, Any], scratch: Scratch) -> None:
    found = _backup(r, p, "logs")
    with r.step("decompress fully and count lines") as step:
        lines = size = 0
        with open_decompressed(found.path, found.manifest.compression) as stream:
            for chunk in iter_chunks(stream):
                lines += chunk.count(b"\n")
                size += len(chunk)
        want = found.manifest.source.get("lines")
        if want is not None and lines != want:
            raise DrillCheckFailed(f"{lines} lines decompressed, the manifest says {want}")
        if size != found.manifest.raw_size:
            raise DrillCheckFailed(
                f"{size} bytes decompressed, the manifest says {found.manifest.raw_size}"
            )
        step.detail = f"{lines} lines, {size} bytes: as the manifest says"


DRILLS: dict[str, Callable[[Recovery, dict[str, Any], Scratch], None]] = {
    "redis": drill_redis,
    "prometheus": drill_prometheus,
    "config": drill_config,
    "logs": drill_logs,
}


# ------------------------------------------------------------------------ report


def _finish(records: list[Recovery], notes: list[str], seconds: float) -> dict[str, Any]:
    """Publish the report, push the outcome, fail naming every failed check."""
    failed = [r for r in records if r.failed_step()]
    gateway = pushgateway_url()
    for r in records:
        metrics.push_restore(
            gateway, r.flow, r.failed_step() is None, r.healthy_seconds, metrics.RESTORE_JOB
        )
    metrics.push_drill(gateway, not failed, seconds)
    message = "; ".join(r.failure() for r in failed)
    create_markdown_artifact(
        markdown=report(records, notes, seconds, message),
        key=FLOW,
        description="restore drill report",
    )
    if failed:
        raise DrillFailed(f"{FLOW} failed: {message}")
    return {
        "ok": True,
        "seconds": round(seconds, 3),
        "components": {r.flow: r.result() for r in records},
        "notes": notes,
    }


def report(records: list[Recovery], notes: list[str], seconds: float, failure: str) -> str:
    """The drill's markdown: a summary row per component, then each one's checks."""
    lines = [f"# {FLOW}: {'FAILED' if failure else 'OK'} ({seconds:.1f} s)", ""]
    if failure:
        lines += [f"**{_escape(failure)}**", ""]
    lines += ["| component | backup | age (RPO) | restore time (RTO) | result |"]
    lines += ["|---|---|---|---|---|"]
    for r in records:
        b = r.backup or {}
        rpo = age_text(b["rpo_seconds"]) if b else "—"
        rto = f"{r.healthy_seconds:.1f} s" if r.healthy_seconds is not None else "—"
        outcome = "failed" if r.failed_step() else "ok"
        lines.append(f"| {r.flow} | `{b.get('name', '—')}` | {rpo} | {rto} | {outcome} |")
    lines += [""] + [f"- {_escape(note)}" for note in notes]
    for r in records:
        lines += ["", re.sub(r"^# ", "## ", r.markdown(), count=1)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    verify_restore()
