"""Benchmark: the verify-restore drill's wall time and each component's restore time.

1. The sandbox's backups: one backup of each kind (Redis, Prometheus, the gateway's
   logs, a config project) taken from the shared sandbox into a temporary folder,
   then the whole drill on them. Target: under 60 s.
2. The 1.5 M-key dataset (bench.redis_backup's `fill`): backed up, then the drill's
   Redis component (validate, load, key counts, keyed sample, a gateway's /health)
   against the floor of bench.recover_redis (decompress + a bare `redis-server`
   loading it until `loading:0`). Target: under 2x the floor.

Needs the sandbox stack up (`python -m sandbox up`): the drill's containers copy the
images and settings of `proxilion-redis`, `proxilion-gateway` and `prometheus`.

    .venv/bin/python -m bench.verify_restore [--keys 1500000] [--skip-large | --only-large]
        [--runs N]   (N floor/drill pairs in turn on the large dataset; prints the median)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.recover_redis import backed_up_dataset, floor_seconds
from flows.backup_config import backup_config
from flows.backup_logs import backup_logs
from flows.backup_prometheus import backup_prometheus
from flows.backup_redis import backup_redis
from flows.verify_restore import verify_restore
from sandbox import constants as stack

REPO = Path(__file__).resolve().parent.parent
PROJECT = {
    "docker-compose.yml": "services:\n  redis:\n    image: redis:7\n"
    "    environment:\n      MODE: ${MODE}\n",
    "prometheus.yml": "scrape_configs: []\n",
    "alerts.yml": "groups: []\n",
}


def print_drill(title: str, result: dict[str, Any], wall: float) -> None:
    print(f"\n{title}: drill wall time {wall:.2f} s (flow's own {result['seconds']:.2f} s)")
    for name, outcome in result["components"].items():
        steps = ", ".join(f"{s['name']} {s['seconds']:.2f}" for s in outcome["steps"])
        print(f"  {name:<11} restore time (RTO) {outcome['rto_seconds']:7.2f} s   [{steps}]")


def sandbox_drill(work: Path) -> None:
    project = stack.STATE_DIR / "project"
    if not (project / "docker-compose.yml").is_file():  # the sandbox is no compose project
        project = work / "project"
        project.mkdir()
        for name, text in PROJECT.items():
            (project / name).write_text(text)
    where = {"backup_dir": str(work / "backups"), "s3_bucket": ""}
    print("backing up the sandbox (redis, prometheus, config, logs)...", flush=True)
    backup_redis(redis_url=stack.REDIS_URL, **where)
    backup_prometheus(prometheus_url=stack.PROMETHEUS_URL, **where)
    backup_config(project_dir=str(project), env_container=stack.GATEWAY_CONTAINER, **where)
    backup_logs(containers=stack.GATEWAY_CONTAINER, window="24h", **where)
    started = time.perf_counter()
    result = verify_restore(scratch_dir=str(work / "scratch"), **where)
    print_drill("sandbox backups", result, time.perf_counter() - started)
    print("  (target: the whole drill under 60 s)")


def large_drill(work: Path, keys: int, runs: int) -> None:
    """Floor, then drill, `runs` times in turn (on a shared machine one pair is noisy);
    the median ratio is the result."""
    print()
    manifest, backups = backed_up_dataset(work, keys)
    ratios = []
    for run in range(1, runs + 1):
        floor = floor_seconds(backups / manifest.name, work)
        started = time.perf_counter()
        result = verify_restore(
            components=["redis"],
            redis_backup=manifest.name,
            backup_dir=str(backups),
            s3_bucket="",
            scratch_dir=str(work / "scratch"),
        )
        wall = time.perf_counter() - started
        title = f"{keys:,} keys ({manifest.raw_size / 1e6:.0f} MB RDB), run {run} of {runs}"
        print_drill(title, result, wall)
        rto = result["components"]["redis"]["rto_seconds"]
        ratios.append(rto / floor)
        print(f"  floor: decompress + bare redis-server load {floor:7.2f} s")
        print(
            f"  drill's Redis restore time                 {rto:7.2f} s   {rto / floor:.2f}x floor"
        )
    if runs > 1:
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"\nmedian {statistics.median(ratios):.2f}x floor over {runs} runs ({listed})")
    print("  (target: under 2x the floor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_500_000)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--skip-large", action="store_true", help="only the sandbox's backups")
    only.add_argument("--only-large", action="store_true", help="only the large dataset")
    parser.add_argument("--runs", type=int, default=1, help="floor and drill pairs, large")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        work = Path(tmp)
        if not args.only_large:
            (work / "sandbox").mkdir()
            sandbox_drill(work / "sandbox")
        if not args.skip_large:
            (work / "large").mkdir()
            large_drill(work / "large", args.keys, args.runs)


if __name__ == "__main__":
    main()
