"""The off-site copy: upload to S3 (or an S3-compatible store), verify, list, prune.

Credentials come from boto3's standard chain (env, profile, instance role);
they are never passed around as parameters nor logged. The remote manifest is
uploaded only after the data object is verified, so the remote copy follows
the same "manifest last" rule as the local one.

An upload is one streaming pass over the stored file (boto3's transfer manager reading
a stream): age-encrypted on the way when recipients are given, hashed as it goes
(SHA-256 of what was read and of what was sent, the MD5 of each part for the ETag), so
nothing is read twice and no encrypted copy is written to disk.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
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
from tasks.store.archive import HashingReader, Manifest, age_entry, manifest_name
from tasks.store.encryption import SUFFIX as AGE_SUFFIX
from tasks.store.encryption import EncryptedStream
from tasks.store.kinds import KINDS
from tasks.store.local import Retention, RetentionPlan, plan_retention

# The one source of truth for how objects are uploaded, and so for the ETag S3 gives
# them (`PartDigests`). 8 MiB parts, 4 at a time: as fast as 16 MiB and 64 MiB x 10 parts
# to SeaweedFS here (120 MB/s), and a streamed upload holds its parts in memory until
# they are sent (at most UPLOAD_THREADS + 1 of them): small parts keep the flow small.
PART_SIZE = 8 << 20
UPLOAD_THREADS = 4
TRANSFER = TransferConfig(
    multipart_threshold=PART_SIZE,
    multipart_chunksize=PART_SIZE,
    max_concurrency=UPLOAD_THREADS,
)
TRANSFER.max_in_memory_upload_chunks = UPLOAD_THREADS + 1  # s3transfer's; boto3 hides it


class S3Error(RuntimeError):
    """The remote store refused or could not be reached; says what to fix."""


class S3Unreachable(S3Error, TransientError):
    """The endpoint did not answer; a retry may succeed."""


@dataclass(frozen=True)
class RemoteCopy:
    """An uploaded object, and the manifest uploaded beside it (with the encrypted
    object's facts when it was encrypted on the way)."""

    bucket: str
    key: str
    size: int
    etag: str
    manifest: Manifest | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


# What boto3's credential chain reads from the environment: a client is made again when
# one of them changes (a test, or an operator's shell, switching credentials).
CHAIN_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
MANIFEST_READERS = 8  # manifests fetched at once when listing backups


def client(endpoint_url: str | None) -> Any:
    """An S3 client with bounded timeouts; boto3 finds the credentials. One per endpoint
    and environment, kept: making one loads botocore's service models (0.15-0.5 s, and a
    backup run needs the client four times); boto3's clients are thread-safe."""
    return _client(endpoint_url or None, tuple(os.environ.get(v) for v in CHAIN_VARIABLES))


@functools.lru_cache(maxsize=4)
def _client(endpoint_url: str | None, _environment: tuple[str | None, ...]) -> Any:
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 2, "mode": "standard"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max(UPLOAD_THREADS, MANIFEST_READERS) + 2,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


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


class PartDigests:
    """The ETag S3 gives an object uploaded with `TRANSFER`, computed as its bytes pass:
    its MD5, or for a multipart upload (from `multipart_threshold` bytes on) the MD5 of
    its parts' MD5s and the part count."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self._current = hashlib.md5(usedforsecurity=False)
        self._filled = 0
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.size += view.nbytes
        while view.nbytes:
            piece = view[: TRANSFER.multipart_chunksize - self._filled]
            self._current.update(piece)
            self._filled += piece.nbytes
            view = view[piece.nbytes :]
            if self._filled == TRANSFER.multipart_chunksize:
                self.parts.append(self._current)
                self._current = hashlib.md5(usedforsecurity=False)
                self._filled = 0

    def etag(self) -> str:
        if self.size < TRANSFER.multipart_threshold:
            return self._current.hexdigest()
        parts = self.parts + ([self._current] if self._filled else [])
        combined = hashlib.md5(b"".join(d.digest() for d in parts), usedforsecurity=False)
        return f"{combined.hexdigest()}-{len(parts)}"


def expected_etag(path: Path) -> str:
    """The ETag S3 gives `path` uploaded with `TRANSFER`; read in small chunks."""
    digests = PartDigests()
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digests.update(chunk)
    return digests.etag()


class UploadSource(io.RawIOBase):
    """What the transfer manager reads: `raw` (buffered: a read returns all it asks for
    unless the stream ends, so a part is never cut short) hashed as it passes: SHA-256,
    and the part MD5s S3's ETag is made of."""

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.digests = PartDigests()

    def readable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return self.digests.size

    def read(self, size: int | None = -1) -> bytes:
        data = self._raw.read(size)  # one allocation per 16 MiB part
        self.sha256.update(data)
        self.digests.update(data)
        return data


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
    recipients: tuple[str, ...] = (),
) -> RemoteCopy:
    """Upload the stored file `local_path` in one streaming pass, age-encrypted on the way
    to `recipients` (unless the local copy already is the encrypted file); verify size,
    ETag (and lock) as stored, and that what was read is the stored backup (SHA-256);
    then upload the manifest (locked alike), recording the encrypted object's size and
    SHA-256 when it was encrypted here."""
    s3 = client(endpoint_url)
    encrypting = bool(recipients) and not manifest.encryption.get("local")
    key = object_key(prefix, manifest.name + AGE_SUFFIX if encrypting else remote_name(manifest))
    locking = lock.args() if lock else {}
    known = {} if encrypting else {"Metadata": {"sha256": remote_facts(manifest)[1]}}
    stored = open(local_path, "rb")  # noqa: SIM115 - closed below
    encrypted = EncryptedStream(stored, recipients) if encrypting else None
    source = UploadSource(io.BufferedReader(encrypted, CHUNK) if encrypted else stored)
    try:
        s3.head_bucket(Bucket=bucket)
        s3.upload_fileobj(source, bucket, key, Config=TRANSFER, ExtraArgs={**known, **locking})
        head = s3.head_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as error:
        raise _explain(error, bucket, endpoint_url) from None
    finally:
        if encrypted is not None:
            encrypted.close()
        stored.close()
    _check_stored(key, head, source.digests, lock)
    read: UploadSource | HashingReader = source
    expected = remote_facts(manifest)
    described = manifest
    if encrypted is not None:
        read, expected = encrypted.plain, (manifest.size, manifest.sha256)
        encryption = age_entry(recipients, source.size, source.sha256.hexdigest())
        described = replace(manifest, encryption=encryption)
    if (read.size, read.sha256.hexdigest()) != expected:
        raise S3Error(
            f"{local_path} no longer matches its manifest (size or SHA-256): it changed or "
            f"is damaged since it was stored; {key} is not a complete backup (no manifest)"
        )
    try:
        s3.put_object(
            Bucket=bucket,
            Key=manifest_name(key),
            Body=described.to_json().encode(),
            ContentType="application/json",
            **locking,
        )
    except (BotoCoreError, ClientError) as error:
        raise _explain(error, bucket, endpoint_url) from None
    etag = head["ETag"].strip('"')
    return RemoteCopy(bucket, key, source.size, etag, described)


def _check_stored(
    key: str, head: dict[str, Any], sent: PartDigests, lock: ObjectLock | None
) -> None:
    """The object as S3 stores it is what was sent (size, ETag) and carries its lock."""
    if lock and head.get("ObjectLockMode") != lock.mode:
        raise S3Error(
            f"uploaded {key} carries no {lock.mode} lock (the store ignored it): check that "
            "the bucket has Object Lock enabled; the local backup is kept"
        )
    if head["ContentLength"] != sent.size:
        raise S3Error(
            f"uploaded {key} is {head['ContentLength']} bytes, expected {sent.size}: "
            "the upload is incomplete; the local backup is kept"
        )
    etag = head["ETag"].strip('"')
    if etag != sent.etag():
        raise S3Error(
            f"uploaded {key} has ETag {etag}, which does not match the local file as sent: "
            "the stored object differs; the local backup is kept"
        )


def list_remote(
    bucket: str, prefix: str, kind: str, endpoint_url: str | None, skipped: list[str] | None = None
) -> list[Manifest]:
    """Complete remote backups of a kind (manifest and data object present). A manifest
    that cannot be read (empty, not JSON, fields missing) is no complete backup: it is
    passed over and named in `skipped`, as the local listing does."""
    s3 = client(endpoint_url)
    folder = object_key(prefix, KINDS[kind].folder) + "/"
    keys: set[str] = set()
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            keys.update(item["Key"] for item in page.get("Contents", []))
        complete = [
            key
            for key in sorted(keys)
            if key.endswith(manifest_name("")) and key.removesuffix(manifest_name("")) in keys
        ]
        with ThreadPoolExecutor(MANIFEST_READERS) as pool:  # one GET each: at once
            bodies = pool.map(lambda key: s3.get_object(Bucket=bucket, Key=key)["Body"].read(),
                              complete)  # fmt: skip
            manifests = []
            for key, body in zip(complete, bodies, strict=True):
                try:
                    manifests.append(Manifest.from_json(body))
                except (ValueError, TypeError) as error:
                    reason = type(error).__name__ if not str(error) else str(error).splitlines()[0]
                    if skipped is not None:
                        where = f"s3://{bucket}/{key}"
                        skipped.append(
                            f"{where} is not a readable manifest ({reason}): passed over"
                        )
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
    listed: list[Manifest] | None = None,
    dry_run: bool = False,
    lock_mode: str = "",
) -> RetentionPlan:
    """Apply retention to one source's backups in the bucket (`listed`: as a
    `list_remote` of this run already found them), deleting each manifest before its
    data. With `lock_mode` (the destination's Object Lock), a backup that a GFS rule
    keeps beyond its upload lock gets its lock extended to that rule's end
    (`plan.extended`). `dry_run`: only the plan; nothing is deleted or extended."""
    plan = plan_retention(
        list_remote(bucket, prefix, kind, endpoint_url) if listed is None else listed,
        utc_now(),
        retention,
        source_id,
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
