"""Real `prometheus` processes for tests (Debian's /usr/bin/prometheus), and queries.

`running_prometheus(data_dir)` starts one on a free 127.0.0.1 port over `data_dir`
(retrying with another port if one was taken meanwhile), waits for /-/ready and
stops it on exit. By default it scrapes nothing; `scrape_self_every="1s"` makes it
scrape itself, `pushgateway="127.0.0.1:<port>"` a Pushgateway (every second, with
`honor_labels` as docs/operations.md says), and `extra_args` adds flags (e.g.
`--storage.tsdb.use-lockfile`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox import constants as stack
from tasks.common.certificates import verified

START_TIMEOUT = 30.0


def query(url: str, expr: str, at: float) -> list[tuple[tuple[tuple[str, str], ...], str]]:
    """An instant query's answer as sorted (labels, value) pairs."""
    answer = httpx.get(
        f"{url}/api/v1/query", params={"query": expr, "time": at}, timeout=10, verify=verified()
    )
    answer.raise_for_status()
    return sorted(
        (tuple(sorted(s["metric"].items())), s["value"][1]) for s in answer.json()["data"]["result"]
    )


def back_up(server: Throwaway, backup_dir: Path) -> dict[str, Any]:
    """backup-prometheus of a throwaway server by host path, local only."""
    from flows.backup_prometheus import backup_prometheus  # a flow: imported when used

    return backup_prometheus(
        prometheus_url=server.url,
        container="",
        fetch="path",
        data_dir=str(server.data_dir),
        backup_dir=str(backup_dir),
        s3_bucket="",
    )


SCRAPED = "scrape_duration_seconds"  # written by every scrape, a different float each time


def compare_blocks(restored_url: str, source_url: str, blocks: list[dict[str, Any]]) -> int:
    """At a moment inside each block (manifest `block_list` entries) the restored
    server answers `SCRAPED` exactly as the source does. Returns how many answers held
    values; fails when none did (a block may hold other series only)."""
    compared = 0
    for block in blocks:
        # Earlier than the block's end by more than a scrape timeout (5 s in the
        # sandbox): a scrape still in flight at the snapshot lands after this moment.
        at = max(block["min_time"], block["max_time"] - 6000) / 1000
        restored = query(restored_url, SCRAPED, at)
        assert restored == query(source_url, SCRAPED, at), f"block {block['ulid']} differs"
        compared += bool(restored)
    assert compared, f"no {SCRAPED} value in any of {len(blocks)} blocks: nothing was proved"
    return compared


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Throwaway:
    url: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _config(port: int, scrape_self_every: str | None, pushgateway: str | None) -> str:
    jobs = []
    if scrape_self_every is not None:
        jobs.append(
            f'  - job_name: self\n    static_configs:\n      - targets: ["127.0.0.1:{port}"]\n'
        )
    if pushgateway is not None:
        jobs.append(
            "  - job_name: pushgateway\n    honor_labels: true\n    static_configs:\n"
            f'      - targets: ["{pushgateway}"]\n'
        )
    if not jobs:
        return "scrape_configs: []\n"
    every = scrape_self_every or "1s"
    return f"global:\n  scrape_interval: {every}\nscrape_configs:\n" + "".join(jobs)


def _start(
    data_dir: Path,
    admin: bool,
    scrape_self_every: str | None,
    pushgateway: str | None,
    extra_args: list[str],
) -> Throwaway | None:
    """One start on a fresh port; None when that port was taken meanwhile."""
    port = free_port()
    config = data_dir.parent / f"prometheus-{port}.yml"
    config.write_text(_config(port, scrape_self_every, pushgateway))
    log = data_dir.parent / f"prometheus-{port}.log"
    args = [
        "prometheus",
        f"--config.file={config}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={data_dir}",
        f"--storage.tsdb.retention.time={stack.PROMETHEUS_RETENTION}",
        *(["--web.enable-admin-api"] if admin else []),
        *extra_args,
    ]
    with open(log, "wb") as output:
        process = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)
    server = Throwaway(f"http://127.0.0.1:{port}", port, data_dir, process)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/-/ready", timeout=1, verify=verified()).status_code == 200:
                return server
        if process.poll() is not None and "address already in use" in log.read_text():
            return None
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"prometheus on {data_dir} did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


@contextmanager
def running_prometheus(
    data_dir: Path,
    admin: bool = True,
    scrape_self_every: str | None = None,
    extra_args: list[str] | None = None,
    pushgateway: str | None = None,
) -> Iterator[Throwaway]:
    """The host's `prometheus` on a free 127.0.0.1 port over `data_dir`."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = None
    for _attempt in range(5):
        server = _start(data_dir, admin, scrape_self_every, pushgateway, extra_args or [])
        if server is not None:
            break
    if server is None:
        pytest.fail(f"prometheus on {data_dir} found no free port in 5 tries")
    try:
        yield server
    finally:
        server.stop()
