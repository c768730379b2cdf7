"""Immutable S3 copies: with PROXILION_DR_S3_OBJECT_LOCK each upload is locked until
created_at + the kind's retention and SeaweedFS refuses to delete it; a bucket without
Object Lock is refused at the start; pruning a versioned, locked bucket never touches a
locked version, removes expired versions for real and says what it freed.

Objects locked in COMPLIANCE mode cannot be removed by anyone until their date: these
tests lock for seconds, in the sandbox's lock-enabled bucket, under a unique prefix."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from redis_servers import running_redis

from flows.backup_redis import backup_redis
from sandbox import constants as stack
from sandbox.stack import _ensure_bucket
from tasks.common.clock import parse_time, utc_now
from tasks.store.archive import Manifest, manifest_name, sha256_file
from tasks.store.local import Retention, backup_name
from tasks.store.s3 import ObjectLock, S3Error, object_key, prune_remote, upload_backup
from tests.conftest import require
from tests.test_backup_redis import fill

BUCKET = stack.S3_LOCKED_BUCKET
SECONDS = 1 / 86_400  # retention_days of one second


@pytest.fixture
def locked_prefix() -> Iterator[str]:
    """A fresh prefix in the sandbox's lock-enabled bucket (created if missing); what is
    no longer locked afterwards is removed, every version."""
    require(stack.S3_HOST, stack.S3_PORT, "SeaweedFS S3")
    _ensure_bucket()
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    listing = s3.list_object_versions(Bucket=BUCKET, Prefix=prefix + "/")
    for entry in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
        with contextlib.suppress(ClientError):  # still COMPLIANCE-locked: expires in seconds
            s3.delete_object(
                Bucket=BUCKET,
                Key=entry["Key"],
                VersionId=entry["VersionId"],
                BypassGovernanceRetention=True,
            )


def versions(prefix: str) -> tuple[list[str], list[str]]:
    """(versions, delete markers) under `prefix`, by key."""
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    listing = s3.list_object_versions(Bucket=BUCKET, Prefix=prefix + "/")
    return (
        sorted(v["Key"] for v in listing.get("Versions", [])),
        sorted(m["Key"] for m in listing.get("DeleteMarkers", [])),
    )


def test_backup_is_locked_until_its_retention_ends_and_the_store_refuses_deletion(
    tmp_path: Path, locked_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXILION_DR_S3_OBJECT_LOCK", "compliance")
    with running_redis(tmp_path / "src") as source:
        fill(source.url, sessions=50)
        manifest = backup_redis(
            redis_url=source.url,
            container="",
            fetch="path",
            data_dir=str(source.dir),
            backup_dir=str(tmp_path / "backups"),
            s3_bucket=BUCKET,
            s3_prefix=locked_prefix,
            s3_endpoint_url=stack.S3_ENDPOINT,
            retention_days=60 * SECONDS,
        )
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    key = object_key(locked_prefix, manifest["name"])
    for each in (key, manifest_name(key)):
        head = s3.head_object(Bucket=BUCKET, Key=each)
        assert head["ObjectLockMode"] == "COMPLIANCE"
        expected = parse_time(manifest["created_at"]) + timedelta(seconds=60)
        assert abs(head["ObjectLockRetainUntilDate"] - expected) < timedelta(seconds=1)
        with pytest.raises(ClientError, match="AccessDenied"):  # the stolen credential
            s3.delete_object(Bucket=BUCKET, Key=each, VersionId=head["VersionId"])
        with pytest.raises(ClientError, match="AccessDenied"):  # not even with bypass
            s3.delete_object(
                Bucket=BUCKET,
                Key=each,
                VersionId=head["VersionId"],
                BypassGovernanceRetention=True,
            )


def test_a_bucket_without_object_lock_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROXILION_DR_S3_OBJECT_LOCK", "governance")
    with pytest.raises(S3Error, match="does not have Object Lock enabled"):
        backup_redis(
            redis_url="redis://127.0.0.1:1/0",  # never reached: refused first
            container="",
            backup_dir=str(tmp_path / "backups"),
            s3_bucket=stack.S3_BUCKET,
            s3_prefix="unused",
            s3_endpoint_url=stack.S3_ENDPOINT,
        )
    assert not (tmp_path / "backups").exists()


def upload(tmp_path: Path, prefix: str, seconds_ago: int, lock_seconds: float) -> Manifest:
    """A small backup of source `s`, dated `seconds_ago`, locked (GOVERNANCE) for
    `lock_seconds` from now."""
    created = utc_now() - timedelta(seconds=seconds_ago)
    name = backup_name("redis", created, "gzip", "s")
    data = tmp_path / Path(name).name
    data.write_bytes(uuid.uuid4().bytes * 100)
    manifest = Manifest(
        kind="redis",
        name=name,
        created_at=created.isoformat(),
        size=data.stat().st_size,
        sha256=sha256_file(data),
        compression="gzip",
        raw_size=0,
        duration_seconds=0,
        source_id="s",
    )
    lock = ObjectLock("GOVERNANCE", utc_now() + timedelta(seconds=lock_seconds))
    upload_backup.fn(data, manifest, BUCKET, prefix, stack.S3_ENDPOINT, lock)
    return manifest


def prune(prefix: str):  # noqa: ANN201 - RetentionPlan
    return prune_remote.fn(BUCKET, prefix, "redis", "s", stack.S3_ENDPOINT, Retention(0, 1))


def test_pruning_keeps_locked_versions_and_removes_expired_ones_for_real(
    tmp_path: Path, locked_prefix: str
) -> None:
    oldest = upload(tmp_path, locked_prefix, 30, lock_seconds=3600)  # locked for long
    expiring = upload(tmp_path, locked_prefix, 20, lock_seconds=2)
    newest = upload(tmp_path, locked_prefix, 10, lock_seconds=3600)
    deadline = time.monotonic() + 30
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    key = object_key(locked_prefix, expiring.name)
    while s3.head_object(Bucket=BUCKET, Key=key)["ObjectLockRetainUntilDate"] > utc_now():
        assert time.monotonic() < deadline, "the 2-second lock did not expire"
        time.sleep(0.5)

    plan = prune(locked_prefix)

    assert [m.name for m in plan.delete] == [expiring.name]
    assert [entry.split(" ")[0] for entry in plan.locked] == [oldest.name]
    assert plan.freed_bytes >= expiring.size
    kept, markers = versions(locked_prefix)
    assert markers == []  # nothing hidden behind delete markers
    assert kept == sorted(
        object_key(locked_prefix, n) + suffix
        for n in (oldest.name, newest.name)
        for suffix in ("", ".manifest.json")
    )
    again = prune(locked_prefix)  # no errors, no markers piling up on the locked one
    assert again.delete == [] and len(again.locked) == 1
    assert versions(locked_prefix) == (kept, [])
