"""A recovery that says ok has proven it: the Redis restored is found by what it runs
(not by its name), and what Redis loaded is compared exactly with the backup's
manifest, so a Redis that loaded something else, or nothing, is never "ok".

Real Redis 7 in throwaway containers and a real compose project of its own (its own
project name and ports: the sandbox is not touched)."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis_servers import assert_same_keyspace, free_port, keyspace_snapshot, running_redis
from throwaway_services import Service, prometheus_container, redis_container
from waiting import wait_until

from flows.backup_config import backup_config
from flows.backup_redis import backup_redis
from flows.recover_host import recover_host
from flows.recover_prometheus import recover_prometheus
from flows.recover_redis import recover_redis
from flows.support.failures import StepFailed
from sandbox.constants import SANDBOX_LABEL
from sandbox.images import build_rootfs_tar, host_layout, host_mounts
from tasks.common.certificates import verified
from tasks.docker.compose import compose_command
from tasks.docker.containers import docker_client

# An image that runs Redis by its own default command, as the official redis:7 does
# (which starts `redis-server` from its CMD, often as a service called `cache`).
REDIS_BY_DEFAULT = "proxilion-dr-test/redis-by-default:7"


def keys_with(client: redis.Redis, count: int, prefix: str, ttl_ms: int | None = None) -> None:
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.set(f"{prefix}:{i}", f"value-{i}", px=ttl_ms)
    pipe.execute()


def step(result: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in result["steps"] if s["name"] == name)


# ------------------------------------------------------------- recover-redis: the load


def recover(service: Service, backup_dir: Path, **parameters: Any) -> dict[str, Any]:
    defaults = {
        "container": service.name,
        "redis_url": service.url,
        "backup_dir": str(backup_dir),
        "gateway_health_url": "",
        "s3_bucket": "",
    }
    return recover_redis(**(defaults | parameters))


def back_up(service: Service, backup_dir: Path) -> dict[str, Any]:
    return backup_redis(
        redis_url=service.url,
        container=service.name,
        fetch="container",
        backup_dir=str(backup_dir),
        s3_bucket="",
    )


def test_a_data_dir_redis_does_not_use_is_found_out_and_the_old_data_stays(
    tmp_path: Path, backup_dir: Path
) -> None:
    """The backup holds 1000 keys; Redis, started on its own data dir (1500 keys), never
    reads the data_dir the RDB was placed in. The key count check (a lower bound) used
    to pass that; Redis's own count of what it loaded does not."""
    elsewhere = tmp_path / "not-redis-data"
    elsewhere.mkdir()
    (elsewhere / "dump.rdb").write_bytes(b"someone else's file")
    with redis_container(tmp_path) as service:
        client = redis.Redis(port=service.port)
        keys_with(client, 1000, "session")
        back_up(service, backup_dir)
        keys_with(client, 500, "later")
        with pytest.raises(
            StepFailed,
            match=r"step 'what Redis loaded' failed: Redis loaded 1500 keys and dropped 0 "
            r"expired ones \(1500 in all\), redis-check-rdb read 1000 in the RDB placed for it",
        ):
            recover(service, backup_dir, data_dir=str(elsewhere))
        assert client.dbsize() == 1500  # Redis is back on its own data
    assert (elsewhere / "dump.rdb").read_bytes() == b"someone else's file"  # put back


def test_an_empty_redis_is_not_a_restore_of_a_backup_whose_keys_all_have_a_ttl(
    tmp_path: Path, backup_dir: Path
) -> None:
    """Every key of the backup has a TTL, so "at least the keys without a TTL" is at
    least 0: an empty Redis passed. Redis's load count says it loaded nothing."""
    elsewhere = tmp_path / "not-redis-data"
    elsewhere.mkdir()
    with redis_container(tmp_path) as service:
        client = redis.Redis(port=service.port)
        keys_with(client, 1000, "session", ttl_ms=3_600_000)
        back_up(service, backup_dir)
        client.flushall()
        with pytest.raises(
            StepFailed, match="Redis loaded 0 keys .* redis-check-rdb read 1000 in the RDB placed"
        ):
            recover(service, backup_dir, data_dir=str(elsewhere))


@pytest.mark.parametrize("appendonly", [False, True])
def test_keys_that_expired_before_the_restore_are_counted_exactly(
    tmp_path: Path, backup_dir: Path, appendonly: bool
) -> None:
    """The backup's short-lived keys expire before the restore. A plain RDB load drops
    them (`rdb_last_load_keys_expired`); an AOF-base load reads them, then they expire:
    either way the counts add up to the manifest's exactly."""
    with redis_container(tmp_path, appendonly=appendonly) as service:
        client = redis.Redis(port=service.port)
        keys_with(client, 50, "kept")
        keys_with(client, 100, "brief", ttl_ms=4000)  # outlives the backup's start
        manifest = back_up(service, backup_dir)
        assert manifest["source"]["keyspace_exact"], manifest["source"]
        brief = manifest["source"]["keyspace"]["db0"]["keys"] - 50
        assert brief > 0, "every short-lived key expired before the save: nothing tested"
        wait_until(lambda: client.dbsize() == 50, "the short TTLs", timeout=10)
        client.flushall()
        result = recover(service, backup_dir)
        loaded = step(result, "what Redis loaded")["detail"]
        if appendonly:
            assert loaded.startswith(f"Redis loaded {50 + brief} keys + 0 expired on load")
        else:
            assert loaded.startswith(f"Redis loaded 50 keys + {brief} expired on load")
        counts = step(result, "key counts per db")["detail"]
        assert f"db0 50/{50 + brief}" in counts and ("exact" in counts or "writes since" in counts)
        wait_until(lambda: client.dbsize() == 50, "the expired keys gone")


def test_keys_written_while_the_backup_starts_are_counted_at_the_snapshot(
    tmp_path: Path, backup_dir: Path
) -> None:
    """A live gateway writes all the time. The manifest's key count is the snapshot's
    (read in the round trip that starts BGSAVE), not the count a moment before it, so
    the restore proves the load exactly. On the old code the count was read before the
    keyed sample and the save: the writes in between made a good restore fail."""
    with redis_container(tmp_path) as service:
        client = redis.Redis(port=service.port)
        keys_with(client, 200, "kept")
        writing, written = threading.Event(), [0]

        def gateway() -> None:
            writer = redis.Redis(port=service.port)
            while not writing.is_set():
                writer.set(f"session:{written[0]}", "x")
                written[0] += 1

        thread = threading.Thread(target=gateway)
        thread.start()
        try:
            wait_until(lambda: written[0] > 100, "the writer under way")
            manifest = back_up(service, backup_dir)
        finally:
            writing.set()
            thread.join()
        assert written[0] > 200, f"only {written[0]} writes: the backup did not race them"
        client.flushall()
        result = recover(service, backup_dir)
        backed_up = manifest["source"]["keyspace"]["db0"]["keys"]
        loaded = step(result, "what Redis loaded")["detail"]
        if manifest["source"]["keyspace_exact"]:
            exact = f"Redis loaded {backed_up} keys + 0 expired on load = the backup's {backed_up}"
            assert loaded.startswith(exact), loaded
        else:  # the pipeline was split and a write came between: the file's count proves it
            assert "keys redis-check-rdb read in the backup's RDB" in loaded, loaded
        assert result["ok"]


def test_a_redis_older_than_7_is_named_as_a_weaker_check() -> None:
    """Redis 6 reports no `rdb_last_load_keys_*`; no Redis 6 can be installed here (Debian
    12 ships 7.0), so the INFO of a real Redis 7 without those fields stands in for it."""
    from tasks.redis.prove import check_what_was_loaded
    from tasks.store.archive import Manifest

    with running_redis(Path("/tmp") / f"pdr-old-{secrets.token_hex(3)}") as server:
        client = server.client()
        info = {**client.info("server"), **client.info("persistence")}
    for name in ("rdb_last_load_keys_loaded", "rdb_last_load_keys_expired"):
        info.pop(name)
    info["redis_version"] = "6.2.14"
    manifest = Manifest(
        kind="redis",
        name="redis/x",
        created_at="2026-01-01T00:00:00+00:00",
        size=1,
        sha256="0" * 64,
        compression="gzip",
        raw_size=1,
        duration_seconds=0.0,
        source={"keyspace": {"db0": {"keys": 3, "expires": 0}}},
    )
    evidence = check_what_was_loaded(manifest, info, since=time.time() - 60)
    assert "Redis 6.2.14 does not report what it loaded" in evidence
    assert "WEAKER CHECK" in evidence


# ---------------------------------------------------------- recover-prometheus: retention


def test_a_prometheus_without_a_retention_flag_keeps_15_days_and_older_blocks_are_refused(
    tmp_path: Path, backup_dir: Path
) -> None:
    """With no retention flag, /api/v1/status/flags says `0s`, read as "no limit", while
    Prometheus keeps 15 days: the restored blocks (from 2025) were deleted about 2 h
    after a run that said ok. runtimeinfo's `storageRetention` says 15d."""
    from test_recover_prometheus import back_up, backfill, blocks

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with prometheus_container(tmp_path / "old", backfill) as source:
        manifest = back_up(source, backup_dir)
    with prometheus_container(tmp_path / "new", lambda _data: None, retention=None) as target:
        before = sorted(p.name for p in target.data_dir.iterdir())
        with pytest.raises(
            StepFailed,
            match=r"step 'inspect Prometheus' failed: Prometheus would delete restored blocks "
            r"within 2 h of starting \(its oldest restored block ends .* days ago and "
            r"Prometheus keeps 15d: set --storage.tsdb.retention.time=\d+d or more\)",
        ):
            recover_prometheus(
                container=target.name,
                prometheus_url=target.url,
                backup=manifest.name,
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
        assert sorted(p.name for p in target.data_dir.iterdir()) == before
        assert not blocks(target.data_dir)


# ------------------------------------------------ moving aside on the data's filesystem


@contextmanager
def bind_mounted_on_itself(path: Path) -> Iterator[None]:
    """`path` made a mount point: renaming it fails with EBUSY, as the kernel refuses to
    move a mount point (a real fault, half-way through moving a data dir aside)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def prometheus_on_a_mount_point(stack_: Any, tmp_path: Path) -> Any:
    """A Prometheus whose data dir is a tmpfs mount point of its own, with the sandbox's
    known history backfilled into it."""
    from mounts import mounted_tmpfs
    from test_recover_prometheus import backfill

    def mount_then_backfill(data: Path) -> None:
        stack_.enter_context(mounted_tmpfs(data, "size=1536m"))  # promtool preallocates 512 MiB
        backfill(data)

    return prometheus_container(tmp_path, mount_then_backfill)


def test_a_data_dir_that_is_a_mount_point_is_moved_aside_on_its_own_filesystem(
    tmp_path: Path, backup_dir: Path
) -> None:
    """The moved-aside folder used to be a sibling of the data dir: on another
    filesystem when the data dir is a mount point, so the move copied everything,
    unchecked for space. Now it is a rename inside the data dir's filesystem."""
    from contextlib import ExitStack

    from test_recover_prometheus import back_up, history, known_history

    with ExitStack() as mounts, prometheus_on_a_mount_point(mounts, tmp_path) as service:
        manifest = back_up(service, backup_dir)
        result = recover_prometheus(
            container=service.name,
            prometheus_url=service.url,
            backup=manifest.name,
            backup_dir=str(backup_dir),
            s3_bucket="",
        )
        [aside] = result["moved_aside"]
        assert Path(aside).parent == service.data_dir  # inside the mount point
        assert Path(aside).stat().st_dev == service.data_dir.stat().st_dev
        assert history(service) == known_history()


def test_a_move_aside_that_fails_half_way_puts_everything_back(
    tmp_path: Path, backup_dir: Path
) -> None:
    """wal/ cannot be moved (a mount point: EBUSY) after the blocks already were: they
    used to stay in the moved-aside folder, unreported, and Prometheus was started
    again without them."""
    from contextlib import ExitStack

    from test_recover_prometheus import back_up, history, known_history

    with ExitStack() as mounts, prometheus_on_a_mount_point(mounts, tmp_path) as service:
        manifest = back_up(service, backup_dir)
        before = sorted(p.name for p in service.data_dir.iterdir())
        assert "wal" in before and before.index("wal") == len(before) - 1  # moved last
        mounts.enter_context(bind_mounted_on_itself(service.data_dir / "wal"))
        with pytest.raises(
            StepFailed,
            match=r"step 'move current data aside' failed: could not move .*/wal to .* "
            r"\(Device or resource busy\); what had moved is back",
        ):
            recover_prometheus(
                container=service.name,
                prometheus_url=service.url,
                backup=manifest.name,
                backup_dir=str(backup_dir),
                s3_bucket="",
            )
        assert sorted(p.name for p in service.data_dir.iterdir()) == before
        wait_until(lambda: _ready(service.url), "Prometheus started again")
        assert history(service) == known_history()


def _ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/-/ready", timeout=2, verify=verified()).status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------- recover-host: the roles


def redis_image_with_default_command() -> str:
    """REDIS_BY_DEFAULT: the host's programs (like the sandbox's image), and a CMD that
    starts redis-server the way the official image's does (no config file)."""
    client = docker_client()
    client.api.import_image_from_data(
        build_rootfs_tar(host_layout()),
        repository=REDIS_BY_DEFAULT.rsplit(":", 1)[0],
        tag=REDIS_BY_DEFAULT.rsplit(":", 1)[1],
        changes=[
            f'LABEL {SANDBOX_LABEL}="test"',
            'ENV PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"',
            "WORKDIR /data",
            'CMD ["redis-server", "--protected-mode", "no"]',
        ],
    )
    return REDIS_BY_DEFAULT


def compose(folder: Path, project: str, *args: str) -> None:
    subprocess.run(
        [*compose_command(), "-p", project, *args],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=300,
    )


def write_project(folder: Path, services: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    (folder / "data").mkdir()
    text = yaml.safe_dump({"services": services}, sort_keys=False)
    (folder / "docker-compose.yml").write_text(text)
    return folder


def host_volumes() -> list[str]:
    return [f"{mount['Source']}:{mount['Target']}:ro" for mount in host_mounts()]


@contextmanager
def cleaned_up(*projects: tuple[Path, str]) -> Iterator[None]:
    """`down -v` of each compose project that exists, whatever happened."""
    try:
        yield
    finally:
        for folder, name in projects:
            if (folder / "docker-compose.yml").is_file():
                compose(folder, name, "down", "-v", "--timeout", "5")


def urls_nobody_answers() -> dict[str, str]:
    return {
        "gateway_url": f"http://127.0.0.1:{free_port()}",
        "prometheus_url": f"http://127.0.0.1:{free_port()}",
    }


def test_a_redis_service_called_cache_running_its_images_default_command_is_restored(
    tmp_path: Path, backup_dir: Path
) -> None:
    """Service `cache`, `redis-server` from its image's CMD and not in the compose file:
    it used to get no role, so recover-host skipped Redis and ended ok with 0 keys."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    cache = {
        "image": redis_image_with_default_command(),
        "ports": [f"127.0.0.1:{port}:6379"],
        "volumes": ["./data:/data", *host_volumes()],
    }
    old = write_project(tmp_path / "old-host", {"cache": cache})
    target = tmp_path / "new-host"
    tag = secrets.token_hex(3)
    with cleaned_up((old, f"pdr-cache-{tag}"), (target, f"pdr-cache-new-{tag}")):
        compose(old, f"pdr-cache-{tag}", "up", "-d")
        client = redis.Redis(port=port)
        wait_until(lambda: _answers(client), "the project's Redis")
        keys_with(client, 1000, "session")
        expected = keyspace_snapshot(url)
        to = {"backup_dir": str(backup_dir), "s3_bucket": ""}
        backup_redis(redis_url=url, container="", fetch="network", **to)
        backup_config(project_dir=str(old), env_container="", **to)
        compose(old, f"pdr-cache-{tag}", "down", "--timeout", "5")
        result = recover_host(
            target_dir=str(target),
            source_project_dir=str(old),
            redis_url=url,
            project_name=f"pdr-cache-new-{tag}",
            start_timeout_seconds=60,
            **urls_nobody_answers(),
            **to,
        )
        assert_same_keyspace(expected, keyspace_snapshot(url))
        assert "redis = cache" in step(result, "check the project's services")["detail"]
        assert step(result, "what Redis loaded")["detail"].startswith(
            "Redis loaded 1000 keys + 0 expired on load"
        )
        assert result["ok"]


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_project_without_a_redis_service_is_refused_naming_its_services(
    tmp_path: Path, backup_dir: Path
) -> None:
    """A backup of the Redis at redis_url exists, but no service of the project runs
    Redis: it used to end ok, reporting a Redis backup it never restored."""
    with running_redis(tmp_path / "old-redis") as server:
        keys_with(server.client(), 10, "session")
        backup_redis(
            redis_url=server.url, container="", fetch="network", backup_dir=str(backup_dir),
            s3_bucket="",
        )  # fmt: skip
        url = server.url
    web = {
        "image": "proxilion-dr/hostfs:latest",
        "command": ["sleep", "60"],
        "volumes": host_volumes(),
    }
    old = write_project(tmp_path / "old-host", {"web": web})
    backup_config(project_dir=str(old), env_container="", backup_dir=str(backup_dir), s3_bucket="")
    target = tmp_path / "new-host"
    with pytest.raises(StepFailed, match=r"no service of docker-compose.yml runs redis-server "
                       r"\(services: web\)"):  # fmt: skip
        recover_host(
            target_dir=str(target),
            source_project_dir=str(old),
            redis_url=url,
            backup_dir=str(backup_dir),
            s3_bucket="",
            **urls_nobody_answers(),
        )
    assert not target.exists()
