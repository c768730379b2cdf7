"""Benchmark: backup-redis against its peers on the same 1.5 M session keys, in one run.

Every group takes turns in each of `--repeat` rounds (a machine busy with other work
slows its members alike); the medians are printed with each ratio against the peer
measured in the same run:

- BGSAVE alone: BGSAVE, then INFO persistence polled until that save is done (the
  floor of any save-based backup);
- the runbook's way: BGSAVE and its wait, `cp dump.rdb`, `gzip -6`;
- backup-redis, local only, end to end (the flow called in this warm process, the
  Prefect server up, the Pushgateway push on): `fetch=auto`, which follows the save's
  file in Redis's dir (data_dir) while the fork writes it;
- `redis-cli --rdb - | zstd -3 -T2`, the shell's fastest backup: backup-redis end to end
  against it, and backup-redis `fetch=network` (the same route: the replication stream,
  diskless; the bench's Redis has `repl-diskless-sync-delay 0`), local only;
- encryption: the whole flow with the upload to the sandbox's S3 (its own prefix,
  removed after), unencrypted and age-encrypted, taking turns; the capture step of the
  same runs (from their manifests), where the age copy used to be made.

Then where a backup-redis run's time goes (flow start to its first step, the steps,
its last step to the call's return), the Pushgateway push (a throwaway
`prometheus-pushgateway`), how long after a backup's end the automation starts the
backup-status deployment, and the peak RSS of a fresh process running the flow with
encryption and the upload (target < 300 MB).

    .venv/bin/python -m bench.redis_backup [--keys 1500000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before Prefect is imported: its logging is set up then.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no internet: no telemetry
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")

import boto3  # noqa: E402
import redis  # noqa: E402
from prefect import get_client  # noqa: E402
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from pyrage import x25519

from deployments.notifications import replace_automation, status_automation
from flows.backup_redis import backup_redis
from flows.backup_status import backup_status
from sandbox import constants as stack
from tasks.common import pushgateway

REPO = Path(__file__).resolve().parent.parent
TOOLS = ["read_file", "write_file", "http_get", "exec_command", "list_dir", "send_email"]
S3_ENV = {
    "AWS_ACCESS_KEY_ID": stack.S3_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": stack.S3_SECRET_KEY,
    "AWS_DEFAULT_REGION": stack.S3_REGION,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
         "--save", "", "--appendonly", "no", "--repl-diskless-sync", "yes",
         "--repl-diskless-sync-delay", "0", "--logfile", str(data_dir / "redis.log")],
    )  # fmt: skip
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


def bgsave_and_wait(port: int) -> None:
    """BGSAVE, then INFO persistence every 10 ms until that save is done."""
    client = redis.Redis(port=port)
    saves = int(client.info("persistence")["rdb_saves"])
    client.bgsave()
    while True:
        state = client.info("persistence")
        if not int(state["rdb_bgsave_in_progress"]) and int(state["rdb_saves"]) > saves:
            assert state["rdb_last_bgsave_status"] == "ok"
            return
        time.sleep(0.01)


def taking_turns(
    actions: dict[str, Callable[[], object]], rounds: int, before: Callable[[], None]
) -> dict[str, list[float]]:
    """Seconds of each action in each round, the actions taking turns, `before` run
    untimed before each."""
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for number in range(rounds):
        for name, action in actions.items():
            before()
            start = time.perf_counter()
            action()
            samples[name].append(time.perf_counter() - start)
            print(f"  round {number + 1}: {name} {samples[name][-1]:.2f} s", flush=True)
    return samples


@contextlib.contextmanager
def throwaway_pushgateway(work: Path) -> Iterator[str]:
    """Debian's prometheus-pushgateway on a free port (not the sandbox's: its alerts)."""
    port = free_port()
    process = subprocess.Popen(
        ["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=(work / "pushgateway.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait()


class Bench:
    """The dataset, where backups go, and the flow calls the bench times."""

    def __init__(self, port: int, data: Path, work: Path) -> None:
        self.port, self.data, self.out = port, data, work / "out"
        self.url = f"redis://127.0.0.1:{port}/0"
        self.prefix = f"bench-{uuid.uuid4().hex[:10]}"
        self.runs: dict[str, list[dict[str, Any]]] = {}

    def reset(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(0o700)

    def flow(self, label: str, fetch: str, s3: bool = False) -> dict[str, Any]:
        """One backup_redis run; its manifest and run id kept under `label`."""
        state = backup_redis(
            redis_url=self.url,
            container="",
            fetch=fetch,
            data_dir=str(self.data) if fetch != "network" else "",
            backup_dir=str(self.out),
            s3_bucket=stack.S3_BUCKET if s3 else "",
            s3_prefix=self.prefix,
            s3_endpoint_url=stack.S3_ENDPOINT if s3 else "",
            return_state=True,
        )
        manifest = state.result()
        self.runs.setdefault(label, []).append(
            {"manifest": manifest, "run": state.state_details.flow_run_id, "ended": time.time()}
        )
        return manifest

    def runbook(self) -> None:
        bgsave_and_wait(self.port)
        shutil.copyfile(self.data / "dump.rdb", self.out / "dump.rdb")
        subprocess.run(["gzip", "-6", str(self.out / "dump.rdb")], check=True)

    def redis_cli_zstd(self) -> None:
        subprocess.run(
            f"redis-cli -p {self.port} --rdb - 2>/dev/null | zstd -3 -T2 -q -o {self.out}/d.zst",
            shell=True,
            check=True,
        )

    def remove_prefix(self) -> None:
        s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
        listing = s3.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=self.prefix + "/")
        for item in listing.get("Contents", []):
            s3.delete_object(Bucket=stack.S3_BUCKET, Key=item["Key"])


def where_the_time_goes(run_id: uuid.UUID, called: float, returned: float) -> dict[str, float]:
    """A run's flow start (call → first step), steps (first step → last step's end) and
    end (last step's end → return), from Prefect's records; times in seconds."""
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
        run = client.read_flow_run(run_id)
    first = min(t.start_time for t in tasks if t.start_time).timestamp()
    last = max(t.end_time for t in tasks if t.end_time).timestamp()
    assert run.end_time is not None
    return {
        "start": first - called,
        "steps": last - first,
        "to terminal state": run.end_time.timestamp() - last,
        "end": returned - last,
    }


def status_lag(bench: Bench) -> float:
    """Seconds from a backup run's end to the run of backup-status its automation made."""
    deployment_id = backup_status.to_deployment(name=f"bench-{uuid.uuid4().hex[:6]}").apply()
    automation = status_automation(deployment_id).model_copy(update={"name": "bench status"})
    automation_id = replace_automation(automation)
    try:
        bench.reset()
        state = backup_redis(redis_url=bench.url, container="", fetch="auto",
                             data_dir=str(bench.data), backup_dir=str(bench.out), s3_bucket="",
                             return_state=True)  # fmt: skip
        with get_client(sync_client=True) as client:
            ended = client.read_flow_run(state.state_details.flow_run_id).end_time
            deadline = time.monotonic() + 120
            mine = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            while not (runs := client.read_flow_runs(deployment_filter=mine)):
                assert time.monotonic() < deadline, "no status run within 120 s"
                time.sleep(0.1)
            [made] = runs
            client.delete_automation(automation_id)
            client.delete_deployment(deployment_id)
        assert ended is not None
        return (made.created - ended).total_seconds() if made.created else float("nan")
    finally:
        with get_client(sync_client=True) as client, contextlib.suppress(Exception):
            client.delete_automation(automation_id)


def peak_rss_mb(bench: Bench, recipients: str) -> float:
    """Peak RSS of a fresh process running backup_redis once, encrypting and uploading."""
    code = (
        "import resource, sys\n"
        "from flows.backup_redis import backup_redis\n"
        "backup_redis(redis_url=sys.argv[1], container='', fetch='auto', data_dir=sys.argv[2],"
        " backup_dir=sys.argv[3], s3_bucket=sys.argv[4], s3_prefix=sys.argv[5],"
        " s3_endpoint_url=sys.argv[6])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    bench.reset()
    env = dict(os.environ, PREFECT_LOGGING_LEVEL="WARNING", PROXILION_DR_AGE_RECIPIENTS=recipients)
    done = subprocess.run(
        [sys.executable, "-c", code, bench.url, str(bench.data), str(bench.out),
         stack.S3_BUCKET, bench.prefix, stack.S3_ENDPOINT],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def median(values: list[float]) -> float:
    return statistics.median(values)


def measure(keys: int, rounds: int, work: Path) -> None:
    data = work / "redis"
    data.mkdir()
    process, port = start_redis(data)
    try:
        print(f"filling {keys:,} session keys...", flush=True)
        fill(port, keys)
        rdb_mb = (data / "dump.rdb").stat().st_size / 1e6
        bench = Bench(port, data, work)
        with throwaway_pushgateway(work) as push_url:
            os.environ["PROXILION_DR_PUSHGATEWAY_URL"] = push_url
            bench.reset()
            bench.flow("warm-up", "auto")  # Prefect's first run in a process pays its start
            print("backup-redis against BGSAVE alone and the runbook's way:", flush=True)
            calls: list[tuple[float, float]] = []

            def ours() -> None:
                called = time.perf_counter(), time.time()
                bench.flow("auto", "auto")
                calls.append((called[1], called[1] + time.perf_counter() - called[0]))

            saves = taking_turns(
                {"BGSAVE alone": lambda: bgsave_and_wait(port), "backup-redis": ours,
                 "runbook": bench.runbook},
                rounds, bench.reset,
            )  # fmt: skip
            print("backup-redis fetch=network against redis-cli --rdb | zstd:", flush=True)
            network = taking_turns(
                {"network": lambda: bench.flow("network", "network"),
                 "redis-cli|zstd": bench.redis_cli_zstd},
                rounds, bench.reset,
            )  # fmt: skip
            print("the whole flow with the upload, plain and age-encrypted:", flush=True)
            recipients = str(x25519.Identity.generate().to_public())
            os.environ.update(S3_ENV)

            def upload(encrypted: bool) -> None:
                os.environ["PROXILION_DR_AGE_RECIPIENTS"] = recipients if encrypted else ""
                bench.flow("age" if encrypted else "plain", "auto", s3=True)

            try:
                flows = taking_turns(
                    {"plain": lambda: upload(False), "age": lambda: upload(True)},
                    rounds * 2, bench.reset,
                )  # fmt: skip
                rss = peak_rss_mb(bench, recipients)
            finally:
                os.environ["PROXILION_DR_AGE_RECIPIENTS"] = ""
                bench.remove_prefix()
            pushes = []
            for _ in range(10):
                start = time.perf_counter()
                pushgateway.push_backup(push_url, "redis", True, source="bench", size_bytes=1)
                pushes.append(time.perf_counter() - start)
            lag = status_lag(bench)
        spans = [
            where_the_time_goes(r["run"], c, e)
            for r, (c, e) in zip(bench.runs["auto"], calls, strict=True)
        ]
    finally:
        process.terminate()
        process.wait()
    report(rdb_mb, keys, rounds, saves, network, flows, bench, spans, pushes, lag, rss)


def report(
    rdb_mb: float,
    keys: int,
    rounds: int,
    saves: dict[str, list[float]],
    network: dict[str, list[float]],
    flows: dict[str, list[float]],
    bench: Bench,
    spans: list[dict[str, float]],
    pushes: list[float],
    lag: float,
    rss: float,
) -> None:
    m = {name: median(v) for group in (saves, network, flows) for name, v in group.items()}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    ours, bgsave, runbook = m["backup-redis"], m["BGSAVE alone"], m["runbook"]
    net, cli, plain, age = m["network"], m["redis-cli|zstd"], m["plain"], m["age"]
    capture = {
        label: median([r["manifest"]["steps"]["capture"] for r in bench.runs[label]])
        for label in ("plain", "age")
    }
    parts = {key: median([s[key] for s in spans]) for key in spans[0]}
    lines = [
        f"RDB {rdb_mb:.0f} MB, {keys:,} keys; medians of {rounds} rounds taking turns "
        f"({2 * rounds} for encryption); load average at the end {load}",
        f"  BGSAVE alone                          {bgsave:6.2f} s",
        f"  the runbook's way: BGSAVE, cp, gzip -6 {runbook:6.2f} s",
        f"  backup-redis end to end, local only   {ours:6.2f} s   "
        f"{ours / bgsave:.2f}x BGSAVE alone (target <= 1.2), "
        f"{ours / runbook:.2f}x the runbook's way (target <= 0.33)",
        f"  redis-cli --rdb - | zstd -3 -T2        {cli:6.2f} s   backup-redis end to end "
        f"{ours / cli:.2f}x that (target <= 0.9)",
        f"  backup-redis fetch=network, local only {net:6.2f} s   "
        f"{net / cli:.2f}x redis-cli | zstd (the same route as the peer's)",
        f"  capture step, age on / off            {capture['age']:6.2f} / "
        f"{capture['plain']:.2f} s   {capture['age'] / capture['plain']:.2f}x (target 1.00)",
        f"  whole flow with the upload, age / off {age:6.2f} / {plain:.2f} s   "
        f"{age / plain:.3f}x (target <= 1.03)",
        f"  flow peak RSS, age and upload         {rss:6.1f} MB (target < 300 MB)",
        f"  a backup-redis run: call -> first step {parts['start']:.2f} s, steps "
        f"{parts['steps']:.2f} s, last step -> terminal state {parts['to terminal state']:.2f} s,"
        f" last step -> return {parts['end']:.2f} s",
        f"  Pushgateway push {median(pushes) * 1000:.0f} ms (median of {len(pushes)}); "
        f"backup-status run started by its automation {lag:.2f} s after a backup ended "
        "(outside the backup's run)",
    ]
    print("\n" + "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_500_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for program in ("redis-server", "redis-cli", "zstd", "prometheus-pushgateway"):
        if not shutil.which(program):
            sys.exit(f"{program} is not installed: run `bash scripts/setup.sh` first")
    with tempfile.TemporaryDirectory(dir=REPO / "bench") as tmp:
        measure(args.keys, args.repeat, Path(tmp))


if __name__ == "__main__":
    main()
