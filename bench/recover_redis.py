"""Benchmark: recover-redis against its floor on the 1.5 M-key backup, in one run.

On the same backup (page cache warm for all), taking turns in each of `--repeat` rounds
(a machine busy with other work slows them alike):

- floor: decompress the backup (isal, as fast as gzip gets) into a folder, start a
  bare `redis-server` there and poll until it answers `loading:0`;
- recover-redis into Redis 7 in a throwaway container (hostfs image, like the
  sandbox's), `appendonly no`, and another with `appendonly yes`: find and verify the
  backup, inspect, stop Redis while the RDB is decompressed (CRC-64), move aside,
  place, start Redis while redis-check-rdb parses the file and it is flushed to disk,
  wait for `loading:0`, prove (what Redis loaded, key counts, keyed sample),
  persistence. Its RTO is the flow's own measurement (flow start → verified
  healthy); the wall time of the call (Prefect's run bookkeeping too) is printed too.

Prints the medians, each against the floor of the same round (target: RTO <= 1.5x the
floor), and each step's median time.

    .venv/bin/python -m bench.recover_redis [--keys 1500000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before Prefect is imported: its logging is set up then.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no internet: no telemetry
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")

import docker  # noqa: E402
import redis  # noqa: E402
from docker.types import Mount  # noqa: E402

from bench.redis_backup import fill, free_port, start_redis  # noqa: E402
from flows.backup_redis import backup_redis  # noqa: E402
from flows.recover_redis import recover_redis  # noqa: E402
from sandbox import images  # noqa: E402
from sandbox.constants import SANDBOX_LABEL  # noqa: E402
from tasks.store.archive import Manifest, open_decompressed  # noqa: E402

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
    """`keys` session keys in a bare redis-server, backed up by backup-redis (its default
    route: the save followed in data_dir) into `<work>/backups`, the stored file read
    once (page cache warm). Returns the manifest and the backup folder."""
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
    data, conf = work / f"data-aof-{appendonly}", work / f"conf-aof-{appendonly}"
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


def recover_into(name: str, url: str, manifest: Manifest, backups: Path) -> dict[str, Any]:
    """The real recover_redis flow into container `name`; its result and wall time."""
    redis.Redis.from_url(url).flushall()  # the loss (also what the previous round restored)
    started = time.perf_counter()
    result = recover_redis(
        backup=manifest.name, container=name, redis_url=url, backup_dir=str(backups),
        s3_bucket="", gateway_health_url="",
    )  # fmt: skip
    result["wall"] = time.perf_counter() - started
    assert redis.Redis.from_url(url).dbsize() == sum(
        db["keys"] for db in manifest.source["keyspace"].values()
    )
    for aside in Path(backups.parent).glob("data-aof-*/dump.rdb.before-restore-*"):
        shutil.rmtree(aside)  # the previous round's restore, moved aside: not needed here
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_500_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is not installed: run `bash scripts/setup.sh` first")
    results: dict[str, list[dict[str, Any]]] = {"no": [], "yes": []}
    floors: list[float] = []
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        work = Path(tmp)
        manifest, backups = backed_up_dataset(work, args.keys)
        stored = backups / manifest.name
        with (
            redis_container(work, appendonly=False) as plain,
            redis_container(work, appendonly=True) as aof,
        ):
            for number in range(args.repeat):
                floors.append(floor_seconds(stored, work))
                results["no"].append(recover_into(*plain, manifest, backups))
                results["yes"].append(recover_into(*aof, manifest, backups))
                print(
                    f"  round {number + 1}: floor {floors[-1]:.2f} s, RTO appendonly no "
                    f"{results['no'][-1]['rto_seconds']:.2f} s, yes "
                    f"{results['yes'][-1]['rto_seconds']:.2f} s",
                    flush=True,
                )
    report(manifest, args.repeat, floors, results)


def report(
    manifest: Manifest, rounds: int, floors: list[float], results: dict[str, list[dict[str, Any]]]
) -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    floor = statistics.median(floors)
    print(
        f"\nbackup {manifest.name}: {manifest.raw_size / 1e6:.0f} MB RDB, "
        f"{manifest.size / 1e6:.0f} MB stored; medians of {rounds} rounds taking turns; "
        f"load average at the end {load}"
    )
    print(f"  floor: decompress + bare redis-server load   {floor:6.2f} s")
    for mode, runs in results.items():
        rto = statistics.median(r["rto_seconds"] for r in runs)
        wall = statistics.median(r["wall"] for r in runs)
        ratios = statistics.median(r["rto_seconds"] / f for r, f in zip(runs, floors, strict=True))
        print(
            f"  recover-redis, appendonly {mode:3}: RTO {rto:6.2f} s   {rto / floor:.2f}x the floor"
            f" (median of the rounds' ratios {ratios:.2f}x; target <= 1.5); call, wall "
            f"{wall:.2f} s   {wall / floor:.2f}x"
        )
        for position, step in enumerate(runs[0]["steps"]):
            seconds = statistics.median(r["steps"][position]["seconds"] for r in runs)
            print(f"      {seconds:6.2f} s  {step['name']}")


if __name__ == "__main__":
    main()
