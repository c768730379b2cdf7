"""Putting a snapshot backup back where a Prometheus loads it: the one restore path
that recover-prometheus, recover-host and the restore drill share.

    stage_blocks    unpack the verified backup safely into a hidden folder beside the
                    blocks (Prometheus may still run) and check its blocks against the
                    manifest
    move aside      `tasks.common.aside.move_into_aside` of the data dir's contents
    place_blocks    rename the staged blocks INTO the data dir (never under
                    `snapshots/`, as the runbook's scenario 4 did; no `wal/`, no
                    `chunks_head/`), owned by the data dir's owner
    restore_blocks  the three in order, for a Prometheus that is not running (a
                    folder): the old data is back in place when any of them fails
"""

from __future__ import annotations

import fcntl
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.common.aside import MovedAside, aside_base, move_into_aside, put_back, unique_folder
from tasks.common.certificates import verified
from tasks.common.files import chown_like
from tasks.common.log import run_logger
from tasks.common.secrets import redact_url
from tasks.docker.containers import wait_started
from tasks.prometheus.api import BLOCK_FILES, ULID, PrometheusError
from tasks.store.archive import ArchiveError, Manifest, extract_archive
from tasks.store.find import FoundBackup


def _refuse_if_running(data_dir: Path) -> None:
    """Refuse a data dir whose lock file a running Prometheus holds
    (`--storage.tsdb.use-lockfile`; Prometheus 2.42 has no lock file by default).
    Prometheus takes it with flock(2), which POSIX record locks (lockf) never see."""
    lock = data_dir / "lock"
    if not lock.is_file():
        return
    with open(lock, "rb") as stream:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrometheusError(
                f"a running Prometheus holds {lock}: stop it before restoring into {data_dir}"
            ) from None
        fcntl.flock(stream, fcntl.LOCK_UN)


def _extracted_blocks(folder: Path) -> list[Path]:
    """The complete block folders in an unpacked backup (`<snapshot>/<ULID>/`)."""
    blocks = sorted(
        p for p in [*folder.glob("*"), *folder.glob("*/*")] if p.is_dir() and ULID.fullmatch(p.name)
    )
    for block in blocks:
        chunks = block / "chunks"
        if not all((block / f).is_file() for f in BLOCK_FILES) or not (
            chunks.is_dir() and any(chunks.iterdir())
        ):
            raise ArchiveError(f"block {block.name} in the backup is incomplete; pick another")
    return blocks


def _check_blocks_listed(manifest: Manifest, blocks: list[Path]) -> None:
    """Refuse an archive whose blocks differ from those its manifest lists."""
    listed = {str(b["ulid"]) for b in manifest.source.get("block_list", [])}
    found = {block.name for block in blocks}
    if not found:
        raise ArchiveError(f"backup {manifest.name} holds no TSDB blocks; pick another")
    if listed and found != listed:
        missing, extra = sorted(listed - found), sorted(found - listed)
        raise ArchiveError(
            f"backup {manifest.name} does not hold the blocks its manifest lists (missing: "
            f"{', '.join(missing) or 'none'}; not listed: {', '.join(extra) or 'none'}): "
            "the archive is damaged; pick another backup"
        )


@dataclass(frozen=True)
class StagedBlocks:
    """A verified backup's blocks, unpacked and checked, waiting to be placed."""

    folder: Path
    blocks: list[Path]

    def discard(self) -> None:
        """Remove what is left of the staging folder (nothing once placed)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def staging_folder(data_dir: Path) -> Path:
    """A new hidden folder on the data dir's filesystem for unpacking a backup: beside
    the data dir, or inside it when it is a mount point (Prometheus ignores what is
    not a block), so placing the blocks is a rename."""
    base = aside_base(data_dir)
    return unique_folder(base.parent, f".{base.name}.restoring")


@task(cache_policy=NO_CACHE)
def stage_blocks(found: FoundBackup, data_dir: Path) -> StagedBlocks:
    """Unpack the verified backup (tarfile's `data` filter: nothing lands outside) into
    a new hidden folder on the data dir's filesystem, and refuse it unless every block
    is complete and the blocks are those its manifest lists. Nothing of the data dir's
    contents is touched."""
    data_dir.mkdir(parents=True, exist_ok=True)
    folder = staging_folder(data_dir)
    try:
        extract_archive(found.path, found.manifest.compression, folder)
        blocks = _extracted_blocks(folder)
        _check_blocks_listed(found.manifest, blocks)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return StagedBlocks(folder, blocks)


@task(cache_policy=NO_CACHE)
def place_blocks(staged: StagedBlocks, data_dir: Path) -> list[str]:
    """Move the staged blocks INTO `data_dir` with the data dir's owner. Prometheus must
    be stopped and the current contents moved aside. Returns the blocks placed."""
    _refuse_if_running(data_dir)
    owner = data_dir.stat()
    for block in staged.blocks:
        shutil.move(block, data_dir / block.name)
        chown_like(data_dir / block.name, owner)
    staged.discard()
    return [block.name for block in staged.blocks]


def move_tsdb_aside(data_dir: Path, staged: StagedBlocks | None = None) -> MovedAside:
    """The data dir's contents (blocks, wal/, chunks_head/, the lock; not the staged
    backup) renamed into a new folder `<data dir>.before-restore-<UTC>/` (inside the
    data dir when it is a mount point: `aside_base`), never deleted; the data dir
    stays."""
    keep = (staged.folder,) if staged else ()
    return move_into_aside(data_dir, None, aside_base(data_dir), keep=keep)


def failed_folder(data_dir: Path) -> Path:
    """Where what a failed restore left in the data dir is kept (for a look, never
    deleted) when the old contents are put back: on the same filesystem."""
    base = aside_base(data_dir)
    return unique_folder(base.parent, f"{base.name}.failed-restore")


@dataclass(frozen=True)
class RestoredSnapshot:
    """Blocks put in place for Prometheus to load, and where the old data went."""

    backup: str
    data_dir: Path
    blocks: list[str]
    moved_aside: MovedAside | None


@task(cache_policy=NO_CACHE)
def restore_blocks(found: FoundBackup, data_dir: Path) -> RestoredSnapshot:
    """Put a verified backup into the TSDB dir of a Prometheus that is not running (a
    container created but not started, a scratch folder, a folder a Prometheus will
    start from): stage and check its blocks, move the current contents aside, place
    the blocks. When anything fails, the data dir is as it was. Start Prometheus with a
    retention that covers the blocks."""
    if data_dir.exists():
        _refuse_if_running(data_dir)
    staged = stage_blocks.fn(found, data_dir)
    moved = None
    try:
        _refuse_if_running(data_dir)  # again: it may have started while we unpacked
        if any(e for e in data_dir.iterdir() if e != staged.folder):
            moved = move_tsdb_aside(data_dir, staged)
        placed = place_blocks.fn(staged, data_dir)
    except BaseException:
        if moved is not None:
            put_back(moved, failed_folder(data_dir), None, keep=(staged.folder,))
        raise
    finally:
        staged.discard()
    run_logger().info(
        "Restored %d blocks of %s into %s (previous contents: %s)",
        len(placed),
        found.manifest.name,
        data_dir,
        moved.folder if moved else "none",
    )
    return RestoredSnapshot(found.manifest.name, data_dir, placed, moved)


@task(cache_policy=NO_CACHE)
def wait_until_ready(prometheus_url: str, container: str, timeout_seconds: float) -> None:
    """Poll /-/ready until 200; fail at once if the container exits."""
    url = prometheus_url.rstrip("/") + "/-/ready"

    def ready() -> str | None:
        try:
            response = httpx.get(url, timeout=5, verify=verified())
        except httpx.HTTPError as error:
            return type(error).__name__
        return None if response.status_code == 200 else f"HTTP {response.status_code}"

    wait_started(ready, container, timeout_seconds, f"Prometheus at {redact_url(prometheus_url)}")
