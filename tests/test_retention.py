"""Retention through the real backup-redis flow, on real redis-server processes sharing
one backup_dir (and one S3 prefix): pruning deletes old backups of the server being
backed up and nothing else; it runs only after the upload succeeded; stale staging
files of killed runs are removed; two servers' backups of the same second both stay."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import boto3
import pytest
from botocore.exceptions import ClientError
from redis_servers import RedisServer, free_port, running_redis
from test_backup_redis import flow_logs

import tasks.store.local
import tasks.store.s3
from flows.backup_redis import backup_redis
from sandbox import constants as stack
from tasks.common.clock import utc_now
from tasks.store.s3 import S3Error, S3Unreachable

DAY = timedelta(days=1)


def tag(source_id: str) -> str:
    """The short source tag backup names carry (first 8 hex digits of its SHA-256)."""
    return hashlib.sha256(source_id.encode()).hexdigest()[:8]


def identity(server: RedisServer) -> str:
    """What a backup of this server records as its source: host and port, no db."""
    return f"127.0.0.1:{server.port}"


class Planted:
    """Aged backups written the way a flow writes them (data, then manifest), into a
    backup_dir and, when given, an S3 prefix."""

    def __init__(self, backup_dir: Path, s3_prefix: str | None = None) -> None:
        self.backup_dir, self.s3_prefix = backup_dir, s3_prefix
        self.s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)

    def backup(self, server: RedisServer, age: timedelta, legacy: bool = False) -> str:
        """A backup of `server` made `age` ago; `legacy`: a manifest from before
        source_id was recorded (name without tag, the server only in `source`)."""
        created = utc_now() - age
        stamp = created.strftime("%Y%m%d_%H%M%S")
        suffix = "" if legacy else f"_{tag(identity(server))}"
        name = f"redis/dump_{stamp}{suffix}.rdb.gz"
        data = os.urandom(64)
        manifest = {
            "kind": "redis",
            "name": name,
            "created_at": created.isoformat(),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "compression": "gzip",
            "raw_size": len(data),
            "duration_seconds": 0.1,
            "source": {"server": f"redis://***@127.0.0.1:{server.port}/0"},
            "steps": {},
            "format": 1,
        }
        if not legacy:
            manifest["source_id"] = identity(server)
        self.write(name, data, json.dumps(manifest).encode())
        return name

    def write(self, name: str, data: bytes, manifest: bytes | None) -> None:
        path = self.backup_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if manifest is not None:
            path.with_name(path.name + ".manifest.json").write_bytes(manifest)
        if self.s3_prefix is not None:
            key = f"{self.s3_prefix}/{name}"
            self.s3.put_object(Bucket=stack.S3_BUCKET, Key=key, Body=data)
            if manifest is not None:
                sidecar = key + ".manifest.json"
                self.s3.put_object(Bucket=stack.S3_BUCKET, Key=sidecar, Body=manifest)

    def local_files(self) -> set[str]:
        folder = self.backup_dir / "redis"
        return {f"redis/{p.name}" for p in folder.iterdir() if not p.name.startswith(".")}

    def remote_files(self) -> set[str]:
        """Every key under the prefix, from the bucket's raw listing (not list_remote,
        which hides data without a manifest)."""
        assert self.s3_prefix is not None
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=stack.S3_BUCKET, Prefix=self.s3_prefix + "/"
        )
        keys = {item["Key"] for page in pages for item in page.get("Contents", [])}
        return {key.removeprefix(self.s3_prefix + "/") for key in keys}


def with_manifests(*names: str) -> set[str]:
    return {n for name in names for n in (name, name + ".manifest.json")}


@pytest.fixture
def two_servers(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    with ExitStack() as stack_:
        a = stack_.enter_context(running_redis(tmp_path / "a"))
        b = stack_.enter_context(running_redis(tmp_path / "b"))
        a.client().set("server", "a")
        b.client().set("server", "b")
        yield a, b


def back_up(server: RedisServer, backup_dir: Path, **options: object) -> dict:
    options = {"s3_bucket": "", "retention_days": 7, "keep_min": 3} | options
    return backup_redis(
        redis_url=server.url,
        container="",
        fetch="path",
        data_dir=str(server.dir),
        backup_dir=str(backup_dir),
        **options,  # type: ignore[arg-type]
    )


def test_one_servers_pruning_leaves_another_servers_last_backup(
    two_servers: tuple[RedisServer, RedisServer], backup_dir: Path
) -> None:
    """Server A's backups failed for 8 days: its only backup must survive B's run,
    although B's fresh backups alone satisfy keep_min."""
    a, b = two_servers
    plant = Planted(backup_dir)
    a_last = plant.backup(a, 9 * DAY)
    b_fresh = [plant.backup(b, d * DAY) for d in (1, 2)]
    b_old = [plant.backup(b, d * DAY) for d in (10, 12)]
    b_legacy = plant.backup(b, 15 * DAY, legacy=True)  # its identity is derived: pruned
    b_future = plant.backup(b, -3 * DAY)  # reported, never counted nor deleted
    orphan = "redis/dump_20200101_000000.rdb.gz"  # data without manifest: not ours to prune
    plant.write(orphan, b"incomplete", None)

    made = back_up(b, backup_dir)

    assert a_last in plant.local_files(), "B's run deleted A's only backup"
    assert plant.local_files() == with_manifests(a_last, *b_fresh, b_future, made["name"]) | {
        orphan
    }
    assert not set(b_old) & plant.local_files() and b_legacy not in plant.local_files()
    assert made["source_id"] == identity(b)
    assert made["name"].endswith(f"_{tag(identity(b))}.rdb.gz")


def test_keep_min_and_newest_are_counted_per_server_here_and_in_s3(
    two_servers: tuple[RedisServer, RedisServer], backup_dir: Path, s3_prefix: str
) -> None:
    a, b = two_servers
    plant = Planted(backup_dir, s3_prefix)
    a_old = [plant.backup(a, d * DAY) for d in (40, 50)]  # all old, but A's own business
    b_old = [plant.backup(b, d * DAY) for d in (10, 20, 30)]
    b_future = plant.backup(b, -2 * DAY)
    orphan = "redis/dump_20200101_000000.rdb.gz"
    plant.write(orphan, b"incomplete", None)

    made = back_up(
        b,
        backup_dir,
        keep_min=2,
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=s3_prefix,
        s3_endpoint_url=stack.S3_ENDPOINT,
    )

    # keep_min=2: the new backup and the newest old one of B; B's others go, data
    # and manifest both (the raw listing would show a manifest-only or data-only prune)
    survivors = with_manifests(*a_old, b_old[0], b_future, made["name"]) | {orphan}
    assert plant.local_files() == survivors
    assert plant.remote_files() == survivors


def test_same_second_backups_of_two_servers_are_both_stored(
    two_servers: tuple[RedisServer, RedisServer],
    backup_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stopped clock (a fake) makes "the same second" certain instead of lucky.
    moment = datetime(2026, 3, 1, 6, 0, 0, tzinfo=UTC)
    monkeypatch.setattr(tasks.store.local, "utc_now", lambda: moment)
    a, b = two_servers
    first, second = back_up(a, backup_dir), back_up(b, backup_dir)
    assert first["name"] != second["name"]
    stored = sorted(p.name for p in (backup_dir / "redis").glob("dump_*.rdb.gz"))
    assert stored == sorted(Path(m["name"]).name for m in (first, second))
    assert all(name.startswith("dump_20260301_060000_") for name in stored)


def test_no_pruning_when_the_upload_failed(
    two_servers: tuple[RedisServer, RedisServer], backup_dir: Path
) -> None:
    _, b = two_servers
    plant = Planted(backup_dir)
    old = [plant.backup(b, d * DAY) for d in (10, 20, 30, 40)]
    closed = free_port()  # nothing listens there: the S3 endpoint is unreachable
    with pytest.raises(S3Unreachable, match=f"127.0.0.1:{closed} is unreachable"):
        back_up(
            b,
            backup_dir,
            keep_min=1,
            s3_bucket=stack.S3_BUCKET,
            s3_endpoint_url=f"http://127.0.0.1:{closed}",
        )
    [made] = [n for n in plant.local_files() - with_manifests(*old) if n.endswith(".gz")]
    assert plant.local_files() == with_manifests(*old, made)


def test_stale_partial_files_of_killed_runs_are_removed_and_only_those(
    two_servers: tuple[RedisServer, RedisServer], backup_dir: Path
) -> None:
    _, b = two_servers
    folder = backup_dir / "redis"
    folder.mkdir()
    two_days_ago = (utc_now() - 2 * DAY).timestamp()
    stale = [
        f".dump_20260101_000000_{tag(identity(b))}.rdb.gz.0a1b2c3d.partial",
        ".dump_20260101_000000.rdb.zst.deadbeef.partial",  # before names carried a tag
    ]
    kept = [
        f".dump_20260101_000000_{tag('other:1')}.rdb.gz.12345678.partial",  # running now
        ".notes.partial",  # not our pattern
        ".dump_20260101_000000.rdb.gz.partial",  # not our pattern (no run id)
    ]
    for name in stale + kept:
        (folder / name).write_bytes(b"half a backup")
        if name != kept[0]:
            os.utime(folder / name, (two_days_ago, two_days_ago))
    elsewhere = backup_dir / "logs" / ".gateway_20260101_000000.log.gz.0a1b2c3d.partial"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"another kind's folder")
    os.utime(elsewhere, (two_days_ago, two_days_ago))

    back_up(b, backup_dir)

    hidden = {p.name for p in folder.iterdir() if p.name.startswith(".")}
    assert hidden == set(kept)
    assert elsewhere.exists()
    [report] = flow_logs("partial file(s) left by killed runs")  # said in the run's log
    assert all(name in report for name in stale)


class FaultyS3:
    """A real S3 client with one fault injected (a fake: a real store will not corrupt
    an upload or refuse one PUT on demand). `truncated`/`altered`: the bytes that reach
    the store are shorter / differ at equal size, as a broken proxy or disk would;
    `manifest`: the manifest PUT fails after the data went through."""

    def __init__(self, real: object, fault: str) -> None:
        self._real, self._fault = real, fault

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def upload_fileobj(self, source: BinaryIO, bucket: str, key: str, **_: object) -> None:
        data = source.read()
        if self._fault == "truncated":
            data = data[:-10]
        elif self._fault == "altered":
            data = bytes([data[0] ^ 1]) + data[1:]
        self._real.put_object(Bucket=bucket, Key=key, Body=data)  # type: ignore[attr-defined]

    def put_object(self, **kwargs: object) -> object:
        if self._fault == "manifest" and str(kwargs["Key"]).endswith(".manifest.json"):
            raise ClientError(
                {"Error": {"Code": "InternalError", "Message": "We encountered an internal error"}},
                "PutObject",
            )
        return self._real.put_object(**kwargs)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("truncated", r"is \d+ bytes, expected \d+: the upload is incomplete"),
        ("altered", "has ETag .* which does not match the local file"),
        ("manifest", "answered InternalError"),
    ],
)
def test_a_faulty_upload_fails_the_run_keeps_everything_local_and_no_remote_manifest(
    fault: str,
    message: str,
    two_servers: tuple[RedisServer, RedisServer],
    backup_dir: Path,
    s3_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, b = two_servers
    plant = Planted(backup_dir)
    old = [plant.backup(b, d * DAY) for d in (10, 20, 30)]
    real_client = tasks.store.s3.client
    monkeypatch.setattr(tasks.store.s3, "client", lambda url: FaultyS3(real_client(url), fault))
    with pytest.raises(S3Error, match=message):
        back_up(
            b,
            backup_dir,
            keep_min=1,
            s3_bucket=stack.S3_BUCKET,
            s3_prefix=s3_prefix,
            s3_endpoint_url=stack.S3_ENDPOINT,
        )
    [made] = [n for n in plant.local_files() - with_manifests(*old) if n.endswith(".gz")]
    assert plant.local_files() == with_manifests(*old, made)  # stored here, nothing pruned
    remote = Planted(backup_dir, s3_prefix).remote_files()
    assert made + ".manifest.json" not in remote and remote <= {made}
