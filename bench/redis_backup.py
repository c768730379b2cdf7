"""Benchmark: backup-redis's pipeline against the seed script and a plain `cp`.

Measures, in one run on the same RDB (page cache warm for everyone), the time
from "RDB saved" to "stored locally with manifest":

- floor: `cp dump.rdb <dir>/` (what any backup must at least do);
- seed:  `cp` then `gzip -6` (backup-redis.sh);
- ours:  capture (read, validate CRC-64, compress with isal, SHA-256) + commit
         (fsync, rename, manifest), by `fetch=path`; also with `deep_check`;
- ours + age: the same, plus the age-encrypted copy that goes to S3 with
         PROXILION_DR_AGE_RECIPIENTS set (made in the same pass as compression and
         hashing, as backup-redis makes it): the capture pass alone;
- whole flow: the real backup_redis flow (save, capture, upload to the sandbox's S3
         and its check, prune, report), unencrypted and with age, taking turns: the
         backup that encryption's added time (ours + age - ours, measured precisely in
         the capture pass, where the encryption happens) is set against (<= 15 %);
- network: the RDB over the replication protocol (`fetch=network`, diskless, so the
         transfer ends at the $EOF mark while Redis keeps the connection open: a
         time near `cp` shows the mark ends the read, not a timeout).

Then the peak RSS of a process running the real `backup_redis` flow on the
dataset and on a dataset twice as large, and once more with encryption on and the
upload to the sandbox's S3 (`python -m sandbox up` first). Prints ratios against the targets:
ours <= 0.1x seed, <= 2.5x floor, peak RSS < 300 MB and flat.

    .venv/bin/python -m bench.redis_backup [--keys 1500000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import redis
from pyrage import x25519

from sandbox import constants as stack
from tasks.common.clock import utc_now
from tasks.redis.capture import capture_rdb
from tasks.redis.server import ServerFacts
from tasks.redis.sync import fetch_rdb_over_network
from tasks.store.archive import Manifest, check_compression
from tasks.store.encryption import AgeCopy
from tasks.store.local import backup_name, commit_local, staging_path

REPO = Path(__file__).resolve().parent.parent
TOOLS = ["read_file", "write_file", "http_get", "exec_command", "list_dir", "send_email"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            "--logfile",
            str(data_dir / "redis.log"),
        ],
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def session_value(rng: random.Random, i: int) -> str:
    """A gateway session as the real one stores it: JSON history of tool calls."""
    calls = [
        {
            "tool": rng.choice(TOOLS),
            "ts": 1_764_000_000 + i + n,
            "score": rng.randint(0, 100),
            "args_digest": f"{rng.getrandbits(64):016x}",
        }
        for n in range(rng.randint(1, 3))
    ]
    return json.dumps(
        {
            "session_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "client": f"agent-{i % 5000}",
            "risk": rng.random(),
            "calls": calls,
        }
    )


def fill(port: int, keys: int) -> None:
    """`keys` sessions: 20,000 distinct histories, each stored under fresh random ids."""
    rng = random.Random(42)
    templates = [session_value(rng, i).encode() for i in range(20_000)]
    client = redis.Redis(port=port, socket_timeout=600)
    pipe = client.pipeline(transaction=False)
    for i in range(keys):
        unique = os.urandom(12).hex().encode()
        pipe.set(
            f"session:{i:08d}",
            b'{"nonce":"' + unique + b'",' + templates[i % 20_000][1:],
            ex=86_400 + i % 3600,
        )
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    client.save()


def timed(action: Callable[[], object], repeat: int, before: Callable[[], None]) -> float:
    """Median seconds of `action` over `repeat` runs, `before` run untimed each time."""
    return timed_together({"it": action}, repeat, before)["it"]


def timed_together(
    actions: dict[str, Callable[[], object]], repeat: int, before: Callable[[], None]
) -> dict[str, float]:
    """Median seconds of each action over `repeat` rounds, the actions taking turns in
    each round (a machine busy with other work then slows them alike: their ratio
    holds), `before` run untimed before each."""
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeat):
        for name, action in actions.items():
            before()
            start = time.perf_counter()
            action()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


PAIR_ROUNDS = 3  # rounds of ours / ours + age per --repeat


def our_pipeline(
    rdb_dir: Path,
    out: Path,
    deep_check: bool,
    compression: str = "gzip",
    recipients: list[str] | None = None,
) -> None:
    """What backup-redis does after the save, by `fetch=path` (task bodies, no engine);
    with `recipients`, also the age-encrypted copy for S3, made in the same pass as
    `flows.backup_redis` makes it (removed after the commit, where the upload would
    have read it)."""
    codec = check_compression(compression)
    facts = ServerFacts("7", "master", {}, str(rdb_dir), "dump.rdb", False)
    (out / "redis").mkdir(parents=True, exist_ok=True)
    name = backup_name("redis", utc_now(), codec, "bench:0")
    captured = capture_rdb.fn(
        "path",
        "redis://unused",
        None,
        str(rdb_dir),
        facts,
        staging_path(out, name),
        codec,
        deep_check,
        encrypt=AgeCopy(tuple(recipients)) if recipients else None,
    )
    manifest = Manifest(
        kind="redis",
        name=name,
        created_at=utc_now().isoformat(),
        size=captured.file.size,
        sha256=captured.file.sha256,
        compression=codec,
        raw_size=captured.file.raw_size,
        duration_seconds=captured.seconds,
    )
    encrypted = captured.file.encrypted
    if encrypted:
        manifest.encryption = encrypted.describe()
    commit_local.fn(out, captured.file, manifest)
    if encrypted:
        encrypted.path.unlink()


def flow_peak_rss_mb(port: int, rdb_dir: Path, out: Path, recipients: str = "") -> float:
    """Peak RSS of a fresh process that runs the real backup_redis flow once; with
    `recipients`, encrypting and uploading to the sandbox's S3 (objects removed after)."""
    prefix = f"bench-{uuid.uuid4().hex[:10]}" if recipients else ""
    code = (
        "import resource, sys\n"
        "from flows.backup_redis import backup_redis\n"
        "backup_redis(redis_url=sys.argv[1], container='', fetch='path', data_dir=sys.argv[2],"
        " backup_dir=sys.argv[3], s3_bucket=sys.argv[4], s3_prefix=sys.argv[5],"
        " s3_endpoint_url=sys.argv[6])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    env = flow_env(recipients)
    bucket = endpoint = ""
    if recipients:
        bucket, endpoint = stack.S3_BUCKET, stack.S3_ENDPOINT
    try:
        result = run_flow(code, port, rdb_dir, out, env, bucket, prefix, endpoint)
    finally:
        if recipients:
            remove_prefix(prefix, env)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


FLOW_TAKING_TURNS = """
import json, os, shutil, statistics, sys, time
from flows.backup_redis import backup_redis
url, data_dir, out, bucket, prefix, endpoint, rounds = sys.argv[1:8]
recipients = os.environ["PROXILION_DR_AGE_RECIPIENTS"]
def once(encrypted):
    shutil.rmtree(out, ignore_errors=True)
    os.environ["PROXILION_DR_AGE_RECIPIENTS"] = recipients if encrypted else ""
    start = time.perf_counter()
    backup_redis(redis_url=url, container="", fetch="path", data_dir=data_dir, backup_dir=out,
                 s3_bucket=bucket, s3_prefix=prefix, s3_endpoint_url=endpoint)
    return time.perf_counter() - start
once(True)  # warm-up: Prefect's first run in a process pays for its start
samples = {"plain": [], "age": []}
for _ in range(int(rounds)):
    samples["plain"].append(once(False))
    samples["age"].append(once(True))
print(json.dumps({name: statistics.median(values) for name, values in samples.items()}))
"""


def flow_seconds(
    port: int, rdb_dir: Path, out: Path, recipients: str, repeat: int
) -> dict[str, float]:
    """Median seconds of the whole backup_redis flow (save, capture, commit, upload to
    the sandbox's S3 and its check, prune, report), unencrypted and with age, taking
    turns in one process (objects removed after)."""
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    env = flow_env(recipients)
    bucket, endpoint = stack.S3_BUCKET, stack.S3_ENDPOINT
    try:
        result = run_flow(
            FLOW_TAKING_TURNS, port, rdb_dir, out, env, bucket, prefix, endpoint, str(repeat)
        )
    finally:
        remove_prefix(prefix, env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def flow_env(recipients: str) -> dict[str, str]:
    """The environment of a flow run by the bench: quiet; with `recipients`, age
    encryption on and the sandbox's S3 credentials."""
    env = dict(os.environ, PREFECT_LOGGING_LEVEL="WARNING")
    if recipients:
        env.update(
            PROXILION_DR_AGE_RECIPIENTS=recipients,
            AWS_ACCESS_KEY_ID=stack.S3_ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=stack.S3_SECRET_KEY,
            AWS_DEFAULT_REGION=stack.S3_REGION,
        )
    return env


def remove_prefix(prefix: str, env: dict[str, str]) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.S3_ENDPOINT,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    listing = s3.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=prefix + "/")
    for item in listing.get("Contents", []):
        s3.delete_object(Bucket=stack.S3_BUCKET, Key=item["Key"])


def run_flow(
    code: str,
    port: int,
    rdb_dir: Path,
    out: Path,
    env: dict[str, str],
    *s3: str,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            f"redis://127.0.0.1:{port}/0",
            str(rdb_dir),
            str(out),
            *s3,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def measure(keys: int, repeat: int, work: Path, timings: bool = True) -> dict[str, float]:
    data = work / f"redis-{keys}"
    data.mkdir()
    process, port = start_redis(data)
    try:
        print(f"filling {keys:,} session keys...", flush=True)
        fill(port, keys)
        rdb = data / "dump.rdb"
        size_mb = rdb.stat().st_size / 1e6
        out = work / "out"

        def reset() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            subprocess.run(["cat", str(rdb)], stdout=subprocess.DEVNULL, check=True)  # warm

        result = {"keys": keys, "rdb_mb": size_mb}
        if not timings:
            reset()
            result["rss_mb"] = flow_peak_rss_mb(port, data, out)
            return result
        result["cp"] = timed(
            lambda: subprocess.run(["cp", str(rdb), str(out)], check=True), repeat, reset
        )
        result["seed"] = timed(
            lambda: subprocess.run(
                f"cp {rdb} {out}/dump.rdb && gzip -6 {out}/dump.rdb", shell=True, check=True
            ),
            repeat,
            reset,
        )
        recipients = [str(x25519.Identity.generate().to_public())]
        pair = {
            "ours": lambda: our_pipeline(data, out, False),
            "ours_age": lambda: our_pipeline(data, out, False, recipients=recipients),
        }
        # their difference is encryption's added time: more rounds, each is short
        result.update(timed_together(pair, PAIR_ROUNDS * repeat, reset))
        result["ours_deep"] = timed(lambda: our_pipeline(data, out, True), repeat, reset)
        result["ours_zstd"] = timed(lambda: our_pipeline(data, out, False, "zstd"), repeat, reset)
        result["network"] = timed(
            lambda: fetch_rdb_over_network("127.0.0.1", port, out / "dump.rdb"), repeat, reset
        )
        reset()
        result["rss_mb"] = flow_peak_rss_mb(port, data, out)
        reset()
        result["rss_age_mb"] = flow_peak_rss_mb(port, data, out, recipients[0])
        flows = flow_seconds(port, data, out, recipients[0], repeat)
        result["flow_plain"], result["flow_age"] = flows["plain"], flows["age"]
        return result
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_500_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is not installed: run `bash scripts/setup.sh` first")
    os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        work = Path(tmp)
        base = measure(args.keys, args.repeat, work)
        shutil.rmtree(work / "out", ignore_errors=True)
        double = measure(args.keys * 2, 1, work, timings=False)
    r = base
    print(f"\nRDB {r['rdb_mb']:.0f} MB, {r['keys']:,} keys (median of {args.repeat})")
    print(f"  cp floor          {r['cp']:7.3f} s")
    print(f"  seed cp+gzip -6   {r['seed']:7.3f} s")
    print(
        f"  ours              {r['ours']:7.3f} s   {r['ours'] / r['seed']:.3f}x seed "
        f"(target <= 0.1)   {r['ours'] / r['cp']:.2f}x cp (target <= 2.5)"
    )
    added = r["ours_age"] - r["ours"]
    print(
        f"  ours + age copy   {r['ours_age']:7.3f} s   {r['ours_age'] / r['ours']:.3f}x ours "
        f"(the capture pass alone, median of {PAIR_ROUNDS * args.repeat}; +{added:.3f} s)"
    )
    print(f"  whole flow        {r['flow_plain']:7.3f} s   unencrypted, with the upload to S3")
    print(
        f"  whole flow + age  {r['flow_age']:7.3f} s   {r['flow_age'] / r['flow_plain']:.3f}x "
        "(runs of the flow spread by about a second: more than encryption adds)"
    )
    print(
        f"  age's added time  {added:7.3f} s   {added / r['flow_plain']:.1%} of the unencrypted "
        "backup (the capture pass's difference over the whole flow; target <= 15%)"
    )
    print(
        f"  ours + deep check {r['ours_deep']:7.3f} s   {r['ours_deep'] / r['seed']:.3f}x seed"
        f"   {r['ours_deep'] / r['cp']:.2f}x cp"
    )
    print(
        f"  ours, zstd        {r['ours_zstd']:7.3f} s   {r['ours_zstd'] / r['seed']:.3f}x seed"
        f"   {r['ours_zstd'] / r['cp']:.2f}x cp"
    )
    print(
        f"  network fetch     {r['network']:7.3f} s   {r['network'] / r['cp']:.2f}x cp"
        " (raw RDB over SYNC, diskless: ends at the $EOF mark)"
    )
    print(
        f"  flow peak RSS     {r['rss_mb']:7.1f} MB at {r['rdb_mb']:.0f} MB RDB, "
        f"{double['rss_mb']:.1f} MB at {double['rdb_mb']:.0f} MB RDB "
        f"(ratio {double['rss_mb'] / r['rss_mb']:.2f}; target < 300 MB and flat)"
    )
    print(
        f"  flow peak RSS     {r['rss_age_mb']:7.1f} MB at {r['rdb_mb']:.0f} MB RDB with age "
        "encryption and the upload to S3 (target < 300 MB)"
    )


if __name__ == "__main__":
    main()
