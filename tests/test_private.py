"""Backups belong to their owner on disk: folders 0700 and files 0600 (staging and
manifests too) whatever the umask, 0750/0640 with group read, a warning for an open
existing folder, and restores that keep the target's mode."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from redis_servers import running_redis

from flows.backup_redis import backup_redis
from tasks.archive import CompressedWriter
from tasks.redis import place_rdb
from tests.test_backup_redis import fill


@pytest.fixture
def umask_000() -> Iterator[None]:
    """The most permissive umask: any mode we do not set ourselves shows up as 0777/0666."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes_under(root: Path) -> dict[str, int]:
    """The permission bits of `root` and everything below it, by relative name."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def backup_once(source_url: str, data_dir: Path, backup_dir: Path) -> dict:
    return backup_redis(
        redis_url=source_url,
        container="",
        fetch="path",
        data_dir=str(data_dir),
        backup_dir=str(backup_dir),
        s3_bucket="",
    )


def report_rows() -> dict[str, str]:
    with get_client(sync_client=True) as client:
        [artifact] = [a for a in client.read_latest_artifacts() if a.key == "backup-redis"]
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return {row["field"]: row["value"] for row in data}


def test_backup_folders_and_files_are_owner_only_under_umask_000(
    umask_000: None, tmp_path: Path
) -> None:
    backup_dir = tmp_path / "new" / "backups"  # created by the flow
    with running_redis(tmp_path / "src") as source:
        fill(source.url, sessions=50)
        manifest = backup_once(source.url, source.dir, backup_dir)
    found = modes_under(tmp_path / "new")
    stored = "backups/" + manifest["name"]
    assert stored in found and stored + ".manifest.json" in found
    assert found == {name: 0o700 if (tmp_path / "new" / name).is_dir() else 0o600 for name in found}
    assert "warnings" not in report_rows()


def test_group_read_setting_gives_0750_and_0640(
    umask_000: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXILION_DR_BACKUP_GROUP_READ", "true")
    backup_dir = tmp_path / "backups"
    with running_redis(tmp_path / "src") as source:
        fill(source.url, sessions=50)
        backup_once(source.url, source.dir, backup_dir)
    found = modes_under(backup_dir)
    assert found == {name: 0o750 if (backup_dir / name).is_dir() else 0o640 for name in found}


def test_staging_file_is_owner_only_while_written(umask_000: None, tmp_path: Path) -> None:
    writer = CompressedWriter(tmp_path / ".dump.partial", "gzip")
    try:
        writer.write(b"session state")
        assert stat.S_IMODE((tmp_path / ".dump.partial").stat().st_mode) == 0o600
    finally:
        writer.abort()


def test_an_open_existing_backup_folder_is_warned_in_the_report(tmp_path: Path) -> None:
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    backup_dir.chmod(0o755)  # as `mkdir` under the usual umask 022 leaves it
    with running_redis(tmp_path / "src") as source:
        fill(source.url, sessions=50)
        backup_once(source.url, source.dir, backup_dir)
    warning = report_rows()["warnings"]
    assert f"backup folder {backup_dir} is open to other users (mode 0755)" in warning
    assert f"chmod -R go-rwx {backup_dir}" in warning
    assert stat.S_IMODE(backup_dir.stat().st_mode) == 0o755  # reported, not changed


@pytest.mark.parametrize("existing_mode", [0o640, None])
def test_restore_keeps_the_target_files_mode(
    umask_000: None, tmp_path: Path, existing_mode: int | None
) -> None:
    backup_dir = tmp_path / "backups"
    with running_redis(tmp_path / "src") as source:
        fill(source.url, sessions=50)
        manifest = backup_once(source.url, source.dir, backup_dir)
    target = tmp_path / "target"
    target.mkdir()
    if existing_mode is not None:
        (target / "dump.rdb").write_bytes(b"old")
        (target / "dump.rdb").chmod(existing_mode)
    placed = place_rdb(backup_dir, manifest["name"], target)
    assert stat.S_IMODE(placed.path.stat().st_mode) == (existing_mode or 0o600)
