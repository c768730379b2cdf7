"""Finding the backup a recovery restores: `latest` is the newest here or in S3, a
damaged local copy gives way to a verified S3 copy, an unreadable S3 manifest does not
block the others, a dry run keeps nothing it downloaded, and an age identity is needed
only for encrypted backups.

Real config backups of a small project, in the sandbox's S3 under a prefix of the
test's own."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from test_backup_config import write_project
from throwaway_services import redis_container

from flows.backup_config import backup_config
from flows.backup_redis import backup_redis
from flows.recover_redis import recover_redis
from sandbox import constants as stack
from tasks.store.archive import manifest_name
from tasks.store.find import fetch_backup
from tasks.store.s3 import object_key


def s3(prefix: str) -> dict[str, Any]:
    return {"s3_bucket": stack.S3_BUCKET, "s3_prefix": prefix, "s3_endpoint_url": stack.S3_ENDPOINT}


def config_backup(project: Path, backup_dir: Path, prefix: str) -> dict[str, Any]:
    """A config backup stored locally and in S3, in a second of its own (names have
    one-second resolution)."""
    second = int(time.time())
    while int(time.time()) == second:  # the next second starts: a condition, not a pause
        time.sleep(0.01)
    return backup_config(
        project_dir=str(project), env_container="", backup_dir=str(backup_dir), **s3(prefix)
    )


def drop_local(backup_dir: Path, name: str) -> None:
    """The host that holds backup_dir lost this backup (or never had it)."""
    (backup_dir / manifest_name(name)).unlink()
    (backup_dir / name).unlink()


def find(backup_dir: Path, prefix: str, name: str = "latest", **more: Any) -> Any:
    return fetch_backup.fn(backup_dir, "config", name, **s3(prefix), **more)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_project(tmp_path / "project")


def test_latest_is_the_newest_here_or_in_s3(
    project: Path, backup_dir: Path, s3_prefix: str
) -> None:
    """A local copy used to win over a newer backup that only S3 holds (a named restore
    leaves an older backup in backup_dir, which `latest` then kept choosing)."""
    older = config_backup(project, backup_dir, s3_prefix)
    (project / "alerts.yml").write_text("groups: []\n")
    newer = config_backup(project, backup_dir, s3_prefix)
    drop_local(backup_dir, newer["name"])
    found = find(backup_dir, s3_prefix)
    assert found.manifest.name == newer["name"] != older["name"]
    assert found.location.startswith(f"s3://{stack.S3_BUCKET}/{s3_prefix}/config/")
    found.discard()


def test_a_damaged_local_copy_gives_way_to_the_verified_s3_copy_and_says_so(
    project: Path, backup_dir: Path, s3_prefix: str
) -> None:
    manifest = config_backup(project, backup_dir, s3_prefix)
    stored = backup_dir / manifest["name"]
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    found = find(backup_dir, s3_prefix)
    assert found.manifest.name == manifest["name"]
    assert found.location.endswith("(downloaded, not kept)")
    assert any("the local copy fails its checksum" in note for note in found.notes)
    assert stored.read_bytes() == bytes(damaged)  # left for a look, not overwritten
    found.discard()
    assert not found.path.exists()


def test_an_unreadable_s3_manifest_is_passed_over_with_a_note(
    project: Path, backup_dir: Path, s3_prefix: str
) -> None:
    manifest = config_backup(project, backup_dir, s3_prefix)
    drop_local(backup_dir, manifest["name"])
    bucket = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    broken = object_key(s3_prefix, "config/config_20991231_000000_deadbeef.tar.gz")
    bucket.put_object(Bucket=stack.S3_BUCKET, Key=broken, Body=b"x")
    bucket.put_object(Bucket=stack.S3_BUCKET, Key=manifest_name(broken), Body=b"")
    found = find(backup_dir, s3_prefix)
    assert found.manifest.name == manifest["name"]
    [note] = found.notes
    assert f"s3://{stack.S3_BUCKET}/{manifest_name(broken)} is not a readable manifest" in note


def test_a_missing_identity_file_blocks_only_encrypted_backups(
    project: Path, backup_dir: Path, s3_prefix: str, tmp_path: Path
) -> None:
    manifest = config_backup(project, backup_dir, s3_prefix)
    found = find(backup_dir, s3_prefix, identity_file=tmp_path / "no-such-key.txt")
    assert found.manifest.name == manifest["name"] and found.location == f"local {backup_dir}"


def test_a_dry_run_writes_nothing_into_backup_dir(
    tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    """The backup is only in S3: the dry run downloads it to verify it (size, SHA-256,
    the RDB), into a temporary folder it removes; backup_dir stays as it was."""
    with redis_container(tmp_path) as service:
        redis.Redis(port=service.port).set("session:1", "x")
        backup_redis(
            redis_url=service.url,
            container=service.name,
            fetch="container",
            backup_dir=str(tmp_path / "old-host"),
            **s3(s3_prefix),
        )
        result = recover_redis(
            container=service.name,
            redis_url=service.url,
            dry_run=True,
            backup_dir=str(backup_dir),
            gateway_health_url="",
            **s3(s3_prefix),
        )
    assert result["ok"] and result["backup"]["from"].endswith("(downloaded, not kept)")
    assert list(backup_dir.rglob("*")) == []
