"""The Args entries many flows share, written once.

A flow's docstring holds a line `{backup_destination}` (backup flows) or
`{backup_source}` (recovery flows and the drill) among its Args, and backup flows
`{gfs_rules:REDIS}` (the kind's setting prefix after the colon); `shared_args` puts
the entries there, indented like that line, before `@flow` reads the docstring for
the parameter descriptions the Prefect UI shows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])

PLACE = """\
backup_dir: Local folder of all backups. Empty: PROXILION_DR_BACKUP_DIR
    (default /backups).
s3_bucket: S3 bucket for the off-site copy. Empty: PROXILION_DR_S3_BUCKET
    (default: none, no upload).
s3_prefix: Folder (key prefix) in the bucket. Empty: PROXILION_DR_S3_PREFIX
    (default proxilion).
s3_endpoint_url: S3-compatible endpoint (MinIO, SeaweedFS). Empty:
    PROXILION_DR_S3_ENDPOINT_URL (default: AWS S3). Credentials come only
    from the environment (AWS_* or a profile)."""
KEEP_MIN = """\
keep_min: Newest backups always kept, whatever their age (at least 1).
    None: PROXILION_DR_KEEP_MIN (default 3)."""

BLOCKS = {
    "backup_place": PLACE + "\n" + KEEP_MIN,
    "backup_destination": PLACE
    + """
compression: `gzip` (opens with gunzip) or `zstd` (faster, smaller).
    `setting`: PROXILION_DR_COMPRESSION (default gzip).
"""
    + KEEP_MIN,
    "gfs_rules": """\
keep_hourly: GFS rule: also keep the newest backup of each of the last N hours
    that have one (restic's keep-hourly). None (empty): its count
    in PROXILION_DR_{arg}_KEEP (default: none, 0).
keep_daily: GFS rule: also keep the newest backup of each of the last N days
    (UTC) that have one. None (empty): its count in PROXILION_DR_{arg}_KEEP
    (default: none, 0).
keep_weekly: GFS rule: also keep the newest backup of each of the last N ISO
    weeks that have one. None (empty): its count in PROXILION_DR_{arg}_KEEP
    (default: none, 0).
keep_monthly: GFS rule: also keep the newest backup of each of the last N
    months that have one. None (empty): its count in PROXILION_DR_{arg}_KEEP
    (default: none, 0).
keep_yearly: GFS rule: also keep the newest backup of each of the last N years
    that have one. None (empty): its count in PROXILION_DR_{arg}_KEEP
    (default: none, 0).""",
    "backup_source": """\
backup_dir: Local backup directory (backups fetched from S3 are stored here).
    Empty: PROXILION_DR_BACKUP_DIR (default /backups).
s3_bucket: Bucket to look in when a backup is not in backup_dir. Empty:
    PROXILION_DR_S3_BUCKET (default: none, local backups only).
s3_prefix: Key prefix of the backups in the bucket. Empty:
    PROXILION_DR_S3_PREFIX (default proxilion).
s3_endpoint_url: S3-compatible endpoint. Empty: PROXILION_DR_S3_ENDPOINT_URL
    (default: AWS S3).
age_identity_file: Path of the age private key file that decrypts age-encrypted
    backups (the key itself is never a parameter). Empty:
    PROXILION_DR_AGE_IDENTITY_FILE (default: none).""",
}
_PLACEHOLDER = re.compile(r"^( *)\{(\w+)(?::(\w+))?\}$", re.MULTILINE)


def _block(match: re.Match[str]) -> str:
    indent, name, arg = match.groups()
    text = BLOCKS[name].replace("{arg}", "<KIND>" if arg == "KIND" else arg or "")
    return "\n".join(indent + line for line in text.splitlines())


def shared_args(fn: F) -> F:
    """`fn` with its docstring's block lines filled in (see the module docstring)."""
    fn.__doc__ = _PLACEHOLDER.sub(_block, fn.__doc__ or "")
    return fn
