"""The off-site copy: upload to S3 (or an S3-compatible store), verify, list, prune.

Credentials come from boto3's standard chain (env, profile, instance role);
they are never passed around as parameters nor logged. The remote manifest is
uploaded only after the data object is verified, so the remote copy follows
the same "manifest last" rule as the local one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from tasks.common.clock import parse_time, utc_now
from tasks.common.files import CHUNK
from tasks.common.retry import TransientError, retrying_task
from tasks.store.archive import Manifest, manifest_name
from tasks.store.encryption import SUFFIX as AGE_SUFFIX
from tasks.store.kinds import KINDS
from tasks.store.local import Retention, RetentionPlan, plan_retention

# The one source of truth for how objects are uploaded, and so for the ETag S3 gives
# them (`expected_etag`). 16 MiB parts, 4 at a time, uploaded as fast as 64 MiB x 10
# (110 MB/s against 100 MB/s to SeaweedFS here) and keeps the flow's memory small.
PART_SIZE = 16 << 20
UPLOAD_THREADS = 4
TRANSFER = TransferConfig(
    multipart_threshold=PART_SIZE,
    multipart_chunksize=PART_SIZE,
    max_concurrency=UPLOAD_THREADS,
)


class S3Error(RuntimeError):
    """The remote store refused or could not be reached; says what to fix."""


class S3Unreachable(S3Error, TransientError):
    """The endpoint did not answer; a retry may succeed."""


@dataclass(frozen=True)
class RemoteCopy:
    bucket: str
    key: str
    size: int
    etag: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def client(endpoint_url: str | None) -> Any:
    """An S3 client with bounded timeouts; boto3 finds the credentials."""
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 2, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)


def object_key(prefix: str, name: str) -> str:
    return f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


def remote_name(manifest: Manifest) -> str:
    """The object's name in the bucket: the backup's, plus `.age` when encrypted."""
    return manifest.name + AGE_SUFFIX if manifest.encryption else manifest.name


def remote_facts(manifest: Manifest) -> tuple[int, str]:
    """Size and SHA-256 of the object as stored (the encrypted one when encrypted)."""
    if manifest.encryption:
        return manifest.encryption["size"], manifest.encryption["sha256"]
    return manifest.size, manifest.sha256


def _explain(error: Exception, bucket: str, endpoint_url: str | None) -> S3Error:
    where = endpoint_url or "AWS S3"
    if isinstance(error, EndpointConnectionError):
        return S3Unreachable(
            f"S3 endpoint {where} is unreachable: check s3_endpoint_url and the network"
        )
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404"):
            return S3Error(
                f"S3 bucket {bucket!r} does not exist at {where}: create it or fix s3_bucket"
            )
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return S3Error(
                f"S3 at {where} refused access to bucket {bucket!r} ({code}): check the AWS "
                "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or profile) and policy"
            )
        return S3Error(f"S3 at {where} answered {code or error} for bucket {bucket!r}")
    return S3Error(f"S3 at {where} failed: {type(error).__name__}: {error}")


def expected_etag(path: Path) -> str:
    """The ETag S3 gives `path` uploaded with `TRANSFER`: its MD5, or for a multipart
    upload the MD5 of its parts' MD5s and the part count; read in small chunks."""
    size = path.stat().st_size
    single = size < TRANSFER.multipart_threshold
    part_size = max(size, 1) if single else TRANSFER.multipart_chunksize
    digests = []
    with open(path, "rb") as stream:
        for _ in range(-(-max(size, 1) // part_size)):
            digest = hashlib.md5(usedforsecurity=False)
            left = part_size
            while left and (chunk := stream.read(min(CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
            digests.append(digest)
    if single:
        return digests[0].hexdigest()
    combined = hashlib.md5(b"".join(d.digest() for d in digests), usedforsecurity=False)
    return f"{combined.hexdigest()}-{len(digests)}"


@dataclass(frozen=True)
class ObjectLock:
    """S3 Object Lock retention for one backup's objects: until then neither a mistake
    nor a stolen credential deletes or overwrites them (COMPLIANCE: not even the root
    account; GOVERNANCE: only with the bypass permission)."""

    mode: Literal["GOVERNANCE", "COMPLIANCE"]
    retain_until: datetime

    @classmethod
    def for_backup(cls, mode: str, created_at: str, retention_days: float) -> ObjectLock:
        """Locked for the kind's retention from the backup's creation."""
        upper = mode.upper()
        if upper not in ("GOVERNANCE", "COMPLIANCE"):
            raise ValueError(f"object lock mode {mode!r}: use governance or compliance")
        until = parse_time(created_at) + timedelta(days=retention_days)
        return cls(upper, until)  # type: ignore[arg-type]

    def args(self) -> dict[str, Any]:
        return {"ObjectLockMode": self.mode, "ObjectLockRetainUntilDate": self.retain_until}


def require_object_lock(bucket: str, endpoint_url: str | None) -> None:
    """Refuse, before any work, a bucket without Object Lock when locking is asked for
    (a lock on an object in such a bucket is refused or, worse, ignored)."""
    where = endpoint_url or "AWS S3"
    try:
        answer = client(endpoint_url).get_object_lock_configuration(Bucket=bucket)
        enabled = answer.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
            raise _explain(error, bucket, endpoint_url) from None
        enabled = None
    except BotoCoreError as error:
        raise _explain(error, bucket, endpoint_url) from None
    if enabled != "Enabled":
        raise S3Error(
            f"S3 bucket {bucket!r} at {where} does not have Object Lock enabled, so backups "
            "cannot be made undeletable there: create a bucket with Object Lock enabled "
            "(`aws s3api create-bucket --object-lock-enabled-for-bucket`) and point "
            "s3_bucket at it, or unset PROXILION_DR_S3_OBJECT_LOCK"
        )


@retrying_task(2, 10)
def upload_backup(
    local_path: Path,
    manifest: Manifest,
    bucket: str,
    prefix: str,
    endpoint_url: str | None,
    lock: ObjectLock | None = None,
) -> RemoteCopy:
    """Upload data (`local_path`: the encrypted copy when `manifest.encryption` says
    so), verify its size and checksum (and lock) as stored, then upload the manifest
    (locked alike)."""
    s3 = client(endpoint_url)
    key = object_key(prefix, remote_name(manifest))
    size, sha256 = remote_facts(manifest)
    locking = lock.args() if lock else {}
    try:
        s3.head_bucket(Bucket=bucket)
        s3.upload_file(
            str(local_path),
            bucket,
            key,
            Config=TRANSFER,
            ExtraArgs={"Metadata": {"sha256": sha256}, **locking},
        )
        head = s3.head_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as error:
        raise _explain(error, bucket, endpoint_url) from None
    if lock and head.get("ObjectLockMode") != lock.mode:
        raise S3Error(
            f"uploaded {key} carries no {lock.mode} lock (the store ignored it): check that "
            f"bucket {bucket!r} has Object Lock enabled; the local backup is kept"
        )
    etag = head["ETag"].strip('"')
    if head["ContentLength"] != size:
        raise S3Error(
            f"uploaded {key} is {head['ContentLength']} bytes, expected {size}: "
            "the upload is incomplete; the local backup is kept"
        )
    if etag != expected_etag(Path(local_path)):
        raise S3Error(
            f"uploaded {key} has ETag {etag}, which does not match the local file: "
            "the stored object differs; the local backup is kept"
        )
    try:
        s3.put_object(
            Bucket=bucket,
            Key=manifest_name(key),
            Body=manifest.to_json().encode(),
            ContentType="application/json",
            **locking,
        )
    except (BotoCoreError, ClientError) as error:
        raise _explain(error, bucket, endpoint_url) from None
    return RemoteCopy(bucket=bucket, key=key, size=size, etag=etag)


def list_remote(bucket: str, prefix: str, kind: str, endpoint_url: str | None) -> list[Manifest]:
    """Complete remote backups of a kind (manifest and data object present)."""
    s3 = client(endpoint_url)
    folder = object_key(prefix, KINDS[kind].folder) + "/"
    keys: set[str] = set()
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            keys.update(item["Key"] for item in page.get("Contents", []))
        manifests = []
        for key in sorted(k for k in keys if k.endswith(manifest_name(""))):
            if key.removesuffix(manifest_name("")) not in keys:
                continue
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            manifests.append(Manifest.from_json(body))
    except (BotoCoreError, ClientError) as error:
        raise _explain(error, bucket, endpoint_url) from None
    return sorted(manifests, key=lambda m: m.created_at)


@retrying_task(2, 10)
def prune_remote(
    bucket: str,
    prefix: str,
    kind: str,
    source_id: str,
    endpoint_url: str | None,
    retention: Retention,
    dry_run: bool = False,
    lock_mode: str = "",
) -> RetentionPlan:
    """Apply retention to one source's backups in the bucket, deleting each manifest
    before its data. With `lock_mode` (the destination's Object Lock), a backup that a
    GFS rule keeps beyond its upload lock gets its lock extended to that rule's end
    (`plan.extended`). `dry_run`: only the plan; nothing is deleted or extended."""
    plan = plan_retention(
        list_remote(bucket, prefix, kind, endpoint_url), utc_now(), retention, source_id
    )
    if dry_run:
        return plan
    s3 = client(endpoint_url)
    try:
        if lock_mode:
            _follow_rules(s3, bucket, prefix, plan, retention, lock_mode)
        versioned = s3.get_bucket_versioning(Bucket=bucket).get("Status") in (
            "Enabled",
            "Suspended",
        )
        deleted = []
        for manifest in plan.delete:
            key = object_key(prefix, remote_name(manifest))
            if not versioned:
                s3.delete_object(Bucket=bucket, Key=manifest_name(key))
                s3.delete_object(Bucket=bucket, Key=key)
            elif not _delete_versions(s3, bucket, manifest.name, [manifest_name(key), key], plan):
                continue
            deleted.append(manifest)
    except (BotoCoreError, ClientError) as error:
        raise _explain(error, bucket, endpoint_url) from None
    plan.delete = deleted
    return plan


def _follow_rules(
    s3: Any, bucket: str, prefix: str, plan: RetentionPlan, retention: Retention, mode: str
) -> None:
    """Extend the Object Lock of each kept backup (data and manifest) to the end of the
    longest rule that keeps it, when that is later than its lock: the copy a monthly
    rule keeps for a year stays undeletable that year. Only ever extended."""
    now = utc_now()
    for manifest in plan.keep:
        created = parse_time(manifest.created_at)
        until = retention.kept_until(created, plan.reasons.get(manifest.name, []), now)
        if until <= created + timedelta(days=retention.days):
            continue  # the upload's own lock already covers it
        key = object_key(prefix, remote_name(manifest))
        changed = False
        for each in (key, manifest_name(key)):
            current = s3.head_object(Bucket=bucket, Key=each).get("ObjectLockRetainUntilDate")
            if current is None or current < until:
                s3.put_object_retention(
                    Bucket=bucket,
                    Key=each,
                    Retention={"Mode": mode.upper(), "RetainUntilDate": until},
                )
                changed = True
        if changed:
            rules = ", ".join(plan.reasons.get(manifest.name, []))
            plan.extended.append(f"{manifest.name} until {until:%Y-%m-%d %H:%M} ({rules})")


def _versions(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    """Every version and delete marker of exactly `key`."""
    found: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=key):
        for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
            if entry["Key"] == key:
                found.append(entry)
    return found


def delete_keys(
    bucket: str, keys: list[str], label: str, endpoint_url: str | None, plan: RetentionPlan
) -> bool:
    """Delete the objects of one backup (`keys`, manifests first) as pruning does: for
    real in a versioned bucket, and not at all while one is under Object Lock (then
    `label` is listed in `plan.locked`). True when deleted."""
    s3 = client(endpoint_url)
    try:
        status = s3.get_bucket_versioning(Bucket=bucket).get("Status")
        if status in ("Enabled", "Suspended"):
            return _delete_versions(s3, bucket, label, keys, plan)
        for key in keys:
            s3.delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as error:
        raise _explain(error, bucket, endpoint_url) from None
    return True


def _delete_versions(
    s3: Any, bucket: str, label: str, keys: list[str], plan: RetentionPlan
) -> bool:
    """In a versioned bucket, delete every version of a backup's objects for real (a
    plain delete only hides them behind a delete marker, freeing nothing), unless one
    is still under Object Lock: then nothing of the backup is touched (no error, no
    marker) and it is listed in `plan.locked` until a later run. True when deleted."""
    now = utc_now()
    entries = [(key, entry) for key in keys for entry in _versions(s3, bucket, key)]
    until = []
    for key, entry in entries:
        if "Size" not in entry:
            continue  # a delete marker holds no data and no lock
        head = s3.head_object(Bucket=bucket, Key=key, VersionId=entry["VersionId"])
        retain = head.get("ObjectLockRetainUntilDate")
        if retain is not None and retain > now or head.get("ObjectLockLegalHoldStatus") == "ON":
            until.append(retain)
    if until:
        latest = max((u for u in until if u is not None), default=None)
        plan.locked.append(f"{label} (locked until {latest or 'legal hold'})")
        return False
    for key, entry in entries:  # the manifest's versions first, as `keys` lists them
        s3.delete_object(Bucket=bucket, Key=key, VersionId=entry["VersionId"])
        plan.freed_bytes += entry.get("Size", 0)
    return True
