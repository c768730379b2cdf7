"""verify-restore, the restore drill, on real backups: the sandbox's (Redis, Prometheus,
gateway logs, a config project with a withheld secret) and throwaway servers'. Scratch
containers from the live containers' images; the live stack is only read."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import docker
import pytest
import redis as redis_py
from conftest import require
from prefect.client.orchestration import get_client
from redis_servers import running_redis, start_from_rdb
from test_monitoring import pushed, pushgateway  # noqa: F401 - the fixture
from throwaway_services import redis_container

from flows.backup_config import backup_config
from flows.backup_logs import backup_logs
from flows.backup_prometheus import backup_prometheus
from flows.backup_redis import backup_redis
from flows.verify_restore import DrillFailed, verify_restore
from sandbox import constants as stack
from sandbox import images
from sandbox.stack import gateway_mounts
from tasks.common.files import write_durably
from tasks.drill.scratch import (
    DRILL_LABEL,
    DrillBusy,
    Scratch,
    inspect_live,
    one_drill_per_host,
    program_argv,
    remove_container,
    start_scratch,
)
from tasks.redis.rdb import crc64
from tasks.store.archive import CompressedWriter, Manifest, manifest_name
from tasks.store.s3 import object_key

TOKEN = stack.GATEWAY_SECRET_ENV["GATEWAY_API_TOKEN"]
# The drill brings this project up (beside the live stack): it must be runnable.
HOST = ", ".join(f'"{m["Source"]}:{m["Target"]}:ro"' for m in images.host_mounts())
COMPOSE = f"""\
services:
  gateway:
    image: {stack.HOSTFS_IMAGE}
    network_mode: host
    command: [/usr/bin/python3, -u, /app/gateway.py]
    environment:
      MODE: ${{MODE}}
      GATEWAY_API_TOKEN: "{TOKEN}"
    env_file: .env
    volumes: [{HOST}, "{stack.GATEWAY_SCRIPT}:/app/gateway.py:ro"]
    depends_on: [redis]
  redis:
    image: {stack.HOSTFS_IMAGE}
    network_mode: host
    command: [/usr/bin/redis-server, /conf/redis.conf]
    volumes: [{HOST}, "./redis:/conf"]
"""
PROJECT = {
    "docker-compose.yml": COMPOSE,
    "redis/redis.conf": 'bind 127.0.0.1\nport 6379\nsave ""\n',
    "prometheus.yml": "scrape_configs: []\n",
    "alerts.yml": "groups: []\n",
    "grafana/dashboards/gateway.json": '{"title": "Gateway"}',
}


def drill_containers() -> list[str]:
    listed = docker.from_env().containers.list(all=True, filters={"label": DRILL_LABEL})
    return sorted(c.name for c in listed)


def drill_report() -> str:
    with get_client(sync_client=True) as client:
        found = [a for a in client.read_latest_artifacts() if a.key == "verify-restore"]
    return str(found[0].data) if found else ""


@pytest.fixture(scope="module")
def sandbox_backups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One backup of each kind from the sandbox (config: a project beside the sandbox
    gateway's environment), in a local folder and under a fresh S3 prefix."""
    for host, port, what in [
        (stack.REDIS_HOST, stack.REDIS_PORT, "Redis"),
        (stack.PROMETHEUS_HOST, stack.PROMETHEUS_PORT, "Prometheus"),
        (stack.GATEWAY_HOST, stack.GATEWAY_PORT, "the gateway"),
        (stack.S3_HOST, stack.S3_PORT, "SeaweedFS S3"),
    ]:
        require(host, port, what)
    root = tmp_path_factory.mktemp("drill")
    project = root / "project"
    for relative, text in PROJECT.items():
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        (project / relative).write_text(text)
    backups = root / "backups"
    prefix = f"test-drill-{os.getpid()}"
    s3 = {
        "backup_dir": str(backups),
        "s3_bucket": stack.S3_BUCKET,
        "s3_prefix": prefix,
        "s3_endpoint_url": stack.S3_ENDPOINT,
    }
    manifests = {
        "redis": backup_redis(redis_url=stack.REDIS_URL, **s3),
        "prometheus": backup_prometheus(prometheus_url=stack.PROMETHEUS_URL, **s3),
        "config": backup_config(
            project_dir=str(project), env_container=stack.GATEWAY_CONTAINER, **s3
        ),
        "logs": backup_logs(containers=stack.GATEWAY_CONTAINER, window="1h", **s3),
    }
    yield {"manifests": manifests, "s3": s3, "root": root}
    client = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    for item in client.list_objects_v2(Bucket=stack.S3_BUCKET, Prefix=prefix + "/").get(
        "Contents", []
    ):
        client.delete_object(Bucket=stack.S3_BUCKET, Key=item["Key"])


def drill(backups: dict[str, Any], tmp_path: Path, **parameters: Any) -> dict[str, Any]:
    return verify_restore(
        **({"scratch_dir": str(tmp_path / "scratch")} | backups["s3"] | parameters)
    )


def test_the_sandbox_backups_restore_and_every_check_passes(
    sandbox_backups: dict[str, Any],
    tmp_path: Path,
    pushgateway: str,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROXILION_DR_PUSHGATEWAY_URL", pushgateway)
    result = drill(sandbox_backups, tmp_path)

    assert result["ok"]
    components = result["components"]
    assert set(components) == {"redis", "redis-aof", "prometheus", "config", "logs"}
    # the sandbox's Redis runs appendonly no: no AOF shipped, that component says so
    [aof_step] = components.pop("redis-aof")["steps"]
    assert (aof_step["outcome"], aof_step["detail"]) == (
        "skipped",
        "no AOF shipped (backup-redis-aof does not run here): nothing to drill",
    )
    manifests = sandbox_backups["manifests"]
    for name, outcome in components.items():
        assert outcome["backup"]["name"] == manifests[name]["name"]
        assert outcome["rto_seconds"] > 0 and outcome["rpo_seconds"] >= 0
        assert all(s["outcome"] == "ok" for s in outcome["steps"]), outcome["steps"]
    checks = {n: {s["name"]: s["detail"] for s in o["steps"]} for n, o in components.items()}
    assert manifests["redis"]["source"]["sample"], "backup-redis records a keyed sample"
    assert "type and value digest match" in checks["redis"]["keyed sample"]
    assert "healthy after" in checks["redis"]["gateway /health against the restored Redis"]
    assert manifests["prometheus"]["source"]["recorded"]["values"]
    assert "match" in checks["prometheus"]["values recorded at backup time"]
    assert "GATEWAY_API_TOKEN" in checks["config"]["withheld secrets listed"]
    assert "GATEWAY_API_TOKEN" in checks["config"]["compose file validates"]
    assert checks["config"]["every service of the restored project up"] == "2 of 2 up"
    lines = manifests["logs"]["source"]["lines"]
    assert f"{lines} lines" in checks["logs"]["decompress fully and count lines"]

    assert drill_containers() == []  # torn down
    assert not any((tmp_path / "scratch").iterdir())
    report = drill_report()
    assert "verify-restore: OK" in report and manifests["redis"]["name"] in report
    assert TOKEN not in report
    # the summary row gives each backup's age as its own RPO row does (not 0.0 h vs 40 s)
    summary_ages = re.findall(r"^\| \w+ \| `[^`]+` \| ([^|]+) \|", report, re.M)
    rpo_rows = re.findall(r"^\| RPO \(age of the backup at start\) \| ([^|]+) \|", report, re.M)
    assert summary_ages == rpo_rows and len(rpo_rows) == 4, (summary_ages, rpo_rows)
    for component in components:
        assert pushed(pushgateway, "proxilion_dr_restore_last_status", component=component) == 1
        assert pushed(pushgateway, "proxilion_dr_restore_rto_seconds", component=component)
    assert pushed(pushgateway, "proxilion_dr_drill_last_status") == 1


def test_a_truncated_s3_object_fails_the_drill_naming_it(
    sandbox_backups: dict[str, Any], tmp_path: Path
) -> None:
    """The only copy is in S3, and it was cut short after its upload was verified."""
    manifest = sandbox_backups["manifests"]["logs"]
    s3 = sandbox_backups["s3"]
    key = object_key(s3["s3_prefix"], manifest["name"])
    client = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    whole = client.get_object(Bucket=stack.S3_BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=stack.S3_BUCKET, Key=key, Body=whole[: len(whole) // 2])
    empty = tmp_path / "empty-backups"
    empty.mkdir()
    try:
        with pytest.raises(DrillFailed) as failed:
            drill(sandbox_backups, tmp_path, components=["logs"], backup_dir=str(empty))
    finally:
        client.put_object(Bucket=stack.S3_BUCKET, Key=key, Body=whole)
    message = str(failed.value)
    assert "logs: step 'find and verify the backup' failed" in message
    assert key in message and "truncated or corrupt" in message
    assert drill_containers() == []


def test_a_backup_of_a_newer_rdb_version_says_so(
    sandbox_backups: dict[str, Any], tmp_path: Path
) -> None:
    """An RDB whose header says version 12 (Redis 7.4), drilled on Redis 7.0."""
    real = Path(sandbox_backups["s3"]["backup_dir"]) / sandbox_backups["manifests"]["redis"]["name"]
    backups = tmp_path / "backups"
    (backups / "redis").mkdir(parents=True)
    rdb = gzip.decompress(real.read_bytes())
    newer = b"REDIS0012" + rdb[9:]
    write_backup(backups, "redis", newer, sandbox_backups["manifests"]["redis"])
    with pytest.raises(DrillFailed) as failed:
        drill(
            sandbox_backups, tmp_path, components=["redis"], backup_dir=str(backups), s3_bucket=""
        )
    message = str(failed.value)
    assert "redis: step 'validate the RDB" in message
    assert "RDB version 12" in message and "redis_image of a newer Redis" in message
    assert drill_containers() == []


def write_backup(backups: Path, kind: str, raw: bytes, like: dict[str, Any]) -> None:
    """A complete backup of `raw` (gzip) with a manifest copied from `like`."""
    final = backups / like["name"]
    writer = CompressedWriter(final, "gzip")
    writer.write(raw)
    stored = writer.close()
    manifest = Manifest(**(like | {"size": stored.size, "sha256": stored.sha256}))
    manifest.raw_size = stored.raw_size
    write_durably(final.with_name(manifest_name(final.name)), manifest.to_json().encode())


def test_a_corrupt_rdb_that_redis_loads_is_refused_by_redis_check_rdb(
    sandbox_backups: dict[str, Any], tmp_path: Path
) -> None:
    """A hash's listpack damaged inside (one back-length byte; CRC-64 recomputed): Redis
    7.0 loads it (it checks payloads deeply only with sanitize-dump-payload yes),
    redis-check-rdb does not. The drill's Redis loads while redis-check-rdb runs: the
    rejection still fails the drill, naming the backup and the damaged key."""
    with running_redis(tmp_path / "source", rdbcompression="no") as server:
        for i in range(100):
            server.client().set(f"session:{i}", f"value-{i}")
        server.client().hset("damaged", mapping={"field": "value-abcdef"})
        backups = tmp_path / "backups"
        manifest = backup_redis(
            redis_url=server.url,
            container="",
            fetch="path",
            data_dir=str(server.dir),
            backup_dir=str(backups),
            s3_bucket="",
        )
    rdb = bytearray(gzip.decompress((backups / manifest["name"]).read_bytes()))
    at = rdb.index(b"value-abcdef") + len(b"value-abcdef")
    assert rdb[at] == 13, "the listpack entry's back-length: its encoding byte + 12"
    rdb[at] ^= 0x40
    body = bytes(rdb[:-8])
    damaged = body + crc64(body).to_bytes(8, "little")
    (tmp_path / "damaged.rdb").write_bytes(damaged)
    with start_from_rdb(tmp_path / "damaged.rdb", tmp_path / "loads") as loaded:
        assert loaded.client().dbsize() == 101, "redis-server loads the damaged RDB"
    write_backup(backups, "redis", damaged, manifest)

    with pytest.raises(DrillFailed) as failed:
        drill(
            sandbox_backups, tmp_path, components=["redis"], backup_dir=str(backups), s3_bucket=""
        )
    message = str(failed.value)
    assert f"redis-check-rdb rejected backup {manifest['name']}" in message
    assert "Reading key 'damaged'" in message, message
    assert drill_containers() == []


def test_the_drill_redis_that_does_not_start_fails_the_drill_and_leaves_nothing(
    sandbox_backups: dict[str, Any], tmp_path: Path
) -> None:
    """The 'live' Redis container's program does not exist in the drill's image."""
    client = docker.from_env()
    broken = client.containers.create(
        stack.HOSTFS_IMAGE,
        ["/usr/bin/redis-server-gone", "--port", "0"],
        name=f"proxilion-dr-test-broken-redis-{os.getpid()}",
        labels={stack.SANDBOX_LABEL: "test-throwaway"},
    )
    try:
        with pytest.raises(DrillFailed) as failed:
            drill(sandbox_backups, tmp_path, components=["redis"], redis_container=broken.name)
    finally:
        broken.remove(force=True)
    message = str(failed.value)
    assert "redis: step 'start drill-redis (empty)' failed" in message
    assert "drill-redis" in message
    assert drill_containers() == []


def test_leftovers_of_a_killed_drill_are_removed_by_the_next(
    sandbox_backups: dict[str, Any], tmp_path: Path
) -> None:
    """A drill killed halfway: its container still runs, its scratch folder remains."""
    folder = tmp_path / "scratch" / "drill-killed"
    folder.mkdir(parents=True)
    live = inspect_live(stack.REDIS_CONTAINER)
    entrypoint, command = program_argv(live, "redis-server", ["--port", "0", "--save", ""])
    start_scratch(Scratch(folder), "drill-redis", live, entrypoint, command, 0, [])
    assert drill_containers() == ["drill-redis"]

    result = drill(sandbox_backups, tmp_path, components=["redis", "logs"])
    assert result["ok"]
    assert any("drill-redis" in note for note in result["notes"])
    assert not folder.exists()
    assert drill_containers() == []


def test_a_second_drill_on_the_same_host_is_refused_and_leaves_the_first_alone(
    sandbox_backups: dict[str, Any], tmp_path: Path
) -> None:
    """Drill containers have fixed names on the Docker host: a second drill, even with
    another scratch_dir (so another Prefect lock), would remove the first one's. The
    running drill is stood in for by its host lock and a container of its own."""
    folder = tmp_path / "first" / "drill-running"
    folder.mkdir(parents=True)
    live = inspect_live(stack.REDIS_CONTAINER)
    entrypoint, command = program_argv(live, "redis-server", ["--port", "0", "--save", ""])
    with one_drill_per_host():
        start_scratch(Scratch(folder), "drill-redis", live, entrypoint, command, 0, [])
        try:
            busy_message = "another restore drill is running on this host"
            with pytest.raises(DrillBusy, match=busy_message) as busy:
                drill(sandbox_backups, tmp_path, components=["redis"])
            assert f"pid {os.getpid()} (" in str(busy.value)  # who holds it, from /proc/locks
            assert drill_containers() == ["drill-redis"]  # the first drill's, untouched
        finally:
            remove_container("drill-redis")
    assert drill(sandbox_backups, tmp_path, components=["logs"])["ok"]  # free again


def test_a_throwaway_servers_backup_with_a_changed_key_fails_the_sample(
    sandbox_backups: dict[str, Any], tmp_path: Path
) -> None:
    """A throwaway Redis backed up; its manifest's sample then claims another value for
    one key (as if the RDB held other data): the drill names the key."""
    with redis_container(tmp_path) as service:
        client = redis_py.Redis(port=service.port)
        for i in range(200):
            client.set(f"session:{i}", f"value-{i}")
        backups = tmp_path / "backups"
        manifest = backup_redis(
            redis_url=service.url,
            container=service.name,
            fetch="container",
            backup_dir=str(backups),
            s3_bucket="",
        )
    assert manifest["source"]["sample"]
    sidecar = backups / (manifest["name"] + ".manifest.json")
    data = json.loads(sidecar.read_text())
    data["source"]["sample"][0]["sha256"] = "0" * 64
    sidecar.write_text(json.dumps(data))
    with pytest.raises(DrillFailed) as failed:
        drill(
            sandbox_backups, tmp_path, components=["redis"], backup_dir=str(backups), s3_bucket=""
        )
    wrong = data["source"]["sample"][0]["key"]
    assert "redis: step 'keyed sample' failed" in str(failed.value)
    assert wrong in str(failed.value) and "different value" in str(failed.value)


def _recorded_value_differs(manifest: dict[str, Any]) -> None:
    manifest["source"]["recorded"]["values"][0]["value"] = "12345"


def _oldest_block_holds_nothing(manifest: dict[str, Any]) -> None:
    oldest = min(manifest["source"]["block_list"], key=lambda b: b["min_time"])
    oldest["min_time"], oldest["max_time"] = 946_684_800_000, 946_688_400_000  # 2000-01-01


def _one_line_more(manifest: dict[str, Any]) -> None:
    manifest["source"]["lines"] += 1


def _a_file_more(manifest: dict[str, Any]) -> None:
    manifest["source"]["files"].append("grafana/dashboards/lost.json")


@pytest.mark.parametrize(
    ("kind", "tamper", "check", "evidence"),
    [
        (
            "prometheus",
            _recorded_value_differs,
            "values recorded at backup time",
            "the backup recorded 12345",
        ),
        (
            "prometheus",
            _oldest_block_holds_nothing,
            "query the oldest restored block",
            "Prometheus answers no series at 946688400",
        ),
        ("logs", _one_line_more, "decompress fully and count lines", "lines decompressed, the"),
        ("config", _a_file_more, "expected files present", "lacks grafana/dashboards/lost.json"),
    ],
    ids=["prometheus-values", "prometheus-empty-block", "logs-lines", "config-file"],
)
def test_each_check_fails_when_the_restore_differs_from_the_manifest(
    sandbox_backups: dict[str, Any],
    tmp_path: Path,
    kind: str,
    tamper: Any,
    check: str,
    evidence: str,
) -> None:
    """The stored data is the real backup (its checksum verifies); its manifest then
    claims something the restore does not hold: the drill fails, naming the check."""
    like = sandbox_backups["manifests"][kind]
    source = Path(sandbox_backups["s3"]["backup_dir"])
    backups = tmp_path / "backups"
    (backups / kind).mkdir(parents=True)
    shutil.copyfile(source / like["name"], backups / like["name"])
    manifest = json.loads(json.dumps(like))
    tamper(manifest)
    write_durably(backups / manifest_name(like["name"]), json.dumps(manifest).encode())
    with pytest.raises(DrillFailed) as failed:
        drill(sandbox_backups, tmp_path, components=[kind], backup_dir=str(backups), s3_bucket="")
    assert f"{kind}: step '{check}' failed" in str(failed.value)
    assert evidence in str(failed.value)
    assert drill_containers() == []


def test_a_gateway_configured_by_redis_host_alone_is_drilled_against_drill_redis_only(
    tmp_path: Path,
) -> None:
    """The live gateway's environment names REDIS_HOST and nothing else: it takes its
    Redis port from its own default, the live Redis's port (here its start command holds
    that default: this test's live Redis cannot be on 6379, the sandbox's is). The
    drill's gateway must answer /health from drill-redis: the live Redis accepts not one
    connection while the drill runs."""
    with redis_container(tmp_path) as live:
        watcher = redis_py.Redis(port=live.port)  # one connection, kept: exact counts
        watcher.mset({f"session:{i}": i for i in range(50)})
        backups = tmp_path / "backups"
        backup_redis(redis_url=live.url, container=live.name, backup_dir=str(backups), s3_bucket="")
        default_port = f"REDIS_PORT=${{REDIS_PORT:-{live.port}}}"
        gateway = docker.from_env().containers.create(
            stack.HOSTFS_IMAGE,
            ["/bin/sh", "-c", f"{default_port} exec /usr/bin/python3 -u /app/gateway.py"],
            name=f"proxilion-dr-test-live-gateway-{os.getpid()}",
            environment={**stack.GATEWAY_SETTINGS, "REDIS_HOST": "127.0.0.1"},
            mounts=gateway_mounts(),
            network_mode="host",
            labels={stack.SANDBOX_LABEL: "test-throwaway"},
        )
        try:
            before = watcher.info("stats")["total_connections_received"]
            result = verify_restore(
                components=["redis"],
                redis_container=live.name,
                gateway_container=gateway.name,
                backup_dir=str(backups),
                s3_bucket="",
                scratch_dir=str(tmp_path / "scratch"),
                start_timeout_seconds=30,
            )
            reached = watcher.info("stats")["total_connections_received"] - before
        finally:
            gateway.remove(force=True)
    assert reached == 0, f"the drill's gateway connected to the live Redis {reached} times"
    [step] = [
        s
        for s in result["components"]["redis"]["steps"]
        if s["name"] == "gateway /health against the restored Redis"
    ]
    assert step["outcome"] == "ok" and "connection(s) from the gateway" in step["detail"]
