"""backup-redis: which way the RDB leaves Redis (fetch=auto as deployed, container,
path, network) and proof that the backup holds the server named in redis_url."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import pytest
import redis
from mounts import mounted_tmpfs
from redis_servers import free_port, running_redis
from restoring import restore_redis_into
from test_backup_redis import fill, restore_and_compare

from flows.backup_redis import backup_redis
from sandbox import constants as stack
from sandbox import images
from tasks.redis.capture import WrongServer, check_fresh
from tasks.redis.rdb import RdbInfo
from tasks.redis.save import SaveFailed, SaveResult, SaveTimeout
from tasks.store.local import list_local


def default_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """fetch, container and data_dir as a scheduled deployment has them: the defaults."""
    for name in ("FETCH", "CONTAINER", "DATA_DIR"):
        monkeypatch.delenv(f"PROXILION_DR_REDIS_{name}", raising=False)


def backup_from_path(
    url: str, data_dir: Path | None, backup_dir: Path, **options: Any
) -> dict[str, Any]:
    """backup-redis of a server through a host folder (fetch=path), kept locally only."""
    return backup_redis(
        redis_url=url,
        container="",
        fetch="path",
        data_dir=str(data_dir) if data_dir else "",
        backup_dir=str(backup_dir),
        s3_bucket="",
        **options,
    )


def no_backups(backup_dir: Path) -> None:
    assert list_local(backup_dir, "redis") == []
    leftovers = [p for p in backup_dir.rglob("*") if p.is_file()]
    assert leftovers == [], f"partial files left behind: {leftovers}"


class RelayProxy:
    """A TCP relay on 127.0.0.1 in front of a real redis-server.

    `rewrite` edits what the server sends (whole lines only: data is passed on up
    to its last line end); `cut_syncs` is how many replication streams (SYNC) to
    drop after `cut_after` bytes, as a network cut or a killed replica link would.
    """

    def __init__(
        self,
        upstream_port: int,
        rewrite: Callable[[bytes], bytes] | None = None,
        cut_syncs: int = 0,
        cut_after: int = 8192,
    ) -> None:
        self.upstream_port = upstream_port
        self.rewrite = rewrite
        self.cut_syncs, self.cut_after, self.cuts = cut_syncs, cut_after, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            syncing = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, syncing), daemon=True).start()
            threading.Thread(
                target=self._down, args=(upstream, client, syncing), daemon=True
            ).start()

    def _up(self, client: socket.socket, upstream: socket.socket, syncing: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if b"SYNC" in data:
                    syncing.set()
                upstream.sendall(data)
        self._close(client, upstream)

    def _down(
        self, upstream: socket.socket, client: socket.socket, syncing: threading.Event
    ) -> None:
        pending, sent = b"", 0
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if syncing.is_set() and self.cuts < self.cut_syncs:
                    sent += len(data)
                    if sent > self.cut_after:  # pass on what came before the cut point,
                        client.sendall(data[: len(data) - (sent - self.cut_after)])  # header incl.
                        self.cuts += 1
                        break
                if self.rewrite is None:
                    client.sendall(data)
                    continue
                pending += data
                end = pending.rfind(b"\r\n") + 2
                if end >= 2:
                    client.sendall(self.rewrite(pending[:end]))
                    pending = pending[end:]
        self._close(client, upstream)

    @staticmethod
    def _close(*ends: socket.socket) -> None:
        for end in ends:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


@contextmanager
def relay(upstream_port: int, **options: object) -> Iterator[RelayProxy]:
    proxy = RelayProxy(upstream_port, **options)  # type: ignore[arg-type]
    try:
        yield proxy
    finally:
        proxy.close()


# ------------------------------------------------------- the right server, or none


def test_auto_never_backs_up_the_default_container_when_redis_url_is_another_server(
    sandbox_redis: str, backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis_url is server B; `proxilion-redis` (server A, the default container) exists."""
    default_fetch(monkeypatch)
    assert stack.REDIS_CONTAINER == "proxilion-redis"  # the setting's default
    with running_redis(tmp_path / "b") as server_b:
        fill(server_b.url, sessions=300)
        server_b.client().set("only-on-b", "yes")
        manifest = backup_redis(redis_url=server_b.url, backup_dir=str(backup_dir), s3_bucket="")
        assert manifest["source"]["fetch"] == "network"  # A's container was not used
        assert manifest["source"]["keyspace"]["db0"]["keys"] == 604
        restore_and_compare(backup_dir, manifest["name"], server_b.url, tmp_path)


def test_explicit_container_of_another_server_is_refused(
    sandbox_redis: str, backup_dir: Path, tmp_path: Path
) -> None:
    with running_redis(tmp_path / "b") as server_b:
        server_b.client().set("k", "v")
        with pytest.raises(WrongServer, match="cannot be used.*not held by a process of"):
            backup_redis(
                redis_url=server_b.url,
                container=stack.REDIS_CONTAINER,
                fetch="container",
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
    no_backups(backup_dir)


def test_auto_on_the_sandbox_copies_from_its_container(
    sandbox_redis: str, backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default_fetch(monkeypatch)
    manifest = backup_redis(redis_url=sandbox_redis, backup_dir=str(backup_dir), s3_bucket="")
    assert manifest["source"]["fetch"] == "container"
    # Others write to the shared sandbox Redis meanwhile: key-for-key is proved on a
    # throwaway container below; here the backup must load and hold the sandbox's data.
    target = tmp_path / "restored"
    target.mkdir()
    restore_redis_into(backup_dir, manifest["name"], target)
    with running_redis(target) as restored:
        assert restored.client().dbsize() > 0


def test_data_dir_of_another_server_is_refused_or_bypassed(
    backup_dir: Path, tmp_path: Path
) -> None:
    """data_dir holds server A's (older) dump.rdb while redis_url is server B."""
    with running_redis(tmp_path / "a") as server_a, running_redis(tmp_path / "b") as server_b:
        server_a.client().mset({f"a:{i}": i for i in range(100)})
        server_a.client().save()
        fill(server_b.url, sessions=200)
        with pytest.raises(WrongServer, match="dump.rdb was last written before the save"):
            backup_from_path(server_b.url, server_a.dir, backup_dir)
        no_backups(backup_dir)
        manifest = backup_redis(
            redis_url=server_b.url,
            container="",
            fetch="auto",
            data_dir=str(server_a.dir),
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
        assert manifest["source"]["fetch"] == "network"
        restore_and_compare(backup_dir, manifest["name"], server_b.url, tmp_path)


# ------------------------------------------------------------- the network stream


def test_network_fetch_keeps_no_raw_copy_on_disk(backup_dir: Path, tmp_path: Path) -> None:
    """A 24 MB uncompressed RDB into a 6 MB backup folder: only the compressed copy fits,
    so the backup succeeds only if the stream is compressed as it arrives."""
    with (
        running_redis(tmp_path / "src", rdbcompression="no") as source,
        mounted_tmpfs(tmp_path / "small", "size=6m") as small,
    ):
        source.client().mset({f"blob:{i}": b"x" * 8192 for i in range(3000)})
        manifest = backup_redis(
            redis_url=source.url, container="", fetch="network", backup_dir=str(small), s3_bucket=""
        )
        assert sorted(p.name for p in (small / "redis").iterdir()) == sorted(
            [Path(manifest["name"]).name, Path(manifest["name"]).name + ".manifest.json"]
        )
        restore_and_compare(small, manifest["name"], source.url, tmp_path)


def test_cut_stream_leaves_nothing_and_is_retried(backup_dir: Path, tmp_path: Path) -> None:
    with running_redis(tmp_path / "src", repl_diskless_sync="no") as source:
        fill(source.url)
        with relay(source.port, cut_syncs=1) as proxy:
            manifest = backup_redis(
                redis_url=proxy.url,
                container="",
                fetch="network",
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
            assert proxy.cuts == 1
        assert [b.name for b in list_local(backup_dir, "redis")] == [manifest["name"]]
        assert len([p for p in backup_dir.rglob("*") if p.is_file()]) == 2  # data + manifest
        restore_and_compare(backup_dir, manifest["name"], source.url, tmp_path)


def test_stream_cut_on_every_attempt_stores_nothing(backup_dir: Path, tmp_path: Path) -> None:
    with running_redis(tmp_path / "src", repl_diskless_sync="no") as source:
        fill(source.url)
        with (
            relay(source.port, cut_syncs=99) as proxy,
            pytest.raises(RuntimeError, match="RDB stream was cut off"),
        ):
            backup_redis(
                redis_url=proxy.url,
                container="",
                fetch="network",
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
        assert proxy.cuts == 3  # the first try and both retries
    no_backups(backup_dir)


# ------------------------------------------------------------------ the save itself


def test_last_save_ahead_of_the_server_clock_does_not_hang(
    backup_dir: Path, tmp_path: Path
) -> None:
    """After a clock step back, LASTSAVE is ahead of TIME and stays ahead after new saves.

    A documented fake for this one fault: redis-server cannot be given a clock that
    steps back (libfaketime crashes on its jemalloc), so a relay rewrites
    rdb_last_save_time in INFO to a fixed time an hour ahead; all else is a real server.
    """
    ahead = b"rdb_last_save_time:%d" % (int(time.time()) + 3600)

    def lastsave_ahead(data: bytes) -> bytes:
        return re.sub(rb"rdb_last_save_time:\d{10}", ahead, data)

    with running_redis(tmp_path / "r") as server, relay(server.port, rewrite=lastsave_ahead) as px:
        server.client().mset({f"k{i}": i for i in range(100)})
        outcome: list[object] = []

        def run() -> None:
            try:
                outcome.append(
                    backup_from_path(px.url, server.dir, backup_dir, save_timeout_seconds=20)
                )
            except Exception as error:  # noqa: BLE001 - reported below
                outcome.append(error)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        runner.join(240)  # a liveness bound, not a timing assertion: the old code never ends
        assert not runner.is_alive(), "the backup hung waiting for the clock to pass LASTSAVE"
        [manifest] = outcome
        assert isinstance(manifest, dict), manifest
        assert manifest["source"]["keyspace"]["db0"]["keys"] == 100
        assert server.client().info("persistence")["rdb_saves"] == 1
        restore_and_compare(backup_dir, manifest["name"], server.url, tmp_path)


def test_config_forbidden_asks_for_data_dir(backup_dir: Path, tmp_path: Path) -> None:
    with running_redis(tmp_path / "r") as server:
        server.client().set("k", "v")
        # as managed Redis services do: CONFIG is forbidden to the backup's user
        server.client().acl_setuser(
            "default", enabled=True, nopass=True, commands=["+@all", "-config"], keys=["~*"]
        )
        with pytest.raises(ValueError, match="did not tell its `dir` .*set data_dir"):
            backup_from_path(server.url, None, backup_dir)
    no_backups(backup_dir)


def test_no_rdb_at_the_path_is_named(backup_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with running_redis(tmp_path / "r") as server:
        server.client().set("k", "v")
        with pytest.raises(FileNotFoundError, match=f"no RDB at {empty}/dump.rdb: set data_dir"):
            backup_from_path(server.url, empty, backup_dir)
    no_backups(backup_dir)


@contextmanager
def redis_container(data: Path, read_only: bool) -> Iterator[tuple[str, str]]:
    """A throwaway Redis container (hostfs image, host network) over `data`; yields
    (name, url). Not the sandbox's: this one may be broken on purpose."""
    client = docker.from_env()
    image = images.ensure_hostfs_image(client)
    port = free_port()
    name = f"proxilion-dr-test-redis-{uuid.uuid4().hex[:8]}"
    mount = docker.types.Mount("/data", str(data), type="bind", read_only=read_only)
    container = client.containers.run(
        image,
        [
            "/usr/bin/redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            "/data",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        name=name,
        mounts=images.host_mounts() + [mount],
        network_mode="host",
        labels={stack.SANDBOX_LABEL: "test-throwaway"},
        detach=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(url, socket_timeout=1).ping():
                    break
            container.reload()
            if container.status == "exited" or time.monotonic() > deadline:
                pytest.fail(f"redis container did not start: {container.logs()[-2000:]!r}")
            time.sleep(0.1)
        yield name, url
    finally:
        container.remove(force=True)


def test_save_failure_reason_comes_from_the_container_log(backup_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with redis_container(data, read_only=True) as (name, url):
        redis.Redis.from_url(url).set("k", "v")
        with pytest.raises(
            SaveFailed,
            match="failed to write its snapshot: .*Failed opening the temp RDB.*Read-only",
        ):
            backup_redis(
                redis_url=url,
                container=name,
                fetch="container",
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
    no_backups(backup_dir)


def test_container_route_round_trips_through_a_throwaway_container(
    backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto proves the throwaway container runs the server at redis_url, and uses it."""
    default_fetch(monkeypatch)
    data = tmp_path / "data"
    data.mkdir()
    with redis_container(data, read_only=False) as (name, url):
        fill(url, sessions=200)
        manifest = backup_redis(
            redis_url=url, container=name, backup_dir=str(backup_dir), s3_bucket=""
        )
        assert manifest["source"]["fetch"] == "container"
        restore_and_compare(backup_dir, manifest["name"], url, tmp_path)


def test_auto_with_a_container_of_another_server_at_the_same_path_backs_up_the_right_one(
    backup_dir: Path, tmp_path: Path
) -> None:
    """Containers A and B both keep /data/dump.rdb; redis_url is B, container is A. The
    old code saved B, copied A's file and labelled it B: the backup held A's keys."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        redis_container(tmp_path / "a", read_only=False) as (name_a, url_a),
        redis_container(tmp_path / "b", read_only=False) as (_name_b, url_b),
    ):
        redis.Redis.from_url(url_a).mset({f"a:{i}": i for i in range(100)})
        redis.Redis.from_url(url_a).save()
        fill(url_b, sessions=200)
        manifest = backup_redis(
            redis_url=url_b,
            container=name_a,
            fetch="auto",
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
        assert manifest["source"]["fetch"] == "network"
        restore_and_compare(backup_dir, manifest["name"], url_b, tmp_path)


def test_a_save_kept_busy_by_a_replica_sync_fails_clearly(backup_dir: Path, tmp_path: Path) -> None:
    """A replica's full sync (a diskless save child, slowed down) holds the save slot
    past the deadline: the backup says why and stores nothing."""
    with running_redis(
        tmp_path / "primary",
        repl_diskless_sync="yes",
        repl_diskless_sync_delay="0",
        rdb_key_save_delay="100000",
    ) as primary:
        primary.client().mset({f"k{i}": i for i in range(600)})  # a sync of ~60 s
        with running_redis(tmp_path / "replica", replicaof=f"127.0.0.1 {primary.port}"):
            deadline = time.monotonic() + 30
            while not int(primary.client().info("persistence")["rdb_bgsave_in_progress"]):
                assert time.monotonic() < deadline, "the replica never started its sync"
                time.sleep(0.05)
            with pytest.raises(SaveTimeout, match="busy with a background save it did not"):
                backup_from_path(primary.url, primary.dir, backup_dir, save_timeout_seconds=3)
    no_backups(backup_dir)


def test_the_ctime_of_our_own_save_is_accepted_across_a_second_boundary() -> None:
    """Redis stamps `ctime` with time(), which reads the kernel's coarse clock (a tick,
    4-10 ms, behind the TIME we read before BGSAVE). A save started 0.5 ms into second
    844 can carry ctime 843; CI once refused its own backup for it as another server's.
    An RDB made a whole second before the save is still refused."""
    save = SaveResult(0, 0.0, 844, 844_000_500)
    fresh = RdbInfo(rdb_version=10, size=1, checksum=0, checksum_verified=False, created_at=843)
    check_fresh(fresh, save, "path", "redis://127.0.0.1:6379")
    late = SaveResult(0, 0.0, 844, 844_500_000)
    with pytest.raises(WrongServer, match="was made at 843, before the save"):
        check_fresh(fresh, late, "path", "redis://127.0.0.1:6379")


def test_a_slow_save_is_copied_while_redis_writes_it(backup_dir: Path, tmp_path: Path) -> None:
    """The copy follows the save's temp file in Redis's dir while the fork writes it and
    ends with the save; what it stored is the file the save left, every key of it."""
    with running_redis(tmp_path / "r", rdb_key_save_delay="2000") as server:  # ~2.5 s save
        fill(server.url, sessions=600)
        manifest = backup_from_path(server.url, server.dir, backup_dir)
        assert manifest["source"]["copied_during_save"] is True
        assert manifest["source"]["fetch"] == "path"
        restore_and_compare(backup_dir, manifest["name"], server.url, tmp_path)


def test_a_save_that_fails_half_way_through_the_copy_stores_nothing(
    backup_dir: Path, tmp_path: Path
) -> None:
    """Redis's dir fills up while its fork writes and the copy reads: the save's failure
    fails the backup, and nothing of what was read is kept."""
    with (
        mounted_tmpfs(tmp_path / "small", "size=2m") as small,
        running_redis(tmp_path / "r", dir=str(small), rdb_key_save_delay="5000") as server,
    ):
        client = server.client()
        client.mset({f"k{i}": os.urandom(20_000) for i in range(200)})  # 4 MB, incompressible
        with pytest.raises(SaveFailed, match="failed to write its snapshot"):
            backup_from_path(server.url, small, backup_dir)
    no_backups(backup_dir)
