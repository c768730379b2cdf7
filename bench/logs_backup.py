"""Benchmark: backup-logs against the runbook's `docker logs … | gzip` on >= 1 GB of logs.

In one run, on the same container log (page cache warm for everyone):

- a throwaway container (hostfs image, json-file log driver) prints ~1 GB of
  gateway-like lines (stdout, ~1% on stderr) as fast as it can, then exits;
- seed:  `docker logs --timestamps <c> 2>&1 | gzip` (the runbook's command, with
         timestamps so that both sides hold the same entries);
- ours:  the real `backup_logs` flow in a fresh process (read=auto, which picks the
         json-file log on this host), timed around the flow call after a warm-up flow
         (so Prefect's ephemeral server start is not counted), with the process's peak
         RSS from getrusage;
- api:   the same flow with read=api (dockerd decodes every entry: its ceiling).

MB/s are of the `docker logs --timestamps` output. Targets: ours >= 3x seed, peak
RSS < 300 MB. The container is removed afterwards.

    .venv/bin/python -m bench.logs_backup [--gigabytes 1.1] [--no-api]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

from sandbox.constants import HOSTFS_IMAGE, SANDBOX_LABEL
from sandbox.images import host_mounts

REPO = Path(__file__).resolve().parent.parent

# Runs inside the container with the host's python3: realistic lines, varied content.
GENERATOR = r"""
import random, sys, time
target = int(sys.argv[1])
rng = random.Random(42)
tools = ["read_file", "write_file", "http_request", "execute_command", "query_database",
         "send_email", "search", "list_directory"]
decisions = ["allow"] * 6 + ["alert", "block"]
sessions = ["%032x" % rng.getrandbits(128) for _ in range(5000)]  # active sessions
out, err = sys.stdout.buffer, sys.stderr.buffer
written, n = 0, 0
while written < target:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%06dZ" % (now % 1 * 1e6)
    lines = []
    for _ in range(1000):
        n += 1
        lines.append(
            '%s INFO 10.0.%d.%d "POST /analyze" 200 %.1fms session=%s tool=%s score=%d '
            'decision=%s request=%d\n' % (stamp, rng.randrange(256), rng.randrange(1, 255),
            rng.random() * 20, sessions[(n * 7 + rng.randrange(3)) % 5000], rng.choice(tools),
            rng.randrange(101),
            rng.choice(decisions), n))
    block = "".join(lines).encode()
    out.write(block)
    out.flush()
    written += len(block)
    if n % 100000 == 0:
        err.write(("%s ERROR analyze: session store unavailable: timeout after 2000ms "
                   "(request %d)\n" % (stamp, n)).encode() * 1000)
        err.flush()
"""

FLOW_RUNNER = r"""
import json, resource, sys, time
from prefect import flow
from flows.backup_logs import backup_logs

@flow
def warm_up() -> None:
    pass

warm_up()
started = time.perf_counter()
manifest = backup_logs(containers=[sys.argv[1]], window="1h", read=sys.argv[2],
                       backup_dir=sys.argv[3], s3_bucket="")
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_mb": peak, "lines": manifest["source"]["lines"],
                  "raw": manifest["raw_size"], "size": manifest["size"]}))
"""


def make_logs(client: docker.DockerClient, size: int) -> str:
    """A finished container whose json-file log holds `size` bytes of lines."""
    name = f"proxilion-dr-bench-logs-{uuid.uuid4().hex[:6]}"
    container = client.containers.run(
        HOSTFS_IMAGE,
        ["/usr/bin/python3", "-c", GENERATOR, str(size)],
        name=name,
        mounts=host_mounts(),
        network_mode="host",
        labels={SANDBOX_LABEL: "bench"},
        log_config={"Type": "json-file"},
        detach=True,
    )
    container.wait()
    return name


def seed(name: str, out: Path) -> tuple[float, int]:
    """Seconds of `docker logs -t | gzip`, and the bytes docker logs printed."""
    started = time.perf_counter()
    subprocess.run(f"docker logs --timestamps {name} 2>&1 | gzip > {out}", shell=True, check=True)
    seconds = time.perf_counter() - started
    count = subprocess.run(
        f"gzip -dc {out} | wc -c", shell=True, check=True, capture_output=True, text=True
    )
    return seconds, int(count.stdout)


def ours(name: str, read: str, out: Path) -> dict[str, float]:
    """The real flow in a fresh process: its seconds, peak RSS and what it stored."""
    env = dict(os.environ, PREFECT_LOGGING_LEVEL="WARNING")
    env.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    result = subprocess.run(
        [sys.executable, "-c", FLOW_RUNNER, name, read, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        sys.exit(f"backup_logs failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.1)
    parser.add_argument("--no-api", action="store_true", help="skip the read=api run")
    args = parser.parse_args()
    client = docker.from_env()
    print(f"generating {args.gigabytes:.1f} GB of container logs...", flush=True)
    started = time.perf_counter()
    name = make_logs(client, int(args.gigabytes * 1e9))
    try:
        log_path = Path(client.containers.get(name).attrs["LogPath"])
        print(
            f"  {name}: json-file log {log_path.stat().st_size / 1e9:.2f} GB "
            f"in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
        with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
            work = Path(tmp)
            seed_s, volume = seed(name, work / "seed.log.gz")
            (work / "seed.log.gz").unlink()
            mine = ours(name, "auto", work / "ours")
            api = None if args.no_api else ours(name, "api", work / "api")
    finally:
        client.containers.get(name).remove(force=True)
    mb = volume / 1e6
    print(f"\n{mb:,.0f} MB of `docker logs -t` output, {mine['lines']:,.0f} lines")
    print(f"  seed  docker logs -t | gzip   {seed_s:7.2f} s  {mb / seed_s:7.1f} MB/s")
    print(
        f"  ours  backup_logs (file)      {mine['seconds']:7.2f} s  {mb / mine['seconds']:7.1f} "
        f"MB/s  {seed_s / mine['seconds']:.2f}x seed (target >= 3)  "
        f"peak RSS {mine['rss_mb']:.0f} MB (target < 300)"
    )
    if api:
        print(
            f"  ours  backup_logs (api)       {api['seconds']:7.2f} s  {mb / api['seconds']:7.1f} "
            f"MB/s  {seed_s / api['seconds']:.2f}x seed  peak RSS {api['rss_mb']:.0f} MB"
        )
    print(
        f"  stored {mine['size'] / 1e6:.0f} MB gzip of {mine['raw'] / 1e6:.0f} MB lines "
        f"(ratio {mine['size'] / mine['raw']:.3f})"
    )


if __name__ == "__main__":
    main()
