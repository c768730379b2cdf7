"""Benchmark: point-in-time recovery on the 1.5 M-key dataset.

In one run, on Redis 7 in a throwaway container (`appendonly yes`,
`aof-timestamp-enabled yes`, like the sandbox's image):

1. fill 1.5 M session keys, rewrite the AOF (its BASE holds them), ship it once with
   backup-redis-aof to a backup dir and the sandbox's S3 (own prefix, removed after),
   and take one RDB backup with backup-redis;
2. a separate process writes 1,000 keys a second for `--minutes` while backup-redis-aof
   runs every `--interval` seconds with `--rounds` rounds (its deployment: every minute,
   two rounds): RPO achieved =
   for each write, the time from its acknowledgement to the moment the run whose
   marker follows it returned, its pieces verified in S3 (max, p99, median);
3. recover-redis `target_time` to a second `--before-end` seconds before the last
   write (the BASE plus nearly all the writes replayed), its RTO against recover-redis
   restoring the RDB backup alone into the same container; and the keys restored
   against the writes acknowledged up to that second.

    .venv/bin/python -m bench.redis_pitr [--keys 1500000] [--minutes 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import redis

from bench.recover_redis import redis_container
from bench.redis_backup import fill
from flows.backup_redis import backup_redis
from flows.backup_redis_aof import backup_redis_aof
from flows.recover_redis import recover_redis
from sandbox import constants as stack
from tasks.redis.pitr import utc

REPO = Path(__file__).resolve().parent.parent
WRITE_BATCH = 10  # writes per pipeline: 100 batches a second


def writer(port: int, seconds: float, rate: int, out: Any) -> None:
    """Write `rate` keys a second for `seconds` (paced), sending back (ack time, first
    key number, count) per pipeline."""
    client = redis.Redis(port=port, socket_timeout=30)
    acks = []
    n = 0
    started = time.time()
    while (now := time.time()) < started + seconds:
        due = int((now - started) * rate)
        if n >= due:
            time.sleep(min(0.005, (n + WRITE_BATCH) / rate - (now - started)))
            continue
        pipe = client.pipeline(transaction=False)
        for i in range(n, n + WRITE_BATCH):
            pipe.set(f"w:{i:09d}", f"write {i} " + "x" * 80)
        pipe.execute()
        acks.append((time.time(), n, WRITE_BATCH))
        n += WRITE_BATCH
    out.put(acks)


def ship(name: str, url: str, backups: Path, s3: dict[str, str], rounds: int = 1) -> dict[str, Any]:
    return backup_redis_aof(
        redis_url=url, container=name, backup_dir=str(backups), rounds=rounds, **s3
    )


def rpo(acks: list[tuple[float, int, int]], runs: list[tuple[float, float]]) -> list[float]:
    """Per write: the verified time of the first run whose marker was written after it."""
    found = []
    for ack, _first, count in acks:
        verified = next((v for marker, v in runs if marker >= ack), None)
        if verified is not None:
            found += [verified - ack] * count
    return found


def remove_prefix(prefix: str) -> None:
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.S3_BUCKET, Prefix=prefix)
    for page in pages:
        for item in page.get("Contents", []):
            s3.delete_object(Bucket=stack.S3_BUCKET, Key=item["Key"])


def prepare(name: str, url: str, port: int, keys: int, backups: Path, s3: dict[str, str]) -> str:
    """Fill, rewrite the AOF (its BASE holds the keys), ship the BASE, back up the RDB;
    returns the RDB backup's name."""
    client = redis.Redis(port=port, socket_timeout=600)
    print(f"filling {keys:,} session keys, then an AOF rewrite...", flush=True)
    fill(port, keys)
    client.bgrewriteaof()
    while any(int(client.info("persistence")[k]) for k in REWRITING):
        time.sleep(0.2)
    started = time.perf_counter()
    first = ship(name, url, backups, s3)
    print(f"BASE shipped in {time.perf_counter() - started:.1f} s: {first['shipped'][0]}")
    rdb = backup_redis(
        redis_url=url, container=name, fetch="container", backup_dir=str(backups), **s3
    )
    return str(rdb["name"])


REWRITING = ("aof_rewrite_in_progress", "aof_rewrite_scheduled")


def follow(
    name: str, url: str, port: int, args: argparse.Namespace, backups: Path, s3: dict[str, str]
) -> tuple[list[tuple[float, int, int]], list[tuple[float, float]], list[float]]:
    """Writes at `args.rate` for `args.minutes` in another process while the flow runs
    every `args.interval` s as deployed (`args.rounds` rounds a run); returns the
    writes' acks, each round's (marker written, pieces verified) and the rounds'
    durations."""
    seconds = args.minutes * 60
    queue: Any = multiprocessing.Queue()
    process = multiprocessing.Process(target=writer, args=(port, seconds, args.rate, queue))
    process.start()
    rounds: list[tuple[float, float]] = []
    durations: list[float] = []
    ends = time.time() + seconds
    while True:
        began = time.time()
        result = ship(name, url, backups, s3, args.rounds)
        for each in result["rounds"]:
            rounds.append((each["marker"]["written_at"], each["verified_at"]))
            durations.append(each["verified_at"] - each["marker"]["written_at"])
        print(
            f"  run at {began - ends + seconds:5.0f} s: {len(result['shipped'])} piece(s)",
            flush=True,
        )
        if began > ends:  # this run started after the last write: it shipped them all
            break
        time.sleep(max(0.0, began + args.interval - time.time()))
    acks = queue.get()
    process.join()
    return acks, rounds, durations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_500_000)
    parser.add_argument("--minutes", type=float, default=10.0, help="of writes after the BASE")
    parser.add_argument("--rate", type=int, default=1000, help="writes a second")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between runs")
    parser.add_argument("--rounds", type=int, default=2, help="rounds a run (deployed: 2)")
    parser.add_argument("--before-end", type=int, default=20, help="target: s before the end")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.update(
        AWS_ACCESS_KEY_ID=stack.S3_ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=stack.S3_SECRET_KEY,
        AWS_DEFAULT_REGION=stack.S3_REGION,
    )
    prefix = f"bench-pitr-{uuid.uuid4().hex[:8]}"
    s3 = {"s3_bucket": stack.S3_BUCKET, "s3_prefix": prefix, "s3_endpoint_url": stack.S3_ENDPOINT}
    with (
        tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp,
        redis_container(Path(tmp), True, 'save ""\naof-timestamp-enabled yes\n') as (name, url),
    ):
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        backups = Path(tmp) / "backups"
        try:
            rdb = prepare(name, url, port, args.keys, backups, s3)
            acks, runs, durations = follow(name, url, port, args, backups, s3)
            at = int(acks[-1][0]) - args.before_end
            common = {"container": name, "redis_url": url, "backup_dir": str(backups), **s3}
            point = utc(at).removesuffix(" UTC")
            pitr = recover_redis(gateway_health_url="", target_time=point, **common)
            restored = redis.Redis(port=port, socket_timeout=60).dbsize()
            rdb_only = recover_redis(gateway_health_url="", backup=rdb, **common)
        finally:
            remove_prefix(prefix + "/")
    report(args, acks, runs, durations, at, pitr, rdb_only, restored)


def report(
    args: argparse.Namespace,
    acks: list[tuple[float, int, int]],
    runs: list[tuple[float, float]],
    durations: list[float],
    at: int,
    pitr: dict[str, Any],
    rdb_only: dict[str, Any],
    restored: int,
) -> None:
    written = sum(count for _, _, count in acks)
    delays = sorted(rpo(acks, runs))
    base = args.keys + 1  # the sessions and the markers hash
    low = base + sum(c for ack, _, c in acks if ack < at)
    high = base + sum(c for ack, _, c in acks if ack < at + 1.2)  # AOF clock lags ≤ 100 ms
    rate = written / (acks[-1][0] - acks[0][0])
    print(f"\nwrites: {written:,} at {rate:.0f}/s for {args.minutes:g} min after the BASE")
    median, longest = statistics.median(durations), max(durations)
    print(
        f"backup-redis-aof every {args.interval:g} s, {args.rounds} round(s): a round (marker "
        f"written -> verified in S3) median {median:.1f} s, max {longest:.1f} s"
    )
    p99 = delays[int(len(delays) * 0.99)]
    print(
        f"RPO achieved (write acknowledged -> its piece verified in S3): max {delays[-1]:.1f} s, "
        f"p99 {p99:.1f} s, median {statistics.median(delays):.1f} s (target: a minute)"
    )
    ratio = pitr["rto_seconds"] / rdb_only["rto_seconds"]
    print(
        f"recover to {utc(at)}: RTO {pitr['rto_seconds']:.1f} s; the RDB backup alone: RTO "
        f"{rdb_only['rto_seconds']:.1f} s ({ratio:.2f}x)"
    )
    print(f"  keys after the point-in-time restore: {restored:,} (expected {low:,}-{high:,})")
    print(f"  {pitr['restore_point']}")
    for label, result in (("point in time", pitr), ("RDB alone", rdb_only)):
        print(f"  {label}:")
        for step in result["steps"]:
            print(f"    {step['seconds']:7.2f} s  {step['name']}")
    if not low <= restored <= high:
        sys.exit("the point-in-time restore does not hold exactly the writes up to its second")


if __name__ == "__main__":
    main()
