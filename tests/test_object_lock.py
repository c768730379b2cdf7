"""Immutable S3 copies: with PROXILION_DR_S3_OBJECT_LOCK each upload is locked until
created_at + the kind's retention and SeaweedFS refuses to delete it; a bucket without
Object Lock is refused at the start; pruning a versioned, locked bucket never touches a
locked version, removes expired versions for real and says what it freed.

Objects locked in COMPLIANCE mode cannot be removed by anyone until their date: these
tests lock for seconds, in the sandbox's lock-enabled bucket, under a unique prefix that
is left empty (a COMPLIANCE-locked version is deleted as soon as its date has passed)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from conftest import require
from redis_servers import running_redis
from test_backup_redis import fill

from flows.backup_redis import backup_redis
from sandbox import constants as stack
from sandbox.stack import _ensure_bucket
from tasks.common.clock import parse_time, utc_now
from tasks.store.archive import Manifest, manifest_name, sha256_file
from tasks.store.local import Retention, backup_name
from tasks.store.s3 import ObjectLock, S3Error, object_key, prune_remote, upload_backup

BUCKET = stack.S3_LOCKED_BUCKET
SECONDS = 1 / 86_400  # retention_days of one second
# COMPLIANCE lock of the backup test: outlasts the backup run and the refused deletions
# on a busy machine, then the test waits it out and deletes the backup.
LOCK_SECONDS = 10
UNLOCK_GRACE = timedelta(seconds=30)  # after its date, until the store lets it go


def delete_once_unlocked(s3: Any, key: str, version_id: str) -> datetime:
    """Delete one version as soon as its lock allows (GOVERNANCE bypassed, COMPLIANCE
    waited out, failing UNLOCK_GRACE after its date); returns when it was deleted."""
    head = s3.head_object(Bucket=BUCKET, Key=key, VersionId=version_id)
    until = head.get("ObjectLockRetainUntilDate") or utc_now()
    while True:
        try:
            s3.delete_object(
                Bucket=BUCKET, Key=key, VersionId=version_id, BypassGovernanceRetention=True
            )
            return utc_now()
        except ClientError as error:
            if "AccessDenied" not in str(error) or utc_now() > until + UNLOCK_GRACE:
                raise
        time.sleep(0.5)


@pytest.fixture
def locked_prefix() -> Iterator[str]:
    """A fresh prefix in the sandbox's lock-enabled bucket (created if missing), left
    empty: every version is deleted, a COMPLIANCE-locked one once its date has passed."""
    require(stack.S3_HOST, stack.S3_PORT, "SeaweedFS S3")
    _ensure_bucket()
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    listing = s3.list_object_versions(Bucket=BUCKET, Prefix=prefix + "/")
    for entry in listing.get("DeleteMarkers", []):
        s3.delete_object(Bucket=BUCKET, Key=entry["Key"], VersionId=entry["VersionId"])
    for entry in listing.get("Versions", []):
        delete_once_unlocked(s3, entry["Key"], entry["VersionId"])
    assert versions(prefix) == ([], []), f"{prefix} is not empty"


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
            retention_days=LOCK_SECONDS * SECONDS,
        )
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    key = object_key(locked_prefix, manifest["name"])
    until = parse_time(manifest["created_at"]) + timedelta(seconds=LOCK_SECONDS)
    heads = {each: s3.head_object(Bucket=BUCKET, Key=each) for each in (key, manifest_name(key))}
    for each, head in heads.items():
        assert head["ObjectLockMode"] == "COMPLIANCE"
        assert abs(head["ObjectLockRetainUntilDate"] - until) < timedelta(seconds=1)
        assert utc_now() < until - timedelta(seconds=2), "the run outlasted LOCK_SECONDS"
        with pytest.raises(ClientError, match="AccessDenied"):  # the stolen credential
            s3.delete_object(Bucket=BUCKET, Key=each, VersionId=head["VersionId"])
        with pytest.raises(ClientError, match="AccessDenied"):  # not even with bypass
            s3.delete_object(
                Bucket=BUCKET,
                Key=each,
                VersionId=head["VersionId"],
                BypassGovernanceRetention=True,
            )
    # The lock ends at its date: then the backup can be deleted (and leaves no marker).
    for each, head in heads.items():
        deleted = delete_once_unlocked(s3, each, head["VersionId"])
        assert deleted >= head["ObjectLockRetainUntilDate"]
    assert versions(locked_prefix) == ([], [])


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
