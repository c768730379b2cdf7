"""The steps every backup flow ends with, in the runbook's order: store (manifest
last), upload and verify, catch up earlier uploads, prune here and there, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.support.failures import mark_safe
from flows.support.settings import settings
from tasks.common.errors import one_line
from tasks.common.files import OWNER_ONLY, Modes, exposure_warnings
from tasks.common.log import run_logger
from tasks.store.archive import CompressedFile, Manifest
from tasks.store.encryption import AgeCopy, RecipientError, parse_recipients
from tasks.store.kinds import KINDS
from tasks.store.local import (
    GFS_RULES,
    Retention,
    commit_local,
    list_local,
    prune_local,
    record_manifest,
    resolve_retention,
)
from tasks.store.report import NOT_UPLOADED, publish_backup_report
from tasks.store.s3 import ObjectLock, list_remote, prune_remote, require_object_lock, upload_backup


@dataclass(frozen=True)
class Destination:
    """Where backups go and how long they stay: the parameters all backup flows share."""

    backup_dir: Path
    s3_bucket: str
    s3_prefix: str
    s3_endpoint_url: str | None
    retention: Retention
    modes: Modes = OWNER_ONLY
    age_recipients: tuple[str, ...] = ()  # encrypt the S3 copy to these public keys
    object_lock: str = ""  # governance/compliance: S3 copies locked for the retention
    encrypt_local: bool = False  # the local copy is the age-encrypted file too

    def __post_init__(self) -> None:
        if self.encrypt_local and not self.age_recipients:
            raise RecipientError(
                "PROXILION_DR_AGE_ENCRYPT_LOCAL is on but no age recipient is set: set "
                "PROXILION_DR_AGE_RECIPIENTS (or age_recipients) to the public keys to "
                "encrypt to, or turn PROXILION_DR_AGE_ENCRYPT_LOCAL off"
            )
        self.check_remote()

    @classmethod
    def from_parameters(cls, p: dict[str, Any], kind: str) -> Destination:
        """From a flow's resolved parameters; the GFS rules a `keep_*` parameter leaves
        empty from the kind's `*_KEEP` setting; group read, the age recipients and local
        encryption from their settings unless the flow has such a parameter."""
        current = settings()
        retention = resolve_retention(  # refuses bad rules before any work is done
            p["retention_days"],
            p["keep_min"],
            {rule: p.get(f"keep_{rule}") for rule in GFS_RULES},
            getattr(current, f"{kind}_keep"),
        )
        return cls(
            Path(p["backup_dir"]),
            p["s3_bucket"],
            p["s3_prefix"],
            p["s3_endpoint_url"] or None,
            retention,
            Modes.for_group_read(current.backup_group_read),
            tuple(parse_recipients(p.get("age_recipients") or current.age_recipients)),
            current.s3_object_lock if p["s3_bucket"] else "",
            current.age_encrypt_local,
        )

    @property
    def uploads_encrypted(self) -> bool:
        """The S3 copy is age-encrypted (a bucket and recipients are set)."""
        return bool(self.s3_bucket and self.age_recipients)

    @property
    def age_copy(self) -> AgeCopy | None:
        """How a capture encrypts in its pass: the local copy itself, or not at all (the
        copy for S3 is encrypted while it uploads)."""
        return AgeCopy(self.age_recipients) if self.encrypt_local else None

    @property
    def upload_recipients(self) -> tuple[str, ...]:
        """Whom an upload encrypts a plain local copy to (none: uploaded plain)."""
        return self.age_recipients if self.uploads_encrypted else ()

    def check_remote(self) -> None:
        """At the start: a bucket asked to lock backups must have Object Lock."""
        if self.s3_bucket and self.object_lock:
            require_object_lock(self.s3_bucket, self.s3_endpoint_url)


def catch_up_uploads(
    to: Destination, kind: str, source_id: str
) -> tuple[list[str], list[Manifest]]:
    """Upload every complete local backup of this kind and source that S3 lacks (a
    run whose upload failed left it local only), so local and S3 converge. They go up
    as this destination wants them: age-encrypted, locked. Returns their names, and
    every complete backup of the kind in S3 now (for the retention that follows)."""
    remote = list_remote(to.s3_bucket, to.s3_prefix, kind, to.s3_endpoint_url)
    names = {m.name for m in remote}
    missing = [m for m in list_local(to.backup_dir, kind, source_id) if m.name not in names]
    for manifest in missing:
        upload_stored(to, manifest)
    return [m.name for m in missing], sorted(remote + missing, key=lambda m: m.created_at)


def upload_stored(to: Destination, manifest: Manifest) -> str:
    """Upload a complete local backup (one an earlier run could not upload) as this
    destination wants it; returns the object's URL."""
    url = upload(to, to.backup_dir / manifest.local_name, manifest)
    print(f"uploaded {manifest.name}, which S3 lacked (an earlier upload failed)")
    return url


def upload(to: Destination, stored: Path, manifest: Manifest) -> str:
    """Upload one stored backup (age-encrypted on the way when the destination wants it,
    locked for its retention), then record the encrypted object's facts in its local
    manifest too; returns the object's URL."""
    lock = None
    if to.object_lock:
        lock = ObjectLock.for_backup(to.object_lock, manifest.created_at, to.retention.days)
    copy = upload_backup(
        stored, manifest, to.s3_bucket, to.s3_prefix, to.s3_endpoint_url, lock,
        to.upload_recipients,
    )  # fmt: skip
    if copy.manifest is not None and copy.manifest.encryption != manifest.encryption:
        manifest.encryption = copy.manifest.encryption
        record_manifest(to.backup_dir, manifest, to.modes)
    return copy.url


class UploadFailed(RuntimeError):
    """A backup stored locally did not reach S3; `stored` is where it is safe."""

    def __init__(self, stored: Path, error: Exception) -> None:
        super().__init__(one_line(error))
        self.stored = stored
        self.error = error


def store_copy(
    staged: CompressedFile, manifest: Manifest, to: Destination
) -> tuple[Path, str | None, str]:
    """Store one staged backup (manifest last) and upload it; returns (local path, S3
    URL, its Object Lock or ""). With age recipients, the S3 copy is age-encrypted
    (`.age`) while it uploads, and its facts are added to the manifest (here and in S3)
    once it is verified; the local copy stays plain unless `to.encrypt_local`: then the
    local file is that `.age`, made in the capture's pass, and uploaded as it is. With
    an object lock mode it is locked for the retention's days. Raises UploadFailed once
    it is stored locally."""
    if to.encrypt_local:  # the staged file is the encrypted one: stored and uploaded
        assert staged.encrypted is not None, "a capture ignored the age_copy it was given"
        manifest.encryption = {**staged.encrypted.describe(), "local": True}
    stored = commit_local(to.backup_dir, staged, manifest, to.modes)
    mark_safe(f"the backup is complete locally at {stored}")
    if not to.s3_bucket:
        return stored, None, ""
    lock = None
    if to.object_lock:
        lock = ObjectLock.for_backup(to.object_lock, manifest.created_at, to.retention.days)
    try:
        remote = upload(to, stored, manifest)
    except Exception as error:
        mark_safe(
            f"the backup is complete locally at {stored}; the next successful "
            f"{manifest.kind} backup uploads it"
        )
        raise UploadFailed(stored, error) from error
    mark_safe(f"the backup is complete locally at {stored} and in {remote}")
    return stored, remote, f"{lock.mode} until {lock.retain_until}" if lock else ""


def keep_backup(
    staged: CompressedFile, manifest: Manifest, to: Destination, details: dict[str, Any]
) -> tuple[Path, str | None]:
    """Store, upload (`store_copy`), prune and report one staged backup; returns (local
    path, S3 URL). An upload failure still publishes the report ("stored locally, NOT
    uploaded"), then fails the run; the next successful run uploads what S3 lacks.
    Pruning only happens once the new backup is safely everywhere it should be, and
    only touches backups of the same source (`manifest.source_id`)."""
    details = with_exposure_warnings(to, manifest.kind, details)  # in every report
    try:
        stored, remote, lock = store_copy(staged, manifest, to)
    except UploadFailed as failed:
        reason = f"{NOT_UPLOADED} ({one_line(failed.error)})"
        publish_backup_report(manifest, str(failed.stored), reason, None, None, details)
        raise failed.error from None
    if lock:
        details = {**details, "object lock": lock}
    kept_local = prune_local(to.backup_dir, manifest.kind, manifest.source_id, to.retention)
    kept_remote = None
    if to.s3_bucket:
        caught_up, in_s3 = catch_up_uploads(to, manifest.kind, manifest.source_id)
        details = {
            **details,
            "earlier backups uploaded now (S3 lacked them)": ", ".join(caught_up) or "none",
        }
        kept_remote = prune_remote(
            to.s3_bucket,
            to.s3_prefix,
            manifest.kind,
            manifest.source_id,
            to.s3_endpoint_url,
            to.retention,
            in_s3,
            lock_mode=to.object_lock,
        )
    publish_backup_report(manifest, str(stored), remote, kept_local, kept_remote, details)
    return stored, remote


def with_exposure_warnings(to: Destination, kind: str, details: dict[str, Any]) -> dict[str, Any]:
    """The report's details plus a warning (also logged) for each backup folder open to
    more users than the modes allow, with the fix."""
    warnings = exposure_warnings([to.backup_dir, to.backup_dir / KINDS[kind].folder], to.modes)
    for warning in warnings:
        run_logger().warning(warning)
    return {**details, "warnings": "; ".join(warnings)} if warnings else details
