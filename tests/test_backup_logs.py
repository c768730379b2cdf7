"""backup-logs on the sandbox gateway and throwaway containers: both streams with
timestamps, empty and unknown containers, a stream cut off mid-way, a full disk."""

from __future__ import annotations

import gzip
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from conftest import require
from gateway_traffic import gateway_state_kept
from mounts import mounted_tmpfs
from waiting import past_the_second_of

from flows.backup_logs import backup_logs
from sandbox import constants as stack
from sandbox.images import host_mounts
from tasks.common.clock import utc_now
from tasks.docker.containers import ContainerError
from tasks.logs import capture as logs
from tasks.logs.capture import LogStreamCut, capture_logs, find_log_sources, parse_window
from tasks.store.local import list_local

LINE = re.compile(
    rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (\S+) (stdout|stderr) (.*)$", re.MULTILINE
)
NOISY = (  # ~2 MB of incompressible lines on stdout, a few on stderr
    "import os, sys\n"
    "for i in range(20000):\n"
    "    print(i, os.urandom(48).hex())\n"
    "    if i % 1000 == 0: print('warn', i, file=sys.stderr)\n"
)


@contextmanager
def throwaway(script: str, log_options: dict[str, str] | None = None) -> Iterator[str]:
    """A finished container from the hostfs image that ran `script`; removed afterwards."""
    client = docker.from_env()
    container = client.containers.run(
        stack.HOSTFS_IMAGE,
        ["/usr/bin/python3", "-c", script],
        name=f"proxilion-dr-test-{uuid.uuid4().hex[:8]}",
        mounts=host_mounts(),
        network_mode="host",
        labels={stack.SANDBOX_LABEL: "test-throwaway"},
        log_config={"Type": "json-file", "Config": log_options or {}},
        detach=True,
    )
    try:
        container.wait(timeout=60)
        yield container.name
    finally:
        container.remove(force=True)


def stored_lines(backup_dir: Path, manifest: dict) -> bytes:
    return gzip.decompress((backup_dir / manifest["name"]).read_bytes())


def nothing_stored(backup_dir: Path) -> None:
    assert list_local(backup_dir, "logs") == []
    leftovers = [p for p in backup_dir.rglob("*") if p.is_file()]
    assert leftovers == [], f"partial files left behind: {leftovers}"


class CuttingProxy:
    """A Unix-socket proxy to dockerd that drops the connection of a log stream after
    `limit` response bytes: a real connection cut, with dockerd left running."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit, self.log_requests = path, limit, 0
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with suppress(OSError):
            while True:
                client, _ = self.server.accept()
                upstream = socket.socket(socket.AF_UNIX)
                upstream.connect("/var/run/docker.sock")
                state = {"logs": False}
                threading.Thread(target=self._up, args=(client, upstream, state)).start()
                threading.Thread(target=self._down, args=(upstream, client, state)).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        with suppress(OSError):
            while data := client.recv(65536):
                if b"/logs?" in data:
                    state["logs"] = True
                    self.log_requests += 1
                upstream.sendall(data)

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        sent = 0
        with suppress(OSError):
            while data := upstream.recv(65536):
                if state["logs"] and sent + len(data) > self.limit:
                    client.sendall(data[: self.limit - sent])
                    break
                client.sendall(data)
                sent += len(data) if state["logs"] else 0
        for end in (client, upstream):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.server.close()


@pytest.mark.parametrize("read", ["file", "api"])
def test_gateway_logs_hold_both_streams_with_timestamps(
    read: str, backup_dir: Path, s3_prefix: str
) -> None:
    require(stack.GATEWAY_HOST, stack.GATEWAY_PORT, f"the gateway ({stack.GATEWAY_CONTAINER})")
    probe = uuid.uuid4().hex
    with gateway_state_kept(), httpx.Client(base_url=stack.GATEWAY_URL, timeout=5) as gateway:
        for i in range(3):
            body = {"session_id": f"{probe}-{i}", "tool": "read_file", "args": {"path": "/tmp"}}
            assert gateway.post(f"/analyze?probe={probe}", json=body).status_code == 200
        bad = gateway.post(f"/analyze?probe={probe}-bad", content=b"{not json")
        assert bad.status_code == 400
    manifest = backup_logs(
        containers=[stack.GATEWAY_CONTAINER],
        window="5m",
        read=read,
        backup_dir=str(backup_dir),
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=s3_prefix,
        s3_endpoint_url=stack.S3_ENDPOINT,
    )
    assert manifest["name"].startswith("logs/gateway_") and manifest["name"].endswith(".log.gz")
    text = stored_lines(backup_dir, manifest)
    lines = LINE.findall(text)
    assert len(lines) == text.count(b"\n") == manifest["source"]["lines"]
    assert {container for _, container, _, _ in lines} == {stack.GATEWAY_CONTAINER.encode()}
    ours = [(ts, stream, msg) for ts, _, stream, msg in lines if probe.encode() in msg]
    assert len(ours) == 4 and {stream for _, stream, _ in ours} == {b"stdout"}
    # dockerd stamps each stream in its own goroutine: compare with our first request only
    errors = [msg for ts, _, stream, msg in lines if stream == b"stderr" and ts > ours[0][0]]
    assert any(b"analyze: bad request" in msg for msg in errors)
    timestamps = [ts.decode() for ts, _, _, _ in lines]
    source = manifest["source"]
    assert (source["first_timestamp"], source["last_timestamp"]) == (timestamps[0], timestamps[-1])
    assert source["since"] <= timestamps[0] and timestamps[-1] <= source["until"]
    per = source["containers"][stack.GATEWAY_CONTAINER]
    assert per["read"] == read and per["stderr_lines"] >= 1
    assert per["stderr_lines"] + per["stdout_lines"] == per["lines"] == len(lines)
    assert source["container"] == stack.GATEWAY_CONTAINER and source["window"] == "5m"


def test_file_and_api_reads_store_the_same_lines(backup_dir: Path) -> None:
    script = (
        "import sys\n"
        "print('héllo wörld'); print('oops', file=sys.stderr)\n"
        "print('x' * 40000)\n"  # Docker splits entries over 16 KiB
        "sys.stdout.write('no newline at the end')\n"
    )
    with throwaway(script) as name:
        stored = []
        for read in ("file", "api"):
            manifest = backup_logs(
                containers=[name], window="1h", read=read, backup_dir=str(backup_dir), s3_bucket=""
            )
            stored.append(stored_lines(backup_dir, manifest))
            past_the_second_of(manifest["name"])
    assert stored[0] == stored[1]
    assert stored[0].count(b"\n") == 6 and f" {name} stderr oops\n".encode() in stored[0]
    assert stored[0].endswith(f" {name} stdout no newline at the end\n".encode())
    # the 40000-character line: 16 KiB + 16 KiB + the rest, each a line of its own (docs/backups.md)
    pieces = [m for _, _, _, m in LINE.findall(stored[0]) if m.startswith(b"xxx")]
    assert [len(m) for m in pieces] == [16384, 16384, 40000 - 2 * 16384]


def read_both_ways(name: str, since: datetime, until: datetime, tmp_path: Path) -> list[bytes]:
    """One container's log in [since, until] read from its file and through the API."""
    stored = []
    for read in ("file", "api"):
        [source] = find_log_sources.fn([name], read)
        captured = capture_logs.fn([source], since, until, tmp_path / f"{read}.gz", "gzip")
        stored.append(gzip.decompress((tmp_path / f"{read}.gz").read_bytes()))
        assert captured.lines == stored[-1].count(b"\n")
    return stored


def test_file_read_bisects_into_a_large_log_like_the_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = (  # three 1.5 MB bursts, 1.2 s apart
        "import time\n"
        "for burst in range(3):\n"
        "    for i in range(15000): print(f'burst {burst} line {i:05d} ' + 'x' * 70)\n"
        "    if burst < 2: time.sleep(1.2)\n"
    )
    starts: list[int] = []
    seek = logs._seek_to

    def spy(stream: Any, size: int, since: str) -> None:
        seek(stream, size, since)
        starts.append(stream.tell())

    monkeypatch.setattr(logs, "_seek_to", spy)
    with throwaway(script) as name:
        everything = read_both_ways(name, utc_now() - timedelta(hours=1), utc_now(), tmp_path)
        lines = everything[0].splitlines()
        stamp = [line.split(b" ", 1)[0].decode() for line in lines]
        first, last = 2 * 15000 + 100, 2 * 15000 + 500  # a window inside the third burst
        window = [datetime.fromisoformat(stamp[i][:26] + "+00:00") for i in (first, last)]
        inside = read_both_ways(name, window[0], window[1] + timedelta(microseconds=1), tmp_path)
    assert everything[0] == everything[1] and len(lines) == 45000
    assert inside[0] == inside[1]
    assert inside[0].startswith(b"%s " % stamp[first].encode())
    assert inside[0].count(b"\n") == last - first + 1
    assert starts[-1] > 1_000_000  # the bisection skipped the first burst


@pytest.mark.parametrize("compress", ["false", "true"])
def test_file_read_follows_rotated_logs_like_the_api(compress: str, tmp_path: Path) -> None:
    script = "for i in range(30000): print(f'line {i:05d} ' + 'y' * 90)\n"
    options = {"max-size": "1m", "max-file": "4", "compress": compress}
    with throwaway(script, options) as name:
        log_path = Path(docker.from_env().containers.get(name).attrs["LogPath"])
        rotated = [p.name.removeprefix(log_path.name) for p in log_path.parent.glob("*-json.log*")]
        until = utc_now()
        stored = read_both_ways(name, until - timedelta(hours=1), until, tmp_path)
    assert {name.removesuffix(".gz") for name in rotated} == {"", ".1", ".2", ".3"}
    assert any(name.endswith(".gz") for name in rotated) == (compress == "true")
    assert stored[0] == stored[1] and stored[0].count(b"\n") > 15000


def test_several_containers_go_into_one_file_in_order(backup_dir: Path) -> None:
    with throwaway("print('from one')") as one, throwaway("print('from two')") as two:
        manifest = backup_logs(
            containers=[one, two], window="10m", backup_dir=str(backup_dir), s3_bucket=""
        )
    text = stored_lines(backup_dir, manifest)
    assert [line.split(b" ", 2)[1:] for line in text.splitlines()] == [
        [one.encode(), b"stdout from one"],
        [two.encode(), b"stdout from two"],
    ]
    assert manifest["source"]["container"] == f"{one},{two}"


def test_containers_as_a_comma_separated_string_like_the_setting(backup_dir: Path) -> None:
    with throwaway("print('from one')") as one, throwaway("print('from two')") as two:
        single = backup_logs(containers=one, window="10m", backup_dir=str(backup_dir))
        both = backup_logs(containers=f"{one}, {two}", window="10m", backup_dir=str(backup_dir))
    assert single["source"]["container"] == one
    assert both["source"]["container"] == f"{one},{two}"
    assert single["source_id"] != both["source_id"]


def test_container_without_output_completes_with_zero_lines(backup_dir: Path) -> None:
    with throwaway("pass") as name:
        manifest = backup_logs(
            containers=[name], window="30m", backup_dir=str(backup_dir), s3_bucket=""
        )
    source = manifest["source"]
    assert (source["lines"], source["first_timestamp"], source["last_timestamp"]) == (0, None, None)
    assert stored_lines(backup_dir, manifest) == b""
    assert [m.name for m in list_local(backup_dir, "logs")] == [manifest["name"]]


def test_unknown_container_is_named_with_the_existing_ones(backup_dir: Path) -> None:
    named = "no container named 'proxilion-nope'.*proxilion-gateway"
    with pytest.raises(ContainerError, match=named):
        backup_logs(containers=["proxilion-nope"], backup_dir=str(backup_dir), s3_bucket="")
    nothing_stored(backup_dir)


@pytest.mark.parametrize("window", ["24x", "-1h", "0m", "h", "1d2"])
def test_bad_window_is_refused(window: str, backup_dir: Path) -> None:
    with pytest.raises(ValueError, match="(not a duration|is empty).*24h"):
        backup_logs(window=window, backup_dir=str(backup_dir), s3_bucket="")
    nothing_stored(backup_dir)


def test_parse_window() -> None:
    assert parse_window("30m") == timedelta(minutes=30)
    assert parse_window("24h") == timedelta(hours=24)
    assert parse_window(" 7d ") == timedelta(days=7)
    assert parse_window("1h30m") == timedelta(minutes=90)


def test_cut_off_stream_fails_and_stores_nothing(
    backup_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with throwaway(NOISY) as name:
        proxy = CuttingProxy(tmp_path / "docker.sock", limit=300_000)
        monkeypatch.setenv("DOCKER_HOST", f"unix://{proxy.path}")
        try:
            with pytest.raises(LogStreamCut, match=f"log stream of container '{name}' was cut off"):
                backup_logs(
                    containers=[name],
                    window="1h",
                    read="api",
                    backup_dir=str(backup_dir),
                    s3_bucket="",
                )
        finally:
            proxy.close()
    assert (
        proxy.log_requests == 3
    )  # the first try and two retries: a dropped connection is transient
    nothing_stored(backup_dir)


def test_full_disk_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    with throwaway(NOISY) as name, mounted_tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        with pytest.raises(OSError, match="no space left on the device of .*choose another"):
            backup_logs(containers=[name], window="1h", backup_dir=str(tiny), s3_bucket="")
        nothing_stored(tiny)
        assert os.listdir(tiny / "logs") == []
