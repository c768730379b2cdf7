"""recover-prometheus: runbook scenario 4, Prometheus data corrupt; put a snapshot back.

Runbook steps: find the backup (here, else S3) and verify it, check the target
(container, data dir, retention covering the backup, free disk), stop Prometheus,
move the data dir's contents aside, put the snapshot's blocks INTO the data dir (no
wal/, no chunks_head/, the data dir's owner), start, wait for /-/ready, verify
runtimeinfo and a query inside the oldest restored block. Any failure after the data
was moved puts it back and starts Prometheus again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.support.failures import explains_failure, run_name
from flows.support.hooks import FLOW_HOOKS
from flows.support.parameter_docs import shared_args
from flows.support.parameters import dr_flow
from flows.support.pushes import recovered, recovery_failed, with_hooks
from flows.support.recovery import BackupSource, Recovery, find_backup, roll_back
from flows.support.settings import SETTING, resolve
from tasks.common.aside import MovedAside, aside_base
from tasks.common.files import require_free_space
from tasks.common.locks import exclusive, lock_name
from tasks.common.secrets import url_server
from tasks.docker.containers import (
    container_running,
    find_data_dir,
    start_container,
    stop_container,
)
from tasks.prometheus.prove import check_archive, prove_prometheus
from tasks.prometheus.restore import (
    StagedBlocks,
    failed_folder,
    move_tsdb_aside,
    place_blocks,
    stage_blocks,
    wait_until_ready,
)
from tasks.prometheus.setup import check_retention_covers, read_prometheus_setup
from tasks.store.find import FoundBackup
from tasks.store.kinds import prometheus_source_id


@dataclass(frozen=True)
class Target:
    """The Prometheus being restored, as inspected before it was touched."""

    container: str
    prometheus_url: str
    data: Path
    was_running: bool


@dr_flow(
    name="recover-prometheus",
    flow_run_name=run_name("prometheus recovery"),
    log_prints=True,
    **with_hooks(FLOW_HOOKS, recovery_failed("prometheus")),
)
@explains_failure
@shared_args
def recover_prometheus(
    backup: str = "latest",
    container: str = SETTING,
    prometheus_url: str = "",
    data_dir: str = "",
    dry_run: bool = False,
    backup_dir: str = "",
    s3_bucket: str = "",
    s3_prefix: str = "",
    s3_endpoint_url: str = "",
    age_identity_file: str = "",
    start_timeout_seconds: float = 300.0,
) -> dict[str, Any]:
    """Restore Prometheus's TSDB from a snapshot backup, then prove it (scenario 4).

    The data dir's current contents are moved aside (never deleted; the path is in
    the report) and put back if any later step fails. Empty parameters and `setting` take their
    PROXILION_DR_* setting. Returns RTO, RPO, the backup used, where the old data
    went, each step.

    Args:
        backup: Backup to restore: `latest` (newest complete one) or a name as listed,
            e.g. `prometheus/prometheus_20260101_000000.tar.gz`. Looked for in
            backup_dir, then S3.
        container: Docker container running Prometheus (stopped and started).
            `setting`: PROXILION_DR_PROMETHEUS_CONTAINER (default prometheus).
        prometheus_url: How to reach that Prometheus. Empty:
            PROXILION_DR_PROMETHEUS_URL (default http://localhost:9090). A URL with a
            password is refused here: put it in PROXILION_DR_PROMETHEUS_URL.
        data_dir: Host folder of Prometheus's TSDB. Empty:
            PROXILION_DR_PROMETHEUS_DATA_DIR (default: none, found from the
            container's mount of --storage.tsdb.path).
        dry_run: ON: check everything (backup, checksum, blocks, container, data dir,
            retention, free disk) and publish the plan; nothing is stopped, moved or
            written. OFF (the default): a LIVE RESTORE. Prometheus is stopped and its
            TSDB is REPLACED by the backup's blocks: the data dir's current contents
            are moved aside to `<data dir>.before-restore-<UTC>/` (never deleted;
            remove it by hand once satisfied), so samples scraped since the backup
            are no longer served. Any failure after the move puts them back.
        {backup_source}
        start_timeout_seconds: Seconds Prometheus may take to become ready.
    """
    p = resolve(locals(), container="prometheus_container", data_dir="prometheus_data_dir")
    source = BackupSource.of(p)
    url = p["prometheus_url"]
    recovery = Recovery("recover-prometheus", dry_run=dry_run)
    with recovery.reporting(), exclusive(lock_name("backup-prometheus", url_server(url))):
        found = find_backup(recovery, source, "prometheus", backup, prometheus_source_id(url))
        target = inspect_target(recovery, found, p["container"], url, p["data_dir"] or None)
        check_free_disk(recovery, found, target)
        if dry_run:
            plan(recovery, found, target)
        else:
            restore(recovery, found, target, start_timeout_seconds)
    result = recovery.result()
    recovered("prometheus", result)
    return result


def inspect_target(
    r: Recovery, found: FoundBackup, container: str, url: str, data_dir: str | None
) -> Target:
    """The step "inspect Prometheus": its TSDB dir, and a retention that keeps the
    restored blocks (read from the container's command line when it does not answer)."""
    with r.step("inspect Prometheus") as step:
        if not container:
            raise ValueError("container is empty: name the Prometheus container to restore")
        was_running = container_running(container)
        setup = read_prometheus_setup(url, container)
        data = find_data_dir(container, setup.tsdb_path, data_dir)
        step.detail = (
            f"{'running' if was_running else 'not running'}, TSDB {setup.tsdb_path} = {data}; "
            + check_retention_covers(found, setup)
        )
    return Target(container, url, data, was_running)


def check_free_disk(r: Recovery, found: FoundBackup, t: Target) -> None:
    """Room for the unpacked backup beside the data dir (it is renamed in)."""
    with r.step("check free disk") as step:
        needed = found.manifest.raw_size
        free = require_free_space(t.data.parent, needed, f"unpacking {found.manifest.name}")
        step.detail = f"{free / 1e6:.0f} MB free beside {t.data}, {needed / 1e6:.0f} MB needed"


def plan(r: Recovery, found: FoundBackup, t: Target) -> None:
    """The dry run: read the archive's blocks; say what the live run would do."""
    with r.step("check the archive's blocks (dry run)") as step:
        step.detail = f"{len(check_archive(found))} complete blocks"
    r.skip("stop Prometheus", f"would stop container {t.container}")
    aside = aside_base(t.data)
    r.skip("move current data aside", f"would move the contents of {t.data} into "
           f"{aside.parent}/{aside.name}.before-restore-<UTC>/")  # fmt: skip
    r.skip("place the blocks", f"would put the blocks of {found.manifest.name} into {t.data}")
    r.skip("start Prometheus and verify", "would wait for /-/ready and query old history")


def restore(r: Recovery, found: FoundBackup, t: Target, timeout: float) -> None:
    """Unpack and check the blocks while Prometheus still runs, then swap them in."""
    staged = None
    try:
        with r.step("unpack and check the blocks") as step:
            staged = stage_blocks(found, t.data)
            step.detail = f"{len(staged.blocks)} complete blocks, as the manifest lists"
        swap(r, t, found, staged, timeout)
    finally:
        if staged is not None:
            staged.discard()


def swap(r: Recovery, t: Target, found: FoundBackup, staged: StagedBlocks, timeout: float) -> None:
    """Stop, move aside, place, start, prove; on any failure put the old data back."""
    moved: MovedAside | None = None
    try:
        with r.step("stop Prometheus") as step:
            stopped = stop_container(t.container)
            step.detail = f"container {t.container} " + ("stopped" if stopped else "was stopped")
        with r.step("move current data aside") as step:
            moved = move_tsdb_aside(t.data, staged)
            r.moved_aside.append(str(moved.folder))
            step.detail = f"{len(moved.names)} entries → {moved.folder}"
        with r.step("place the blocks") as step:
            blocks = place_blocks(staged, t.data)
            step.detail = f"{len(blocks)} blocks into {t.data} (no wal/, chunks_head/)"
        with r.step("start Prometheus and wait for /-/ready"):
            start_container(t.container)
            wait_until_ready(t.prometheus_url, t.container, timeout)
        r.prove(prove_prometheus(t.prometheus_url, found.manifest), found.manifest)
        r.healthy()
    except BaseException:
        keep = (staged.folder,)
        roll_back(r, t.container, moved, failed_folder(t.data), None, t.was_running, keep)
        raise


if __name__ == "__main__":
    recover_prometheus()
