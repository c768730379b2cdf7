"""Finding the backup a recovery restores: by name or `latest`, in the local backup
directory, else in S3 (the host that held the backups may be gone).

A remote backup is found by its manifest first, then its object is downloaded
streaming into `backup_dir` under the same relative name, hashed on the way, and
refused unless size and SHA-256 match the manifest; the local manifest is written
last, so the download is a complete local backup only once it is proven. Nothing
here touches a live service.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pyrage import x25519

from tasks.common.clock import parse_time, utc_now
from tasks.common.files import create_file, fsync_dir, make_dirs, require_free_space, write_durably
from tasks.common.log import run_logger
from tasks.common.retry import retrying_task
from tasks.store.archive import (
    ArchiveError,
    HashingReader,
    HashingWriter,
    Manifest,
    iter_chunks,
    manifest_name,
    verify_file,
)
from tasks.store.encryption import (
    IdentityError,
    check_identity,
    decrypt_stream,
    load_identity,
)
from tasks.store.kinds import KINDS, source_of
from tasks.store.local import (
    FUTURE_TOLERANCE,
    BackupNotFound,
    list_local,
    resolve_name,
    staging_path,
)
from tasks.store.s3 import S3Error, client, list_remote, object_key, remote_facts, remote_name


@dataclass(frozen=True)
class FoundBackup:
    """A verified backup on this host: its manifest, its plain compressed file, and
    where it came from. `temporary`: the file is a copy the caller removes (`discard`)
    when done: a locally encrypted backup decrypted, or a download that is not to be
    kept (a dry run's; the S3 copy of a damaged local backup), in its own `scratch`
    folder. `notes`: what the search passed over, for the report."""

    manifest: Manifest
    path: Path
    location: str
    backup_dir: Path
    temporary: bool = False
    scratch: Path | None = None
    notes: tuple[str, ...] = ()

    def discard(self) -> None:
        """Remove the temporary copy (nothing for a stored backup)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        elif self.temporary:
            self.path.unlink(missing_ok=True)


def check_backup_name(kind: str, name: str) -> None:
    """Accept `latest` or a name of the kind's layout (`redis/<file>`); refuse the rest
    (`..`, absolute paths, other folders) before anything is looked up."""
    if name == "latest":
        return
    folder = KINDS[kind].folder
    parts = PurePosixPath(name).parts
    if len(parts) != 2 or parts[0] != folder or name.startswith("/") or ".." in parts:
        raise ValueError(
            f"backup name {name!r} is not a {kind} backup name: give one as listed, "
            f"'{folder}/<file>' (no '..', no other folder), or 'latest'"
        )


def choose(manifests: list[Manifest], name: str) -> Manifest | None:
    """`name` among complete backups, or for `latest` the newest not dated in the future."""
    if name != "latest":
        return next((m for m in manifests if m.name == name), None)
    now = utc_now()
    current = [m for m in manifests if parse_time(m.created_at) <= now + FUTURE_TOLERANCE]
    return max(current, key=lambda m: parse_time(m.created_at), default=None)


def _mismatch(where: str, size: int, sha256: str, expected: tuple[int, str]) -> ArchiveError:
    return ArchiveError(
        f"{where} is {size} bytes with sha256 {sha256[:16]}…, its manifest says "
        f"{expected[0]} bytes, sha256 {expected[1][:16]}…: the object is truncated or "
        "corrupt; pick another backup (nothing was changed)"
    )


def _copy_verified(
    source: Any, staging: Path, manifest: Manifest, identity: x25519.Identity | None, where: str
) -> None:
    """Stream a stored backup (`source`, readable) into `staging`, decrypting it with
    `identity` when it is age-encrypted; refuse unless the stored bytes and the plain
    compressed stream both match `manifest` in size and SHA-256."""
    reader = HashingReader(source)
    with create_file(staging) as file:
        out = HashingWriter(file)
        if manifest.encryption:
            if identity is None:
                raise IdentityError(f"{where} is age-encrypted and no identity was given")
            decrypt_stream(reader, out, identity, where)
        else:
            for chunk in iter_chunks(reader):
                out.write(chunk)
        file.flush()
        os.fsync(file.fileno())
    stored = (reader.size, reader.sha256.hexdigest())
    if stored != remote_facts(manifest):
        raise _mismatch(where, *stored, remote_facts(manifest))
    plain = (out.size, out.sha256.hexdigest())
    if plain != (manifest.size, manifest.sha256):
        raise _mismatch(f"{where} decrypted", *plain, (manifest.size, manifest.sha256))


def download(
    manifest: Manifest,
    backup_dir: Path,
    bucket: str,
    prefix: str,
    endpoint_url: str | None,
    identity: x25519.Identity | None = None,
) -> Path:
    """Stream one remote backup into `backup_dir` (same relative name), decrypting it
    with `identity` when it is age-encrypted, verify size and SHA-256 of the object and
    of the plain backup against `manifest`, then write the manifest last. A mismatch
    keeps nothing."""
    final = resolve_name(backup_dir, manifest.name)
    make_dirs(final.parent)
    require_free_space(final.parent, manifest.size, f"downloading {manifest.name}")
    staging = staging_path(backup_dir, manifest.name)
    key = object_key(prefix, remote_name(manifest))
    try:
        body = client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        _copy_verified(body, staging, manifest, identity, f"s3://{bucket}/{key}")
        os.replace(staging, final)
        fsync_dir(final.parent)
        plain = downloaded(manifest).to_json().encode()
        write_durably(final.with_name(manifest_name(final.name)), plain)
    except (BotoCoreError, ClientError) as error:
        raise S3Error(f"downloading s3://{bucket}/{key} failed: {error}") from None
    finally:
        staging.unlink(missing_ok=True)
    return final


def downloaded(manifest: Manifest) -> Manifest:
    """The manifest of a downloaded copy: stored plain here, whatever the local copy
    of the host that made it was (`encryption["local"]` dropped)."""
    encryption = {k: v for k, v in manifest.encryption.items() if k != "local"}
    return replace(manifest, encryption=encryption)


def decrypt_local(
    manifest: Manifest, path: Path, backup_dir: Path, identity: x25519.Identity
) -> Path:
    """The plain compressed stream of a locally encrypted backup, decrypted into a
    hidden owner-only staging file beside it (the caller removes it), verified like a
    download: the encrypted file and the plain stream against the manifest."""
    require_free_space(path.parent, manifest.size, f"decrypting {manifest.local_name}")
    staging = staging_path(backup_dir, manifest.name)
    try:
        with open(path, "rb") as source:
            _copy_verified(source, staging, manifest, identity, str(path))
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return staging


def check_can_decrypt(
    manifest: Manifest,
    identity: x25519.Identity | None,
    identity_file: Path | None,
    what: str = "",
) -> None:
    """Refuse, before any download or decryption, an encrypted backup without an
    identity or with one it was not encrypted to."""
    what = what or f"the S3 copy of {manifest.name}"
    if identity is None or identity_file is None:
        raise IdentityError(
            f"{what} is age-encrypted (to {', '.join(manifest.encryption['recipients'])}) "
            "and no identity was given: set PROXILION_DR_AGE_IDENTITY_FILE (or "
            "age_identity_file) to the path of the private key file"
        )
    check_identity(identity, manifest.encryption["recipients"], identity_file, what)


def _not_found(
    kind: str, name: str, source_id: str | None, where: list[str], others: set[str]
) -> BackupNotFound:
    what = f"{kind} backup named {name!r}" if name != "latest" else f"complete {kind} backup"
    of = f" of {source_id}" if source_id else ""
    hint = f"check backup, backup_dir, s3_bucket and s3_prefix (run backup-{kind} if none exists)"
    if others:
        hint = (
            f"backups of other servers exist ({', '.join(sorted(others))}): to restore one "
            "of those here, give its name as backup"
        )
    return BackupNotFound(f"no {what}{of} in {' nor in '.join(where)}: {hint}")


@retrying_task(2, 10)
def fetch_backup(
    backup_dir: Path,
    kind: str,
    name: str,
    s3_bucket: str,
    s3_prefix: str,
    s3_endpoint_url: str | None,
    source_id: str | None = None,
    identity_file: Path | None = None,
    keep_downloads: bool = True,
) -> FoundBackup:
    """The backup `name` (or `latest`: the newest complete one of `source_id`, the
    server being restored, here or in S3; never another server's) of `kind`, as a file
    on this host whose size and SHA-256 match its manifest.

    A local copy is used when there is one (a locally encrypted one decrypted into a
    temporary copy); one that fails its checksum is passed over for the S3 copy when
    that verifies. Otherwise the S3 copy is downloaded, decrypted with the age identity
    in `identity_file` when encrypted (only an encrypted backup needs it), verified
    while it streams: into `backup_dir`, or, unless `keep_downloads` (a dry run writes
    nothing there), into a temporary folder. An unreadable S3 manifest is skipped and
    noted. Raises BackupNotFound, IdentityError (missing or wrong identity, before
    anything is downloaded), or ArchiveError for a damaged copy."""
    check_backup_name(kind, name)
    backup_dir = Path(backup_dir)
    wanted = source_id if name == "latest" else None
    notes: list[str] = []
    local = list_local(backup_dir, kind, wanted)
    remote_all: list[Manifest] = []
    where = [str(backup_dir / KINDS[kind].folder)]
    if s3_bucket:
        skipped: list[str] = []
        remote_all = list_remote(s3_bucket, s3_prefix, kind, s3_endpoint_url, skipped)
        notes += skipped
        where.append(f"s3://{s3_bucket}/{object_key(s3_prefix, KINDS[kind].folder)}/")
    remote = [m for m in remote_all if wanted is None or source_of(m) == wanted]
    chosen = choose(local + remote, name)
    if chosen is None:
        everything = list_local(backup_dir, kind) + remote_all
        others = {source_of(m) for m in everything} - {wanted} if wanted else set()
        raise _not_found(kind, name, wanted, where, others)
    here = next((m for m in local if m.name == chosen.name), None)
    there = next((m for m in remote if m.name == chosen.name), None)
    s3 = (s3_bucket, s3_prefix, s3_endpoint_url)
    if here is not None:
        try:
            found = _local_copy(here, backup_dir, identity_file)
        except ArchiveError as damaged:
            if there is None:
                raise
            notes.append(f"the local copy fails its checksum ({damaged}); the S3 copy is used")
            found = _download(there, backup_dir, s3, identity_file, keep=False)
    else:
        assert there is not None
        found = _download(there, backup_dir, s3, identity_file, keep=keep_downloads)
    run_logger().info("Backup %s from %s: size and sha256 verified", chosen.name, found.location)
    for note in notes:
        run_logger().warning(note)
    return replace(found, notes=tuple(notes))


def _identity(identity_file: Path | None) -> x25519.Identity | None:
    return load_identity(identity_file) if identity_file else None


def _local_copy(manifest: Manifest, backup_dir: Path, identity_file: Path | None) -> FoundBackup:
    """A complete local backup, verified (a locally encrypted one decrypted and
    verified into a temporary copy)."""
    path = resolve_name(backup_dir, manifest.local_name)
    if manifest.encryption.get("local"):
        identity = _identity(identity_file)
        check_can_decrypt(manifest, identity, identity_file, f"the local backup {path}")
        assert identity is not None  # checked just above
        plain = decrypt_local(manifest, path, backup_dir, identity)
        return FoundBackup(manifest, plain, f"local {backup_dir} (decrypted)", backup_dir, True)
    verify_file(path, manifest.size, manifest.sha256)
    return FoundBackup(manifest, path, f"local {backup_dir}", backup_dir)


def _download(
    remote: Manifest,
    backup_dir: Path,
    s3: tuple[str, str, str | None],
    identity_file: Path | None,
    keep: bool,
) -> FoundBackup:
    """The S3 copy, downloaded and verified into `backup_dir` when `keep`, else into a
    new temporary folder the FoundBackup removes when discarded."""
    bucket, prefix, endpoint_url = s3
    identity = _identity(identity_file) if remote.encryption else None
    if remote.encryption:
        check_can_decrypt(remote, identity, identity_file)
    location = f"s3://{bucket}/{object_key(prefix, remote_name(remote))} (downloaded"
    scratch = None if keep else Path(tempfile.mkdtemp(prefix="proxilion-dr-download-"))
    try:
        path = download(remote, scratch or backup_dir, bucket, prefix, endpoint_url, identity)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    location += ")" if keep else ", not kept)"
    return FoundBackup(downloaded(remote), path, location, backup_dir, not keep, scratch)


def fetch_piece(
    backup_dir: Path,
    manifest: Manifest,
    s3_bucket: str,
    s3_prefix: str,
    s3_endpoint_url: str | None,
    identity_file: Path | None = None,
) -> FoundBackup:
    """One piece of a chained backup, its manifest already read: the local file when
    it is there (size and SHA-256 verified; a locally encrypted one decrypted into a
    temporary copy), else downloaded from S3 into `backup_dir` and verified (decrypted
    when encrypted)."""
    backup_dir = Path(backup_dir)
    if resolve_name(backup_dir, manifest.local_name).is_file():
        return _local_copy(manifest, backup_dir, identity_file)
    if not s3_bucket:
        raise BackupNotFound(
            f"piece {manifest.name} is not in {backup_dir} and no s3_bucket is set"
        )
    s3 = (s3_bucket, s3_prefix, s3_endpoint_url)
    return _download(manifest, backup_dir, s3, identity_file, keep=True)
