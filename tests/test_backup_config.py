"""backup-config end to end on the sandbox gateway's environment, on-change skipping,
symlinks, missing inputs, a full disk, and the redaction rules."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from conftest import require
from mounts import mounted_tmpfs
from prefect.client.orchestration import get_client
from prefect_records import module_text
from waiting import past_the_second_of

from flows.backup_config import backup_config
from sandbox import constants as stack
from tasks.common.secrets import secret_name
from tasks.config.capture import read_env
from tasks.config.redact import redact_file, redact_yaml
from tasks.docker.containers import ContainerError
from tasks.store.archive import extract_archive, verify_file
from tasks.store.local import list_local

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
    return module_text()


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


def test_backups_one_after_another_in_the_same_second_all_succeed(tmp_path: Path) -> None:
    """A run takes well under a second: the next run's name for this second is taken,
    so it takes the next second's instead of failing on "already exists"."""
    project, backups = write_project(tmp_path / "project"), tmp_path / "backups"
    common = dict(project_dir=str(project), env_container="", backup_dir=str(backups), s3_bucket="")
    names = [backup_config(force=True, **common)["name"] for _ in range(3)]
    assert len(set(names)) == 3 and names == sorted(names), names
    assert [m.name for m in list_local(backups, "config")] == names


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

    past_the_second_of(first["name"])
    forced = backup_config(force=True, **common)
    assert forced["name"] != first["name"]
    assert forced["source"]["digest"] == first["source"]["digest"]

    past_the_second_of(forced["name"])
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
            backup_config(
                project_dir=str(project), env_container="", backup_dir=str(tiny), s3_bucket=""
            )
        assert list_local(tiny, "config") == []
        assert [p for p in tiny.rglob("*") if p.is_file()] == []


def test_unknown_env_container_is_named_with_the_existing_ones(tmp_path: Path) -> None:
    project = write_project(tmp_path / "project")
    with pytest.raises(ContainerError, match="no container named 'gateway-nope'.*leave it empty"):
        backup_config(
            project_dir=str(project),
            env_container="gateway-nope",
            backup_dir=str(tmp_path / "b"),
            s3_bucket="",
        )
    assert list_local(tmp_path / "b", "config") == []


def test_project_without_any_config_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds none of the config files"):
        backup_config(
            project_dir=str(tmp_path / "empty"),
            env_container="",
            backup_dir=str(tmp_path / "b"),
            s3_bucket="",
        )


# ------------------------------------------------------------------ redaction rules


def test_secret_names() -> None:
    secret = ["GATEWAY_API_TOKEN", "apiKey", "DB_PASSWORD", "requirepass", "AWS_ACCESS_KEY_ID"]
    secret += ["REDIS_AUTH", "masterauth", "REDISCLI_AUTH", "basicAuthPassword"]
    plain = [*stack.GATEWAY_SETTINGS, "keyspace", "image", "REDIS_HOST", "AUTH_MODE", "author"]
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


@pytest.mark.parametrize(
    "text",
    [
        "x-pw: &pw anchored-pw-1\nservices:\n  r:\n    environment:\n      REDIS_PASSWORD: *pw\n",
        "services: {r: {command: redis-server --requirepass anchored-pw-1}}\n",
        'services:\n  r:\n    test: ["CMD", "redis-cli", "-a", "anchored-pw-1 x", "ping"]\n',
        "services:\n  r:\n    command: >\n      redis-server --requirepass\n      anchored-pw-1\n",
        "datasources:\n  - secureJsonData: {httpHeaderValue1: anchored-pw-1}\n",
    ],
    ids=["anchor copy", "flow mapping", "space in list item", "folded over lines", "flow secure"],
)
def test_secrets_lines_cannot_reach_are_rewritten_not_kept(text: str) -> None:
    clean, found, how = redact_yaml(text, compose=True)
    assert "anchored-pw-1" not in clean and found and how.startswith("rewritten")


def test_names_that_only_mention_secrets_are_not_redacted() -> None:
    """A service's `secrets:` list names compose secrets (restoring `<redacted>` there
    would break the stack); `monkey`, `turnkey`, `basicAuth: true` hold no secret."""
    text = (
        "services:\n"
        "  turnkey:\n"
        "    image: monkey:latest\n"
        "    secrets:\n"
        "      - db_password\n"
        "    ports: [8080]\n"
        "    labels:\n"
        "      basicAuth: true\n"
        "      auth_mode: token\n"
        "secrets:\n"
        "  db_password:\n"
        "    file: ./db_password.txt\n"
    )
    assert redact_yaml(text, compose=True) == (text, [], "in place")


def test_env_from_process_withholds_secret_names_and_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODE", "monitor")
    monkeypatch.setenv("UPSTREAM_URL", "https://svc:topsecret@upstream/api")
    monkeypatch.setenv("SIGNING_KEY", "k")
    monkeypatch.setenv("REDIS_AUTH", "84736251")
    monkeypatch.setenv("REDIS_ARGS", "--requirepass env-arg-pw")
    names = ["MODE", "UPSTREAM_URL", "SIGNING_KEY", "REDIS_AUTH", "REDIS_ARGS", "UNSET_ONE"]
    captured = read_env.fn(names, None)
    assert captured.values == {"MODE": "monitor"}
    assert captured.withheld == ["UPSTREAM_URL", "SIGNING_KEY", "REDIS_AUTH", "REDIS_ARGS"]
    assert captured.missing == ["UNSET_ONE"]
    assert captured.text() == "MODE=monitor\n"


# --------------------------------------- secrets in numbers, comments, commands, Grafana

WITHHELD = "secret withheld by backup-config"
SECRET_COMPOSE = """\
# Proxilion gateway stack
# GATEWAY_API_TOKEN: sk-live-4f9a8b7c6d5e
services:
  gateway:
    image: proxilion/gateway:1.4  # pinned
    environment:
      MODE: monitor
      ALERT_THRESHOLD: 50
      REDIS_PASSWORD: 84736251
      API_KEY: 0x5f3759df
      REDIS_AUTH: auth-9f8e7d6c
      SESSION_STORE: redis://redis:6379/0
      # - OLD_DB_PASSWORD=commented-list-1122
  redis:
    image: redis:7
    command: redis-server --requirepass rp-string-4711 --appendonly yes
    environment:
      - REDISCLI_AUTH=cli-env-0815
    healthcheck:
      test: ["CMD", "redis-cli", "-a", "hc-flow-1234", "ping"]
    ports:
      - "127.0.0.1:6379:6379"
  replica:
    image: redis:7
    command: ["redis-server", "--replicaof", "redis", "6379", "--masterauth", "ma-list-5678", \
"--requirepass=rp-eq-1357"]
    healthcheck:
      test:
        - CMD
        - redis-cli
        - --pass
        - hc-block-9012
        - ping
  sentinel:
    image: redis:7
    command: sh -c 'printf "port 26379\\nrequirepass conf-line-3456\\n" > /tmp/s.conf && \
redis-server /tmp/s.conf'
    healthcheck:
      test: ["CMD-SHELL", "redis-cli -a shell-hc-2468 ping | grep PONG"]
x-redis-settings:
  requirepass: 31415926
  masterauth: ma-key-2718
  port: 6379
"""
# What is stored: every secret replaced in place, every other byte as written.
SECRET_COMPOSE_STORED = (
    SECRET_COMPOSE.replace("sk-live-4f9a8b7c6d5e", f"${{GATEWAY_API_TOKEN:?{WITHHELD}}}")
    .replace("84736251", f'"${{REDIS_PASSWORD:?{WITHHELD}}}"')
    .replace("0x5f3759df", f'"${{API_KEY:?{WITHHELD}}}"')
    .replace("auth-9f8e7d6c", f'"${{REDIS_AUTH:?{WITHHELD}}}"')
    .replace("commented-list-1122", f"${{OLD_DB_PASSWORD:?{WITHHELD}}}")
    .replace("rp-string-4711", f"${{REQUIREPASS:?{WITHHELD}}}")
    .replace("cli-env-0815", f"${{REDISCLI_AUTH:?{WITHHELD}}}")
    .replace("hc-flow-1234", f"${{REDISCLI_AUTH:?{WITHHELD}}}")
    .replace("ma-list-5678", f"${{MASTERAUTH:?{WITHHELD}}}")
    .replace("rp-eq-1357", f"${{REQUIREPASS:?{WITHHELD}}}")
    .replace("- hc-block-9012", f'- "${{REDISCLI_AUTH:?{WITHHELD}}}"')
    .replace("conf-line-3456", f"${{REQUIREPASS:?{WITHHELD}}}")
    .replace("shell-hc-2468", f"${{REDISCLI_AUTH:?{WITHHELD}}}")
    .replace("31415926", f'"${{requirepass:?{WITHHELD}}}"')
    .replace("ma-key-2718", f'"${{masterauth:?{WITHHELD}}}"')
)
SECRET_PROMETHEUS = """\
scrape_configs:
  - job_name: gateway
    basic_auth:
      username: prometheus
      password: 20240917
    static_configs:
      - targets: ['localhost:8787']
"""
SECRET_DASHBOARD = json.dumps(
    {
        "title": "Gateway",
        "panels": [{"type": "timeseries", "targets": [{"expr": "up"}]}],
        "datasource": {
            "type": "prometheus",
            "url": "http://prometheus:9090",
            "basicAuth": True,
            "basicAuthUser": "grafana",
            "basicAuthPassword": "dash-pw-8642",
            "port": 6379,
        },
    },
    indent=2,
)
SECRET_DATASOURCES = """\
apiVersion: 1
datasources:
  - name: Prometheus
    type: prometheus
    url: http://prometheus:9090
    basicAuth: true
    basicAuthUser: grafana
    jsonData:
      httpHeaderName1: X-Scope
    secureJsonData:
      basicAuthPassword: ds-pw-7531
      httpHeaderValue1: ds-header-9753
    editable: false
"""
DATASOURCES = "grafana/dashboards/provisioning/datasources.yml"
DC = "docker-compose.yml"
SECRET_FILES = {
    "docker-compose.yml": SECRET_COMPOSE,
    "prometheus.yml": SECRET_PROMETHEUS,
    "alerts.yml": FILES["alerts.yml"],
    "grafana/dashboards/gateway.json": SECRET_DASHBOARD,
    DATASOURCES: SECRET_DATASOURCES,
}
STORED_FILES = {
    "docker-compose.yml": SECRET_COMPOSE_STORED,
    "prometheus.yml": SECRET_PROMETHEUS.replace("20240917", '"<redacted>"'),
    "alerts.yml": FILES["alerts.yml"],
    "grafana/dashboards/gateway.json": SECRET_DASHBOARD.replace('"dash-pw-8642"', '"<redacted>"'),
    DATASOURCES: SECRET_DATASOURCES.replace("ds-pw-7531", '"<redacted>"').replace(
        "ds-header-9753", '"<redacted>"'
    ),
}
# (case from issue 6 item 5, file, what the report names, the secret as written).
SECRET_CASES = [
    ("numeric", DC, "services.gateway.environment.REDIS_PASSWORD", "84736251"),
    ("hex number", DC, "services.gateway.environment.API_KEY", "5f3759df"),
    ("basic_auth number", "prometheus.yml", "scrape_configs[0].basic_auth.password", "20240917"),
    ("commented key", DC, "GATEWAY_API_TOKEN (comment, line 2)", "sk-live-4f9a8b7c6d5e"),
    ("commented list", DC, "OLD_DB_PASSWORD (comment, line 13)", "commented-list-1122"),
    ("REDIS_AUTH", DC, "services.gateway.environment.REDIS_AUTH", "auth-9f8e7d6c"),
    ("requirepass key", DC, "x-redis-settings.requirepass", "31415926"),
    ("masterauth key", DC, "x-redis-settings.masterauth", "ma-key-2718"),
    ("command string", DC, "services.redis.command (--requirepass)", "rp-string-4711"),
    ("command list", DC, "services.replica.command (--masterauth)", "ma-list-5678"),
    ("command --flag=", DC, "services.replica.command[6] (--requirepass)", "rp-eq-1357"),
    ("redis.conf line", DC, "services.sentinel.command (requirepass)", "conf-line-3456"),
    ("healthcheck -a", DC, "services.redis.healthcheck.test (-a)", "hc-flow-1234"),
    ("healthcheck --pass", DC, "services.replica.healthcheck.test (--pass)", "hc-block-9012"),
    ("CMD-SHELL", DC, "services.sentinel.healthcheck.test[1] (-a)", "shell-hc-2468"),
    ("REDISCLI_AUTH", DC, "services.redis.environment.REDISCLI_AUTH", "cli-env-0815"),
    (
        "dashboard",
        "grafana/dashboards/gateway.json",
        "datasource.basicAuthPassword",
        "dash-pw-8642",
    ),
    (
        "secureJsonData",
        DATASOURCES,
        "datasources[0].secureJsonData.basicAuthPassword",
        "ds-pw-7531",
    ),
    (
        "secureJsonData any",
        DATASOURCES,
        "datasources[0].secureJsonData.httpHeaderValue1",
        "ds-header-9753",
    ),
]


@pytest.fixture(scope="module")
def secret_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real backup-config run over a project holding every secret of SECRET_CASES."""
    root = tmp_path_factory.mktemp("secrets")
    for relative, text in SECRET_FILES.items():
        (root / "project" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "project" / relative).write_text(text)
    backups = root / "backups"
    manifest = backup_config(
        project_dir=str(root / "project"),
        env_allowlist=["MODE"],
        env_container="",
        backup_dir=str(backups),
        s3_bucket="",
    )
    stored = backups / manifest["name"]
    restored = root / "restored"
    extract_archive(stored, "gzip", restored)
    [folder] = restored.iterdir()
    extracted = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    return {
        "manifest": manifest,
        "folder": folder,
        "extracted": extracted,
        "every byte": b"\n".join(
            [stored.read_bytes(), gzip.decompress(stored.read_bytes()), *extracted.values()]
        ),
        "manifest text": (backups / (manifest["name"] + ".manifest.json")).read_text(),
        "report": json.dumps(artifact_rows("backup-config")),
    }


@pytest.mark.parametrize(
    ("relative", "label", "secret"),
    [case[1:] for case in SECRET_CASES],
    ids=[case[0] for case in SECRET_CASES],
)
def test_secret_is_stored_nowhere_and_named_in_the_report(
    secret_config: dict, relative: str, label: str, secret: str
) -> None:
    assert secret.encode() not in secret_config["every byte"]
    assert secret not in secret_config["manifest text"]
    assert secret not in json.dumps(secret_config["manifest"])
    assert secret not in everything_prefect_holds()  # logs and report artifacts
    assert label in secret_config["manifest"]["source"]["redacted"][relative]
    assert label in secret_config["report"]


def test_everything_but_the_secrets_is_stored_as_written(secret_config: dict) -> None:
    """No over-redaction: `MODE: monitor`, `ALERT_THRESHOLD: 50`, `port: 6379`, the
    other command arguments and comments stay byte for byte, the secrets in place."""
    extracted = secret_config["extracted"]
    assert set(extracted) == {*SECRET_FILES, "env.txt"}
    for relative, text in STORED_FILES.items():
        assert extracted[relative].decode() == text, relative
    redacted = secret_config["manifest"]["source"]["redacted"]
    assert sorted(redacted) == sorted(set(SECRET_FILES) - {"alerts.yml"})
    assert sum(len(labels) for labels in redacted.values()) == len(SECRET_CASES)


def test_restored_compose_refuses_to_start_until_the_secrets_are_supplied(
    secret_config: dict,
) -> None:
    """docker-compose itself: the withheld values stop it with a message naming the
    variable; supplied again, they land where the secrets were."""
    compose = ["docker-compose", "-f", str(secret_config["folder"] / "docker-compose.yml")]
    bare = {"PATH": os.environ["PATH"]}
    refused = subprocess.run([*compose, "config"], env=bare, capture_output=True, text=True)
    assert refused.returncode != 0 and WITHHELD in refused.stderr
    names = ["REDIS_PASSWORD", "API_KEY", "REDIS_AUTH", "REQUIREPASS", "REDISCLI_AUTH"]
    names += ["MASTERAUTH", "requirepass", "masterauth"]
    supplied = {name: f"supplied-{name.lower()}" for name in names}
    started = subprocess.run(
        [*compose, "config"], env=bare | supplied, capture_output=True, text=True, check=True
    )
    assert "--requirepass supplied-requirepass --appendonly yes" in started.stdout
    assert "REDIS_PASSWORD: supplied-redis_password" in started.stdout
    assert WITHHELD not in started.stdout


# -------------------------------------------- on-change run against a damaged newest


def _truncate(data: Path, sidecar: Path) -> None:
    data.write_bytes(data.read_bytes()[:-16])


def _change_a_byte(data: Path, sidecar: Path) -> None:
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))


def _wrong_checksum(data: Path, sidecar: Path) -> None:
    manifest = json.loads(sidecar.read_text())
    manifest["sha256"] = "0" * 64
    sidecar.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [_truncate, _change_a_byte, _wrong_checksum])
def test_on_change_run_stores_a_new_backup_when_the_newest_is_damaged(
    tmp_path: Path, damage: Any
) -> None:
    project, backups = write_project(tmp_path / "project"), tmp_path / "backups"
    common = dict(project_dir=str(project), env_container="", backup_dir=str(backups), s3_bucket="")
    first = backup_config(**common)
    damage(backups / first["name"], backups / (first["name"] + ".manifest.json"))

    past_the_second_of(first["name"])
    second = backup_config(**common)  # the same content, on change (force=False)
    assert "skipped" not in second and second["name"] != first["name"]
    assert second["source"]["digest"] == first["source"]["digest"]
    verify_file(backups / second["name"], second["size"], second["sha256"])
    damaged = artifact_rows("backup-config")["previous backup damaged"]
    assert damaged.startswith(f"{first['name']}: backup {Path(first['name']).name}")
    assert f"Newest config backup is damaged, storing a new one: {damaged}" in (
        everything_prefect_holds()
    )
    # The new, intact backup is the one later on-change runs compare against.
    third = backup_config(**common)
    assert third["unchanged_since"] == second["name"]


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
