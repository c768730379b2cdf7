"""Benchmark: the RTO of recover-redis against the floor, on the 1.5 M-key dataset.

In one run, on the same backup (page cache warm for both):

- floor: decompress the backup (isal, as fast as gzip gets) into a folder, start a
  bare `redis-server` there and poll until it answers `loading:0`;
- ours:  the real `recover_redis` flow restoring that backup into Redis in a
  throwaway container (hostfs image, like the sandbox's): find + verify checksum,
  validate and stage the RDB (CRC-64 and redis-check-rdb), stop, move aside, place,
  start, wait for `loading:0`, verify key counts. Its RTO is the flow's own
  measurement (flow start → verified healthy); the wall time of the call (which
  adds Prefect's flow-run bookkeeping) is printed too.

Target: RTO <= 2x floor.

    .venv/bin/python -m bench.recover_redis [--keys 1500000] [--appendonly]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import redis
from docker.types import Mount

from bench.redis_backup import fill, free_port, start_redis
from flows.backup_redis import backup_redis
from flows.recover_redis import recover_redis
from sandbox import images
from sandbox.constants import SANDBOX_LABEL
from tasks.store.archive import Manifest, open_decompressed

REPO = Path(__file__).resolve().parent.parent


def wait_loaded(port: int, timeout: float = 600) -> None:
    client = redis.Redis(port=port, socket_timeout=5)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if not int(client.info("persistence")["loading"]):
                return
        time.sleep(0.01)
    raise TimeoutError("redis-server did not finish loading")


def floor_seconds(stored: Path, work: Path) -> float:
    """Decompress the backup, then a bare redis-server loads it until loading:0."""
    target = work / "floor"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    port = free_port()
    started = time.perf_counter()
    with open_decompressed(stored, "gzip") as source, open(target / "dump.rdb", "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(target),
         "--save", "", "--appendonly", "no", "--logfile", str(target / "redis.log")],
    )  # fmt: skip
    try:
        wait_loaded(port)
        return time.perf_counter() - started
    finally:
        process.terminate()
        process.wait()


def backed_up_dataset(work: Path, keys: int) -> tuple[Manifest, Path]:
    """`keys` session keys in a bare redis-server, backed up by backup-redis (path
    route) into `<work>/backups`, the stored file read once (page cache warm).
    Returns the manifest and the backup folder."""
    source = work / "source"
    source.mkdir()
    process, port = start_redis(source)
    try:
        print(f"filling {keys:,} session keys...", flush=True)
        fill(port, keys)
        backups = work / "backups"
        manifest = Manifest(
            **backup_redis(
                redis_url=f"redis://127.0.0.1:{port}/0",
                container="",
                fetch="path",
                data_dir=str(source),
                backup_dir=str(backups),
                s3_bucket="",
            )
        )
    finally:
        process.terminate()
        process.wait()
    stored = backups / manifest.name
    subprocess.run(["cat", str(stored)], stdout=subprocess.DEVNULL, check=True)  # warm
    return manifest, backups


@contextlib.contextmanager
def redis_container(work: Path, appendonly: bool, extra: str = "") -> Iterator[tuple[str, str]]:
    """An empty Redis 7 in a throwaway container (the data is "lost"; `extra` config
    lines added); removed after."""
    client = docker.from_env()
    image = images.ensure_hostfs_image(client)
    port = free_port()
    data, conf = work / "container-data", work / "container-conf"
    data.mkdir()
    conf.mkdir()
    (conf / "redis.conf").write_text(
        f"bind 127.0.0.1\nport {port}\ndir /data\nsave 900 1\n"
        f"appendonly {'yes' if appendonly else 'no'}\n{extra}"
    )
    container = client.containers.run(
        image,
        ["/usr/bin/redis-server", "/conf/redis.conf"],
        name=f"proxilion-dr-bench-redis-{uuid.uuid4().hex[:8]}",
        mounts=images.host_mounts()
        + [Mount("/data", str(data), type="bind"), Mount("/conf", str(conf), type="bind")],
        network_mode="host",
        labels={SANDBOX_LABEL: "bench-throwaway"},
        detach=True,
    )
    try:
        wait_loaded(port, 30)
        yield container.name, f"redis://127.0.0.1:{port}/0"
    finally:
        container.remove(force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_500_000)
    parser.add_argument("--appendonly", action="store_true", help="target runs appendonly yes")
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is not installed: run `bash scripts/setup.sh` first")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        work = Path(tmp)
        manifest, backups = backed_up_dataset(work, args.keys)
        stored = backups / manifest.name
        floor = floor_seconds(stored, work)
        with redis_container(work, args.appendonly) as (name, url):
            started = time.perf_counter()
            result = recover_redis(
                backup=manifest.name, container=name, redis_url=url, backup_dir=str(backups),
                s3_bucket="", gateway_health_url="",
            )  # fmt: skip
            wall = time.perf_counter() - started
            keys = redis.Redis.from_url(url).dbsize()
    rto = result["rto_seconds"]
    print(
        f"\nbackup {manifest.name}: {manifest.raw_size / 1e6:.0f} MB RDB, "
        f"{manifest.size / 1e6:.0f} MB stored, {keys:,} keys restored"
        + (" (target appendonly yes)" if args.appendonly else "")
    )
    print(f"  floor: decompress + bare redis-server load {floor:7.2f} s")
    print(f"  recover-redis RTO (flow's own measurement)  {rto:7.2f} s   {rto / floor:.2f}x floor")
    print(
        f"  recover-redis call, wall                    {wall:7.2f} s   {wall / floor:.2f}x floor"
    )
    print("  (target: RTO <= 2x floor)")
    for step in result["steps"]:
        print(f"    {step['seconds']:7.2f} s  {step['name']}")


if __name__ == "__main__":
    main()
