"""age-encrypted off-site copies: with recipients set every S3 object is age-encrypted
(`.age`), the manifest records public keys and both checksums (never a private key),
Debian's `age` decrypts what we wrote, recoveries decrypt with the identity file, and a
missing or wrong identity is refused before anything is touched."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import boto3
import pyrage
import pytest
from mounts import mounted_tmpfs
from pyrage import x25519
from redis_servers import assert_same_keyspace, free_port, keyspace_snapshot
from test_backup_config import ALLOWLIST, write_project
from test_recover_prometheus import backfill, blocks, history, known_history
from test_recover_redis import assert_untouched, back_up, flushall, recover, seed, state
from throwaway_services import prometheus_container, redis_container
from waiting import past_the_second_of

from flows.backup_config import backup_config
from flows.backup_logs import backup_logs
from flows.backup_prometheus import backup_prometheus
from flows.recover_prometheus import recover_prometheus
from flows.support.failures import StepFailed
from flows.verify_restore import DrillFailed, verify_restore
from sandbox import constants as stack
from tasks.store.archive import Manifest, manifest_name, sha256_file
from tasks.store.encryption import (
    AgeCopy,
    EncryptedStream,
    IdentityError,
    RecipientError,
    load_identity,
    parse_recipients,
    staged_writer,
)
from tasks.store.find import fetch_backup
from tasks.store.kinds import KINDS
from tasks.store.local import list_local
from tasks.store.s3 import PART_SIZE, UploadSource, object_key, upload_backup

AGE_HEADER = b"age-encryption.org/v1\n"


def write_identity(path: Path) -> str:
    """An identity file as `age-keygen -o` writes it; returns its public key."""
    identity = x25519.Identity.generate()
    public = str(identity.to_public())
    path.write_text(f"# created: 2026-01-01T00:00:00Z\n# public key: {public}\n{identity}\n")
    path.chmod(0o600)
    return public


@pytest.fixture
def age_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A fresh identity file, its public key as PROXILION_DR_AGE_RECIPIENTS (with a
    second recipient: any one of them decrypts)."""
    key = tmp_path / "key.txt"
    public = write_identity(key)
    other = str(x25519.Identity.generate().to_public())
    monkeypatch.setenv("PROXILION_DR_AGE_RECIPIENTS", f"{public}, {other}")
    return key, public


def s3_args(prefix: str) -> dict[str, Any]:
    return {
        "s3_bucket": stack.S3_BUCKET,
        "s3_prefix": prefix,
        "s3_endpoint_url": stack.S3_ENDPOINT,
    }


def remote_objects(prefix: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    listing = s3.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=prefix + "/")
    return {
        item["Key"]: s3.get_object(Bucket=stack.S3_BUCKET, Key=item["Key"])["Body"].read()
        for item in listing.get("Contents", [])
    }


def assert_encrypted_copy(manifest: Manifest, backup_dir: Path, prefix: str, public: str) -> None:
    """Only `.age` data in the bucket, the manifest's facts match both streams, the
    local copy stays plain, and no private key anywhere."""
    objects = remote_objects(prefix)
    key = object_key(prefix, manifest.name + ".age")
    assert sorted(objects) == [key, manifest_name(key)]
    stored = objects[key]
    assert stored.startswith(AGE_HEADER)
    remote = json.loads(objects[manifest_name(key)])
    assert remote["encryption"]["format"] == "age"
    assert public in remote["encryption"]["recipients"]
    assert remote["encryption"]["size"] == len(stored)
    assert remote["encryption"]["sha256"] == hashlib.sha256(stored).hexdigest()
    assert remote["sha256"] == sha256_file(backup_dir / manifest.name)  # the plain stream
    assert "AGE-SECRET-KEY" not in objects[manifest_name(key)].decode()
    assert not (backup_dir / manifest.name).read_bytes().startswith(AGE_HEADER)


def test_redis_round_trip_and_debians_age_decrypts_by_hand(
    age_key: tuple[Path, str], tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    key, public = age_key
    with redis_container(tmp_path) as service:
        seed(service)
        manifest = back_up(service, backup_dir, **s3_args(s3_prefix))
        assert_encrypted_copy(manifest, backup_dir, s3_prefix, public)
        # docs/recovery.md's by-hand way, with Debian's age: age -d -i key.txt x.age | gunzip
        encrypted = tmp_path / "x.rdb.gz.age"
        encrypted.write_bytes(remote_objects(s3_prefix)[f"{s3_prefix}/{manifest.name}.age"])
        dump = tmp_path / "dump.rdb"
        subprocess.run(f"age -d -i {key} {encrypted} | gunzip > {dump}", shell=True, check=True)
        assert dump.read_bytes() == gzip.decompress((backup_dir / manifest.name).read_bytes())
        # recover-redis on a host without the local backups, with the identity file
        expected = keyspace_snapshot(service.url)
        flushall(service)
        fresh = tmp_path / "new-host-backups"
        result = recover(service, fresh, age_identity_file=str(key), **s3_args(s3_prefix))
        assert_same_keyspace(expected, keyspace_snapshot(service.url))
        assert result["backup"]["from"].endswith(".age (downloaded)")
        assert (fresh / manifest.name).read_bytes() == (backup_dir / manifest.name).read_bytes()


def test_missing_or_wrong_identity_is_refused_before_anything_is_touched(
    age_key: tuple[Path, str], tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    wrong = tmp_path / "wrong.txt"
    write_identity(wrong)
    with redis_container(tmp_path) as service:
        seed(service)
        manifest = back_up(service, backup_dir, **s3_args(s3_prefix))
        before = state(service)
        fresh = tmp_path / "fresh"
        for identity, says in [
            ("", "is age-encrypted (to "),
            (str(tmp_path / "nowhere.txt"), "nowhere.txt does not exist"),
            (str(wrong), "cannot decrypt the S3 copy of " + manifest.name),
        ]:
            with pytest.raises(StepFailed, match="find and verify the backup") as failed:
                recover(service, fresh, age_identity_file=identity, **s3_args(s3_prefix))
            assert says in str(failed.value)
            assert "AGE-SECRET-KEY" not in str(failed.value)
            assert state(service) == before
            assert not (fresh / manifest.name).exists()


def test_prometheus_round_trip(
    age_key: tuple[Path, str], tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    key, public = age_key
    with prometheus_container(tmp_path, backfill) as service:
        manifest = Manifest(
            **backup_prometheus(
                prometheus_url=service.url,
                container=service.name,
                fetch="container",
                backup_dir=str(backup_dir),
                **s3_args(s3_prefix),
            )
        )
        assert_encrypted_copy(manifest, backup_dir, s3_prefix, public)
        service.container().stop()
        for block in blocks(service.data_dir):
            (block / "index").write_bytes(b"not an index")
        service.container().start()
        result = recover_prometheus(
            container=service.name,
            prometheus_url=service.url,
            backup_dir=str(tmp_path / "new-host-backups"),
            age_identity_file=str(key),
            **s3_args(s3_prefix),
        )
        assert result["ok"] and history(service) == known_history()


def fetched_from_s3(kind: str, manifest: Manifest, key: Path, prefix: str, where: Path) -> Path:
    """The recovery flows' fetch step, on a host without the local backups."""
    found = fetch_backup(where, kind, manifest.name, identity_file=key, **s3_args(prefix))
    assert found.location.endswith(".age (downloaded)")
    return found.path


def config_args(tmp_path: Path, backup_dir: Path) -> dict[str, Any]:
    """backup-config of a fresh sample project (no env container) into `backup_dir`."""
    return {
        "project_dir": str(write_project(tmp_path / "project")),
        "env_allowlist": ALLOWLIST,
        "env_container": "",
        "backup_dir": str(backup_dir),
    }


def test_config_round_trip(
    age_key: tuple[Path, str], tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    key, public = age_key
    manifest = Manifest(**backup_config(**config_args(tmp_path, backup_dir), **s3_args(s3_prefix)))
    assert_encrypted_copy(manifest, backup_dir, s3_prefix, public)
    path = fetched_from_s3("config", manifest, key, s3_prefix, tmp_path / "fresh")
    assert path.read_bytes() == (backup_dir / manifest.name).read_bytes()


def test_a_backup_that_missed_its_upload_goes_up_encrypted_with_the_next_one(
    age_key: tuple[Path, str], tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    """The catch-up upload encrypts the stored file while it uploads it, as every upload
    does: the object is age of exactly that file, its manifest says so, and no
    encrypted copy is left behind."""
    key, public = age_key
    common = config_args(tmp_path, backup_dir) | {
        "s3_bucket": stack.S3_BUCKET,
        "s3_prefix": s3_prefix,
    }
    dead = f"http://127.0.0.1:{free_port()}"
    assert backup_config(**common, s3_endpoint_url=dead, return_state=True).is_failed()
    [first] = list_local(backup_dir, "config")
    past_the_second_of(first.name)
    backup_config(**common, s3_endpoint_url=stack.S3_ENDPOINT, force=True)
    objects = remote_objects(s3_prefix)
    caught_up = object_key(s3_prefix, first.name + ".age")
    assert caught_up in objects and manifest_name(caught_up) in objects
    remote = json.loads(objects[manifest_name(caught_up)])
    assert remote["encryption"]["recipients"][0] == public
    assert remote["encryption"]["sha256"] == hashlib.sha256(objects[caught_up]).hexdigest()
    assert remote["sha256"] == first.sha256
    decrypted = subprocess.run(
        ["age", "-d", "-i", str(key)], input=objects[caught_up], capture_output=True, check=True
    )
    assert decrypted.stdout == (backup_dir / first.name).read_bytes()
    assert not list(backup_dir.rglob("*.partial"))


def test_logs_round_trip(
    age_key: tuple[Path, str], tmp_path: Path, backup_dir: Path, s3_prefix: str
) -> None:
    key, public = age_key
    manifest = Manifest(
        **backup_logs(
            containers=[stack.GATEWAY_CONTAINER],
            window="5m",
            backup_dir=str(backup_dir),
            **s3_args(s3_prefix),
        )
    )
    assert manifest.name.startswith(KINDS["logs"].folder + "/")
    assert_encrypted_copy(manifest, backup_dir, s3_prefix, public)
    path = fetched_from_s3("logs", manifest, key, s3_prefix, tmp_path / "fresh")
    assert path.read_bytes() == (backup_dir / manifest.name).read_bytes()
    # The drill on a host without the local copies: refused without the identity,
    # proven with it (decompressed fully, line count against the manifest).
    drill = {
        "components": ["logs"],
        "logs_backup": manifest.name,
        "backup_dir": str(tmp_path / "drill-host"),
        "scratch_dir": str(tmp_path / "scratch"),
        **s3_args(s3_prefix),
    }
    with pytest.raises(DrillFailed, match="logs") as refused:
        verify_restore(**drill)
    assert "is age-encrypted" in str(refused.value)
    assert verify_restore(**drill, age_identity_file=str(key))["ok"]


def test_recipients_are_checked_and_a_private_key_is_never_echoed() -> None:
    secret = str(x25519.Identity.generate())
    with pytest.raises(RecipientError) as refused:
        parse_recipients(secret)
    assert secret not in str(refused.value) and "PRIVATE key" in str(refused.value)
    with pytest.raises(RecipientError, match="'age1nope' is not an age public key"):
        parse_recipients("age1nope")


def test_identity_file_with_no_key_is_refused(tmp_path: Path) -> None:
    """Read when an encrypted backup needs it (only then: a plain one restores without)."""
    empty = tmp_path / "key.txt"
    empty.write_text("# nothing here\n")
    with pytest.raises(IdentityError, match="does not hold exactly one valid age private key"):
        load_identity(empty)


def test_the_copy_for_s3_is_encrypted_while_it_uploads(tmp_path: Path, s3_prefix: str) -> None:
    """The capture writes the plain file only; the upload reads it once, age-encrypting
    on the way: the object is age of exactly that file, the manifest uploaded beside it
    records the object's size and SHA-256, and no encrypted copy touches the disk."""
    identity = x25519.Identity.generate()
    recipients = (str(identity.to_public()),)
    data = b"".join(b"session:%08d " % i + os.urandom(40).hex().encode() for i in range(400_000))
    staging = tmp_path / ".dump_20260101_000000_ab.rdb.gz.0123abcd.partial"
    writer = staged_writer(staging, "gzip")
    for start in range(0, len(data), 65_536):
        writer.write(data[start : start + 65_536])
    stored = writer.close()
    assert stored.encrypted is None and sorted(tmp_path.iterdir()) == [staging]
    name = "redis/dump_20260101_000000_ab.rdb.gz"
    manifest = Manifest("redis", name, "2026-01-01T00:00:00+00:00", stored.size, stored.sha256,
                        "gzip", stored.raw_size, 0.0)  # fmt: skip
    assert stored.size > PART_SIZE  # a multipart upload: its ETag was computed as it went

    copy = upload_backup(
        staging, manifest, stack.S3_BUCKET, s3_prefix, stack.S3_ENDPOINT, None, recipients
    )

    assert sorted(tmp_path.iterdir()) == [staging]
    objects = remote_objects(s3_prefix)
    encrypted = objects[copy.key]
    assert copy.key.endswith(".rdb.gz.age") and encrypted.startswith(AGE_HEADER)
    assert pyrage.decrypt(encrypted, [identity]) == staging.read_bytes()
    remote = json.loads(objects[manifest_name(copy.key)])
    assert remote["encryption"] == {
        "format": "age",
        "recipients": list(recipients),
        "size": len(encrypted),
        "sha256": hashlib.sha256(encrypted).hexdigest(),
    }
    assert copy.manifest is not None and copy.manifest.encryption == remote["encryption"]
    assert (remote["size"], remote["sha256"]) == (stored.size, stored.sha256)


def test_an_encryption_that_fails_mid_stream_uploads_nothing(
    tmp_path: Path, s3_prefix: str
) -> None:
    """A read error of the stored file reaches the upload as that error, not as a
    shorter stream that S3 would then store as if complete."""

    class Failing(io.RawIOBase):
        sent = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            if self.sent > 20 << 20:
                raise OSError(errno.EIO, "Input/output error")
            buffer[:] = os.urandom(len(buffer))
            self.sent += len(buffer)
            return len(buffer)

    recipients = [str(x25519.Identity.generate().to_public())]
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    stream = EncryptedStream(io.BufferedReader(Failing()), recipients)
    with pytest.raises(OSError, match="Input/output error"):
        s3.upload_fileobj(
            UploadSource(io.BufferedReader(stream)), stack.S3_BUCKET, f"{s3_prefix}/x.age"
        )
    stream.close()
    assert remote_objects(s3_prefix) == {}


@pytest.mark.parametrize("copies", ["plain", "age only"])
def test_a_full_disk_fails_the_capture_with_enospc_and_leaves_nothing(
    tmp_path: Path, copies: str
) -> None:
    """The kernel's refusal reaches the writer as the OSError it is, also from the
    encryption thread (pyrage turned it into an EncryptError, which the disk-full
    explanations missed), and the abort removes every partial file although its last
    buffered bytes cannot be flushed (the close raised ENOSPC again, leaving them)."""
    recipients = (str(x25519.Identity.generate().to_public()),)
    encrypt = {"plain": None, "age only": AgeCopy(recipients)}[copies]
    with mounted_tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        writer = staged_writer(tiny / ".x.rdb.gz.0123abcd.partial", "gzip", encrypt)
        with pytest.raises(OSError) as refused:
            for _ in range(64):
                writer.write(os.urandom(65_536))
            writer.close()
        writer.abort()
        assert refused.value.errno == errno.ENOSPC
        assert list(tiny.iterdir()) == []


@pytest.fixture
def encrypt_local(age_key: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """PROXILION_DR_AGE_ENCRYPT_LOCAL on (with the recipients of `age_key`)."""
    monkeypatch.setenv("PROXILION_DR_AGE_ENCRYPT_LOCAL", "true")
    return age_key[0]


def test_local_copy_encrypted_round_trip_and_wrong_identity_refused(
    encrypt_local: Path, tmp_path: Path, backup_dir: Path
) -> None:
    """With the local copy encrypted: only `<name>.age` on disk (no plain file, no
    staging left), listed and pruned like any backup; recover-redis decrypts it with
    the identity file, leaves no decrypted copy behind; a missing or wrong identity is
    refused before anything is touched."""
    key = encrypt_local
    wrong = tmp_path / "wrong.txt"
    write_identity(wrong)
    with redis_container(tmp_path) as service:
        seed(service)
        first = back_up(service, backup_dir)
        stored = backup_dir / (first.name + ".age")
        assert first.encryption["local"] is True
        assert sorted(p.name for p in stored.parent.iterdir()) == [
            stored.name,
            manifest_name(stored.name),
        ]
        assert stored.read_bytes().startswith(AGE_HEADER)
        assert stored.stat().st_mode & 0o777 == 0o600
        assert first.encryption["sha256"] == sha256_file(stored)
        dump = tmp_path / "dump.rdb.gz"  # docs/recovery.md's by-hand way, with Debian's age
        subprocess.run(f"age -d -i {key} {stored} > {dump}", shell=True, check=True)
        assert sha256_file(dump) == first.sha256
        assert [m.name for m in list_local(backup_dir, "redis")] == [first.name]

        before = state(service)
        for identity, error, says in [
            (None, IdentityError, "is age-encrypted (to "),
            (wrong, IdentityError, f"cannot decrypt the local backup {stored}"),
        ]:
            with pytest.raises(error, match=re.escape(says)):
                fetch_backup(backup_dir, "redis", "latest", "", "", None, identity_file=identity)
            with pytest.raises(StepFailed, match="find and verify the backup"):
                recover(service, backup_dir, age_identity_file=str(identity or ""))
            assert_untouched(service, before)
        assert sorted(p.name for p in stored.parent.iterdir()) == [
            stored.name,
            manifest_name(stored.name),
        ]

        expected = keyspace_snapshot(service.url)
        flushall(service)
        result = recover(service, backup_dir, age_identity_file=str(key))
        assert_same_keyspace(expected, keyspace_snapshot(service.url))
        assert result["backup"]["from"] == f"local {backup_dir} (decrypted)"
        assert not list(stored.parent.glob(".*")), "a decrypted copy was left behind"

        second = back_up(service, backup_dir, retention_days=0, keep_min=1)
        assert [m.name for m in list_local(backup_dir, "redis")] == [second.name]
        assert not stored.exists() and not (backup_dir / manifest_name(stored.name)).exists()
