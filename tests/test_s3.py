"""The off-site copy on a real S3-compatible store (SeaweedFS): verified uploads,
manifest-last listing and retention."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from datetime import timedelta
from pathlib import Path

import boto3
import pytest

from sandbox import constants as stack
from tasks.common.clock import utc_now
from tasks.common.files import CHUNK
from tasks.store.archive import Manifest, sha256_file
from tasks.store.local import Retention, backup_name
from tasks.store.s3 import (
    PART_SIZE,
    TRANSFER,
    S3Error,
    expected_etag,
    list_remote,
    prune_remote,
    upload_backup,
)

SOURCE = "redis.internal:6379"


def stored_backup(
    tmp_path: Path, size: int, age: timedelta = timedelta(0)
) -> tuple[Path, Manifest]:
    created = utc_now() - age
    path = tmp_path / f"{created.timestamp():.0f}-{size}.gz"
    path.write_bytes(os.urandom(size))
    manifest = Manifest(
        kind="redis",
        name=backup_name("redis", created, "gzip", SOURCE),
        created_at=created.isoformat(),
        size=size,
        sha256=sha256_file(path),
        compression="gzip",
        raw_size=size,
        duration_seconds=0.0,
        source_id=SOURCE,
    )
    return path, manifest


@pytest.mark.parametrize("size", [1000, PART_SIZE + 5_000_000])
def test_upload_verifies_single_and_multipart_objects(
    tmp_path: Path, s3_prefix: str, size: int
) -> None:
    path, manifest = stored_backup(tmp_path, size)
    remote = upload_backup(path, manifest, stack.S3_BUCKET, s3_prefix, stack.S3_ENDPOINT)
    assert remote.size == size and remote.etag == expected_etag(path)
    assert ("-" in remote.etag) == (size >= PART_SIZE)
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    head = s3.head_object(Bucket=stack.S3_BUCKET, Key=remote.key)
    assert head["Metadata"]["sha256"] == manifest.sha256
    assert [
        m.name for m in list_remote(stack.S3_BUCKET, s3_prefix, "redis", stack.S3_ENDPOINT)
    ] == [manifest.name]


def test_the_etag_check_reads_a_multipart_object_in_small_chunks(tmp_path: Path) -> None:
    """backup-redis with the upload peaked at 335 MB RSS (target < 300 MB): checking the
    multipart ETag read a whole part (64 MiB) at once, twice over while the next part
    replaced the last. Memory must stay a few chunks, whatever the part size."""
    path = tmp_path / "backup.gz"
    part = TRANSFER.multipart_chunksize
    with open(path, "wb") as out:
        for _ in range(2):
            out.write(os.urandom(part))
        out.write(os.urandom(1000))
    tracemalloc.start()
    try:
        etag = expected_etag(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data = path.read_bytes()
    parts = [data[i : i + part] for i in range(0, len(data), part)]
    digests = b"".join(hashlib.md5(p, usedforsecurity=False).digest() for p in parts)
    assert etag == f"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-3"
    assert peak < 8 * CHUNK, f"computing the ETag held {peak / 2**20:.0f} MiB"


def test_remote_retention_keeps_newest_and_keep_min_and_ignores_incomplete(
    tmp_path: Path, s3_prefix: str
) -> None:
    backups = [stored_backup(tmp_path, 100, timedelta(days=d)) for d in (1, 10, 20, 30)]
    for path, manifest in backups:
        upload_backup(path, manifest, stack.S3_BUCKET, s3_prefix, stack.S3_ENDPOINT)
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    orphan = f"{s3_prefix}/redis/dump_20000101_000000.rdb.gz"  # data without manifest
    s3.put_object(Bucket=stack.S3_BUCKET, Key=orphan, Body=b"incomplete")
    plan = prune_remote(
        stack.S3_BUCKET, s3_prefix, "redis", SOURCE, stack.S3_ENDPOINT, Retention(7, 2)
    )
    assert {m.name for m in plan.delete} == {backups[2][1].name, backups[3][1].name}
    left = {m.name for m in list_remote(stack.S3_BUCKET, s3_prefix, "redis", stack.S3_ENDPOINT)}
    assert left == {backups[0][1].name, backups[1][1].name}
    keys = {
        o["Key"] for o in s3.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=s3_prefix)["Contents"]
    }
    assert orphan in keys, "an incomplete upload is not ours to delete by age"


def test_wrong_credentials_are_named_without_the_secret(
    tmp_path: Path, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-right-secret")
    path, manifest = stored_backup(tmp_path, 100)
    with pytest.raises(S3Error, match="refused access.*check the AWS credentials") as failure:
        upload_backup(path, manifest, stack.S3_BUCKET, s3_prefix, stack.S3_ENDPOINT)
    assert "not-the-right-secret" not in str(failure.value)
