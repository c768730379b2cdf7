"""The steps every backup flow ends with, in the runbook's order: store (manifest
last), upload and verify, prune here and there, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.settings import settings
from tasks.archive import CompressedFile, Manifest
from tasks.encryption import encrypt_for_upload, parse_recipients
from tasks.log import run_logger
from tasks.private import OWNER_ONLY, Modes, exposure_warnings
from tasks.report import publish_backup_report
from tasks.s3 import ObjectLock, prune_remote, require_object_lock, upload_backup
from tasks.storage import KINDS, check_retention, commit_local, prune_local


@dataclass(frozen=True)
class Destination:
    """Where backups go and how long they stay: the parameters all backup flows share."""

    backup_dir: Path
    s3_bucket: str
    s3_prefix: str
    s3_endpoint_url: str | None
    retention_days: float
    keep_min: int
    modes: Modes = OWNER_ONLY
    age_recipients: tuple[str, ...] = ()  # encrypt the S3 copy to these public keys
    object_lock: str = ""  # governance/compliance: S3 copies locked for the retention

    def __post_init__(self) -> None:
        check_retention(self.retention_days, self.keep_min)  # before any work is done
        self.check_remote()

    @classmethod
    def from_parameters(cls, p: dict[str, Any]) -> Destination:
        """From a flow's resolved parameters; group read and the age recipients come
        from their settings unless the flow has such a parameter."""
        current = settings()
        return cls(
            Path(p["backup_dir"]),
            p["s3_bucket"],
            p["s3_prefix"],
            p["s3_endpoint_url"] or None,
            p["retention_days"],
            p["keep_min"],
            Modes.for_group_read(current.backup_group_read),
            tuple(parse_recipients(p.get("age_recipients") or current.age_recipients)),
            current.s3_object_lock if p["s3_bucket"] else "",
        )

    def check_remote(self) -> None:
        """At the start: a bucket asked to lock backups must have Object Lock."""
        if self.s3_bucket and self.object_lock:
            require_object_lock(self.s3_bucket, self.s3_endpoint_url)


def keep_backup(
    staged: CompressedFile, manifest: Manifest, to: Destination, details: dict[str, Any]
) -> tuple[Path, str | None]:
    """Store, upload, prune and report one staged backup; returns (local path, S3 URL).

    With age recipients, the S3 copy is the age-encrypted stored file (`.age`; the
    local copy stays plain); with an object lock mode it is locked for the retention.
    An upload failure fails the run after the local copy is complete; pruning only
    happens once the new backup is safely everywhere it should be, and only touches
    backups of the same source (`manifest.source_id`)."""
    encrypted = None
    if to.s3_bucket and to.age_recipients:  # before the commit: the manifest records it
        copy = encrypt_for_upload(
            to.backup_dir, staged.path, manifest.name, list(to.age_recipients)
        )
        manifest.encryption = copy.describe()
        manifest.steps["encrypt"] = copy.seconds
        encrypted = copy.path
    try:
        stored = commit_local(to.backup_dir, staged, manifest, to.modes)
        remote = None
        if to.s3_bucket:
            lock = None
            if to.object_lock:
                lock = ObjectLock.for_backup(to.object_lock, manifest.created_at, to.retention_days)
                details = {**details, "object lock": f"{lock.mode} until {lock.retain_until}"}
            remote = upload_backup(
                encrypted or stored,
                manifest,
                to.s3_bucket,
                to.s3_prefix,
                to.s3_endpoint_url,
                lock,
            ).url
    finally:
        if encrypted:
            encrypted.unlink(missing_ok=True)
    kept_local = prune_local(
        to.backup_dir, manifest.kind, manifest.source_id, to.retention_days, to.keep_min
    )
    kept_remote = None
    if to.s3_bucket:
        kept_remote = prune_remote(
            to.s3_bucket,
            to.s3_prefix,
            manifest.kind,
            manifest.source_id,
            to.s3_endpoint_url,
            to.retention_days,
            to.keep_min,
        )
    details = with_exposure_warnings(to, manifest.kind, details)
    publish_backup_report(manifest, str(stored), remote, kept_local, kept_remote, details)
    return stored, remote


def with_exposure_warnings(to: Destination, kind: str, details: dict[str, Any]) -> dict[str, Any]:
    """The report's details plus a warning (also logged) for each backup folder open to
    more users than the modes allow, with the fix."""
    warnings = exposure_warnings([to.backup_dir, to.backup_dir / KINDS[kind].folder], to.modes)
    for warning in warnings:
        run_logger().warning(warning)
    return {**details, "warnings": "; ".join(warnings)} if warnings else details
