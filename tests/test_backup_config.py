"""backup-config end to end on the sandbox gateway's environment, on-change skipping,
symlinks, missing inputs, a full disk, and the redaction rules."""

from __future__ import annotations

import gzip
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import require
from mounts import mounted_tmpfs
from prefect.client.orchestration import get_client

from flows.backup_config import backup_config
from sandbox import constants as stack
from tasks.archive import extract_archive
from tasks.config import read_env, redact_file, redact_yaml, secret_name
from tasks.storage import list_local

TOKEN = stack.GATEWAY_SECRET_ENV["GATEWAY_API_TOKEN"]
ALLOWLIST = [*stack.GATEWAY_SETTINGS, "GATEWAY_API_TOKEN"]  # a secret allow-listed by mistake

COMPOSE = f"""\
# Proxilion gateway stack
services:
  gateway:
    image: proxilion/gateway:1.4  # pinned
    environment:
      MODE: monitor
      GATEWAY_API_TOKEN: "{TOKEN}"
      SESSION_STORE: redis://redis:6379/0
    env_file: .env
  worker:
    environment:
      - ALERT_THRESHOLD=50
      - DB_PASSWORD={TOKEN}-db
"""
FILES = {
    "docker-compose.prod.yml": "services:\n  gateway:\n    restart: always\n",
    "prometheus.yml": "scrape_configs:\n  - job_name: gateway\n    static_configs:\n"
    "      - targets: ['localhost:8787']\n",
    "alerts.yml": "groups:\n  - name: gateway\n    rules:\n      - alert: GatewayDown\n"
    "        expr: up{job='gateway'} == 0\n",
    "grafana/dashboards/gateway.json": json.dumps({"title": "Gateway", "panels": []}),
    "grafana/dashboards/team/redis.json": json.dumps({"title": "Redis", "uid": "r1"}),
}


def write_project(root: Path, compose: str = COMPOSE) -> Path:
    for relative, text in {"docker-compose.yml": compose, **FILES}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    (root / ".env").write_text(f"GATEWAY_API_TOKEN={TOKEN}\n")  # never collected
    return root


def members(path: Path) -> list[tarfile.TarInfo]:
    with gzip.open(path) as raw, tarfile.open(fileobj=raw, mode="r|") as archive:
        return list(archive)


def everything_prefect_holds() -> str:
    """Every log line and artifact of the test server's session, as text."""
    with get_client(sync_client=True) as client:
        logs = "\n".join(log.message for log in client.read_logs())
        artifacts = "\n".join(str(a.data) + str(a.description) for a in client.read_artifacts())
    return logs + artifacts


def artifact_rows(key: str) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        [artifact] = [a for a in client.read_latest_artifacts() if a.key == key]
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    return {row["field"]: row["value"] for row in data}


@pytest.fixture(scope="module")
def sandbox_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One backup of a full project plus the sandbox gateway's environment, uploaded."""
    require(stack.GATEWAY_HOST, stack.GATEWAY_PORT, f"the gateway ({stack.GATEWAY_CONTAINER})")
    require(stack.S3_HOST, stack.S3_PORT, "SeaweedFS S3")
    root = tmp_path_factory.mktemp("config")
    project, backups = write_project(root / "project"), root / "backups"
    prefix = f"test-config-{os.getpid()}-{int(time.time())}"
    manifest = backup_config(
        project_dir=str(project),
        env_allowlist=ALLOWLIST,
        env_container=stack.GATEWAY_CONTAINER,
        backup_dir=str(backups),
        s3_bucket=stack.S3_BUCKET,
        s3_prefix=prefix,
        s3_endpoint_url=stack.S3_ENDPOINT,
    )
    s3 = boto3.client("s3", endpoint_url=stack.S3_ENDPOINT)
    key = f"{prefix}/{manifest['name']}"
    remote = s3.get_object(Bucket=stack.S3_BUCKET, Key=key)["Body"].read()
    remote_manifest = s3.get_object(Bucket=stack.S3_BUCKET, Key=key + ".manifest.json")
    remote_manifest_text = remote_manifest["Body"].read().decode()
    for suffix in ("", ".manifest.json"):
        s3.delete_object(Bucket=stack.S3_BUCKET, Key=key + suffix)
    return {
        "manifest": manifest,
        "project": project,
        "backups": backups,
        "remote": remote,
        "remote_manifest": remote_manifest_text,
        "root": root,
    }


def test_archive_restores_byte_for_byte_with_relative_names(sandbox_config: dict) -> None:
    manifest, backups = sandbox_config["manifest"], sandbox_config["backups"]
    stored = backups / manifest["name"]
    assert manifest["name"].startswith("config/config_") and manifest["name"].endswith(".tar.gz")
    assert sandbox_config["remote"] == stored.read_bytes()
    folder = Path(manifest["name"]).name.removesuffix(".tar.gz")
    entries = members(stored)
    assert all(m.isfile() and m.name.startswith(folder + "/") for m in entries)
    assert all(not m.name.startswith("/") and ".." not in m.name.split("/") for m in entries)

    target = sandbox_config["root"] / "restored"
    names = extract_archive(stored, "gzip", target)
    assert sorted(names) == sorted(f"{folder}/{p}" for p in manifest["source"]["files"])
    restored = target / folder
    for relative, text in FILES.items():
        assert (restored / relative).read_bytes() == text.encode(), relative
    assert not (restored / ".env").exists()
    assert (restored / "env.txt").read_text() == "".join(
        f"{k}={v}\n" for k, v in sorted(stack.GATEWAY_SETTINGS.items())
    )
    assert manifest["source"]["missing"] == []
    assert manifest["source"]["env_source"] == f"container {stack.GATEWAY_CONTAINER}"


def test_secrets_are_withheld_everywhere(sandbox_config: dict) -> None:
    manifest, backups = sandbox_config["manifest"], sandbox_config["backups"]
    stored = backups / manifest["name"]
    assert TOKEN.encode() not in gzip.decompress(stored.read_bytes())
    assert TOKEN.encode() not in stored.read_bytes()
    assert TOKEN not in (backups / (manifest["name"] + ".manifest.json")).read_text()
    assert TOKEN not in sandbox_config["remote_manifest"]
    assert TOKEN not in everything_prefect_holds()
    source = manifest["source"]
    assert source["env_withheld"] == ["GATEWAY_API_TOKEN"]
    assert source["env"] == sorted(stack.GATEWAY_SETTINGS)
    assert source["redacted"] == {
        "docker-compose.yml": [
            "services.gateway.environment.GATEWAY_API_TOKEN",
            "services.worker.environment.DB_PASSWORD",
        ]
    }
    # The stored compose file keeps everything else, and refuses to start until
    # the secrets are supplied again.
    target = sandbox_config["root"] / "restored-compose"
    extract_archive(stored, "gzip", target)
    [compose] = target.glob("*/docker-compose.yml")
    expected = COMPOSE.replace(
        f'"{TOKEN}"', '"${GATEWAY_API_TOKEN:?secret withheld by backup-config}"'
    ).replace(f"{TOKEN}-db", "${DB_PASSWORD:?secret withheld by backup-config}")
    assert compose.read_text() == expected
    rows = artifact_rows("backup-config")
    assert rows["env withheld (secret)"] == "GATEWAY_API_TOKEN"


def test_unchanged_config_is_skipped_and_force_stores_anyway(tmp_path: Path) -> None:
    project, backups = write_project(tmp_path / "project"), tmp_path / "backups"
    common = dict(project_dir=str(project), env_container="", backup_dir=str(backups), s3_bucket="")
    first = backup_config(**common)
    # A changed secret is not a change: its value is never stored.
    write_project(project, COMPOSE.replace(TOKEN, "rotated-token-value"))
    second = backup_config(**common)
    assert second == {
        "skipped": True,
        "unchanged_since": first["name"],
        "digest": first["source"]["digest"],
    }
    assert artifact_rows("backup-config")["result"].startswith(f"unchanged since {first['name']}")
    assert [m.name for m in list_local(backups, "config")] == [first["name"]]

    time.sleep(1.1)  # backup names have one-second resolution
    forced = backup_config(force=True, **common)
    assert forced["name"] != first["name"]
    assert forced["source"]["digest"] == first["source"]["digest"]

    time.sleep(1.1)
    (project / "alerts.yml").write_text(FILES["alerts.yml"] + "# tuned\n")
    changed = backup_config(**common)
    assert "skipped" not in changed and changed["source"]["digest"] != first["source"]["digest"]
    assert len(list_local(backups, "config")) == 3


def test_missing_project_dir_is_named_with_its_setting(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-project"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist.*CONFIG_PROJECT_DIR"):
        backup_config(project_dir=str(missing), backup_dir=str(tmp_path / "b"), s3_bucket="")
    assert list_local(tmp_path / "b", "config") == []


def test_symlinks_outside_are_not_followed_and_missing_files_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    (outside / "dash").mkdir(parents=True)
    (outside / "prometheus.yml").write_text("OUTSIDE-SECRET-CONTENT\n")
    (outside / "dash" / "evil.json").write_text('{"OUTSIDE-SECRET-CONTENT": 1}')
    project = tmp_path / "project"
    (project / "grafana" / "dashboards").mkdir(parents=True)
    (project / "deploy").mkdir()
    (project / "deploy" / "compose-v2.yml").write_text("services: {}\n")
    (project / "docker-compose.yml").symlink_to("deploy/compose-v2.yml")  # inside: stored
    (project / "prometheus.yml").symlink_to(outside / "prometheus.yml")  # outside: skipped
    (project / "grafana" / "dashboards" / "shared").symlink_to(outside / "dash")
    (project / "grafana" / "dashboards" / "gone.json").symlink_to(tmp_path / "nothing")
    (project / "grafana" / "dashboards" / "main.json").write_text("{}")
    monkeypatch.setenv("MODE", "enforce")
    monkeypatch.setenv("SESSION_STORE", "redis://:pw-in-url@redis:6379/0")
    monkeypatch.delenv("SESSION_TTL_HOURS", raising=False)

    manifest = backup_config(
        project_dir=str(project),
        env_allowlist=["MODE", "SESSION_STORE", "SESSION_TTL_HOURS"],
        env_container="",
        backup_dir=str(tmp_path / "b"),
        s3_bucket="",
    )
    source = manifest["source"]
    stored = gzip.decompress((tmp_path / "b" / manifest["name"]).read_bytes())
    assert b"OUTSIDE-SECRET-CONTENT" not in stored and b"pw-in-url" not in stored
    assert source["files"] == ["docker-compose.yml", "grafana/dashboards/main.json", "env.txt"]
    assert set(source["skipped"]) == {
        "prometheus.yml",
        "grafana/dashboards/shared",
        "grafana/dashboards/gone.json",
    }
    assert "outside the project directory: not followed" in source["skipped"]["prometheus.yml"]
    assert source["skipped"]["grafana/dashboards/gone.json"].startswith("dangling symlink")
    assert source["missing"] == ["alerts.yml"]
    assert source["env_source"] == "process environment"
    assert (source["env"], source["env_withheld"], source["env_missing"]) == (
        ["MODE"],
        ["SESSION_STORE"],
        ["SESSION_TTL_HOURS"],
    )
    target = tmp_path / "restored"
    extract_archive(tmp_path / "b" / manifest["name"], "gzip", target)
    [compose] = target.glob("*/docker-compose.yml")
    assert not compose.is_symlink() and compose.read_text() == "services: {}\n"


def test_full_disk_fails_clearly_and_leaves_nothing(tmp_path: Path) -> None:
    project = write_project(tmp_path / "project")
    (project / "grafana" / "dashboards" / "big.json").write_text(
        json.dumps({"noise": os.urandom(200_000).hex()})
    )
    with mounted_tmpfs(tmp_path / "tiny", "size=64k") as tiny:
        with pytest.raises(OSError, match="no space left on the device of .*choose another"):
            backup_config(project_dir=str(project), env_container="", backup_dir=str(tiny))
        assert list_local(tiny, "config") == []
        assert [p for p in tiny.rglob("*") if p.is_file()] == []


def test_unknown_env_container_is_named_with_the_existing_ones(tmp_path: Path) -> None:
    project = write_project(tmp_path / "project")
    with pytest.raises(Exception, match="no container named 'gateway-nope'.*leave it empty"):
        backup_config(
            project_dir=str(project), env_container="gateway-nope", backup_dir=str(tmp_path / "b")
        )
    assert list_local(tmp_path / "b", "config") == []


def test_project_without_any_config_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of the config files"):
        backup_config(
            project_dir=str(tmp_path / "empty"), env_container="", backup_dir=str(tmp_path / "b")
        )


# ------------------------------------------------------------------ redaction rules


def test_secret_names() -> None:
    secret = ["GATEWAY_API_TOKEN", "apiKey", "DB_PASSWORD", "requirepass", "AWS_ACCESS_KEY_ID"]
    plain = [*stack.GATEWAY_SETTINGS, "keyspace", "image", "REDIS_HOST"]
    assert [n for n in secret + plain if secret_name(n)] == secret


def test_yaml_redaction_keeps_layout_and_references() -> None:
    text = (
        "scrape_configs:\n"
        "  - job_name: gw  # main\n"
        "    basic_auth:\n"
        "      username: admin\n"
        "      password: s3cret\n"
        "      password_file: /etc/prometheus/pw\n"
        "    bearer_token_file: /run/secrets/token\n"
        "    url: https://user:pw@example.org/x\n"
        "    private_key: |\n"
        "      -----BEGIN PRIVATE KEY-----\n"
        "      abc\n"
        "    token: ${TOKEN}\n"
        "    passthrough: true\n"
    )
    clean, found, how = redact_yaml(text, compose=False)
    assert how == "in place"
    assert clean == (
        "scrape_configs:\n"
        "  - job_name: gw  # main\n"
        "    basic_auth:\n"
        "      username: admin\n"
        '      password: "<redacted>"\n'
        "      password_file: /etc/prometheus/pw\n"
        "    bearer_token_file: /run/secrets/token\n"
        "    url: https://***@example.org/x\n"
        '    private_key: "<redacted>"\n'
        "    token: ${TOKEN}\n"
        "    passthrough: true\n"
    )
    assert found == [
        "1 URL credential(s)",
        "scrape_configs[0].basic_auth.password",
        "scrape_configs[0].private_key",
    ]


def test_yaml_secrets_lines_cannot_reach_are_rewritten_not_kept() -> None:
    clean, found, how = redact_yaml("a: {token: abc, n: 1}  # flow style\n", compose=True)
    assert "abc" not in clean and found == ["a.token"] and how.startswith("rewritten")
    clean, found, how = redact_yaml("a: [unclosed\ntoken: abc\n", compose=False)
    assert "abc" not in clean and how.startswith("line by line")


def test_env_from_process_withholds_secret_names_and_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODE", "monitor")
    monkeypatch.setenv("UPSTREAM_URL", "https://svc:topsecret@upstream/api")
    monkeypatch.setenv("SIGNING_KEY", "k")
    captured = read_env.fn(["MODE", "UPSTREAM_URL", "SIGNING_KEY", "UNSET_ONE"], None)
    assert captured.values == {"MODE": "monitor"}
    assert captured.withheld == ["UPSTREAM_URL", "SIGNING_KEY"]
    assert captured.missing == ["UNSET_ONE"]
    assert captured.text() == "MODE=monitor\n"


def test_sandbox_project_is_backed_up_with_its_rule_files_and_redis_conf(tmp_path: Path) -> None:
    """The sandbox is a compose project: its real files are what backup-config keeps,
    the rule files prometheus.yml lists and redis.conf included, its .env never."""
    require(stack.GATEWAY_HOST, stack.GATEWAY_PORT, f"the gateway ({stack.GATEWAY_CONTAINER})")
    manifest = backup_config(
        project_dir=str(stack.PROJECT_DIR),
        env_container=stack.GATEWAY_CONTAINER,
        backup_dir=str(tmp_path),
        s3_bucket="",
    )
    source = manifest["source"]
    assert source["missing"] == []
    assert set(source["files"]) == {
        "docker-compose.yml",
        "prometheus.yml",
        "alerts.yml",
        *stack.PROMETHEUS_RULE_FILES,
        "grafana/dashboards/proxilion-dr-dashboard.json",
        "grafana/dashboards/proxilion-gateway.json",
        "redis/redis.conf",
        "env.txt",
    }
    assert sorted(source["env"]) == sorted(stack.GATEWAY_SETTINGS)
    stored = gzip.decompress((tmp_path / manifest["name"]).read_bytes())
    assert TOKEN.encode() not in stored
    assert b"GATEWAY_API_TOKEN: ${GATEWAY_API_TOKEN}" in stored


def test_redis_conf_secrets_are_redacted() -> None:
    conf = (
        "# requirepass is commented out here\n"
        "port 6379\n"
        "requirepass s3cr3t-pass\n"
        "masterauth   primary-pass\n"
        "tls-key-file /etc/redis/key.pem\n"
        "user backup on >backup-pass #4a1e0c0f ~* +@read\n"
        "dir /data\n"
    )
    clean, found, _how = redact_file("redis/redis.conf", conf.encode())
    text = clean.decode()
    for secret in ("s3cr3t-pass", "primary-pass", "backup-pass", "4a1e0c0f"):
        assert secret not in text
    assert "requirepass <redacted>\n" in text
    assert "user backup on ><redacted> #<redacted> ~* +@read\n" in text
    for kept in ("# requirepass is commented out here\n", "tls-key-file /etc/redis/key.pem\n"):
        assert kept in text
    assert found == ["requirepass", "masterauth", "user backup"]
