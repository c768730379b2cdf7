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
import redis
from prefect.client.orchestration import get_client
from redis_servers import free_port, running_redis
from restoring import restore_redis_into
from test_backup_config import artifact_rows, write_project
from test_backup_redis import fill

from flows.backup_config import backup_config
from flows.backup_redis import backup_redis
from tasks.redis.restore import restore_rdb
from tasks.redis.setup import RedisSetup
from tasks.store.archive import CompressedWriter
from tasks.store.find import fetch_backup
from tasks.store.s3 import S3Error


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


def test_the_open_folder_warning_is_in_the_not_uploaded_and_unchanged_reports_too(
    tmp_path: Path,
) -> None:
    """Every run's report carries the warning: also a backup whose upload failed (its
    report was published before the warnings were added) and a backup-config run that
    stored nothing because nothing changed (its report had no warnings at all)."""
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()
    backup_dir.chmod(0o755)
    fix = f"chmod -R go-rwx {backup_dir}"
    with running_redis(tmp_path / "src") as source:
        fill(source.url, sessions=50)
        with pytest.raises(S3Error):
            backup_redis(
                redis_url=source.url,
                container="",
                fetch="path",
                data_dir=str(source.dir),
                backup_dir=str(backup_dir),
                s3_bucket="no-such-store",
                s3_endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens
            )
    rows = report_rows()
    assert "NOT uploaded" in rows["uploaded"] and fix in rows["warnings"]

    project = write_project(tmp_path / "project")
    for _ in range(2):  # the second run finds nothing changed
        backup_config(
            project_dir=str(project), env_container="", backup_dir=str(backup_dir), s3_bucket=""
        )
    rows = artifact_rows("backup-config")
    assert rows["result"].startswith("unchanged since") and fix in rows["warnings"]


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
    placed = restore_redis_into(backup_dir, manifest["name"], target)
    assert stat.S_IMODE(placed.path.stat().st_mode) == (existing_mode or 0o600)


def test_restore_gives_placed_files_the_data_dirs_owner_and_the_replaced_rdbs_mode(
    umask_000: None, tmp_path: Path
) -> None:
    """The Redis data dir belongs to the container's redis user, not to root (we run as
    root here): the RDB and the AOF made from it are placed with the data dir's owner
    and the mode of the RDB they replace, whatever the umask."""
    backup_dir = tmp_path / "backups"
    with running_redis(tmp_path / "src") as source:
        fill(source.url, sessions=50)
        manifest = backup_once(source.url, source.dir, backup_dir)
        version = str(redis.Redis.from_url(source.url).info()["redis_version"])
    data = tmp_path / "data"
    data.mkdir()
    (data / "dump.rdb").write_bytes(b"the RDB being replaced")
    (data / "dump.rdb").chmod(0o640)
    redis_user = 999
    os.chown(data, redis_user, redis_user)
    os.chown(data / "dump.rdb", redis_user, redis_user)
    setup = RedisSetup(version, True, str(data), "dump.rdb", True, "appendonlydir", "app.aof")
    found = fetch_backup(backup_dir, "redis", manifest["name"], "", "", None)
    placed = restore_rdb.fn(found, data, setup).placed
    assert placed == ["dump.rdb", "appendonlydir"]
    files = [data / "dump.rdb", *(data / "appendonlydir").rglob("*")]
    assert {(p.name, p.stat().st_uid, p.stat().st_gid) for p in files} == {
        (p.name, redis_user, redis_user) for p in files
    }
    assert (data / "appendonlydir").stat().st_uid == redis_user
    assert stat.S_IMODE((data / "dump.rdb").stat().st_mode) == 0o640
