"""The sandbox's compose project: the files of a production deployment folder.

    <state>/project/
        docker-compose.yml         services gateway, redis, prometheus, pushgateway
        .env                       the gateway's settings and its API token (a secret), 0600
        prometheus.yml             scrape jobs; rule_files alerts.yml, proxilion-dr-alerts.yml
        alerts.yml                 the gateway's own alert rules
        proxilion-dr-alerts.yml    Proxilion DR's backup alerts (monitoring/)
        grafana/dashboards/        the backup-health dashboard (monitoring/) and a gateway one
        redis/redis.conf           Redis's config (its folder is writable: CONFIG REWRITE)
        data/redis, data/prometheus   the data, bind-mounted by RELATIVE paths

Every path the compose file mounts from the project is relative, so a project restored
into another folder finds its data next to it. What is not relative: the host's /usr,
/etc… (the hostfs image borrows the host's programs, see sandbox.images) and the
stand-in gateway's script (it plays the gateway image's content).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from sandbox import images
from sandbox.constants import (
    COMPOSE_ENV_FILE,
    GATEWAY_CONTAINER,
    GATEWAY_CONTAINER_SCRIPT,
    GATEWAY_HOST,
    GATEWAY_PORT,
    GATEWAY_SCRIPT,
    GATEWAY_SECRET_ENV,
    GATEWAY_SETTINGS,
    HOSTFS_IMAGE,
    MONITORING_DIR,
    PROJECT_DIR,
    PROMETHEUS_CONTAINER,
    PROMETHEUS_CONTAINER_CONF_DIR,
    PROMETHEUS_CONTAINER_CONF_FILE,
    PROMETHEUS_CONTAINER_DATA_DIR,
    PROMETHEUS_HOST,
    PROMETHEUS_HOST_DATA_DIR,
    PROMETHEUS_MIN_BLOCK_DURATION,
    PROMETHEUS_PORT,
    PROMETHEUS_RETENTION,
    PROMETHEUS_RULE_FILES,
    PROMETHEUS_SCRAPE_SECONDS,
    PUSHGATEWAY_CONTAINER,
    PUSHGATEWAY_HOST,
    PUSHGATEWAY_PORT,
    REDIS_CONTAINER,
    REDIS_CONTAINER_CONF_DIR,
    REDIS_CONTAINER_CONF_FILE,
    REDIS_CONTAINER_DATA_DIR,
    REDIS_DBFILENAME,
    REDIS_HOST,
    REDIS_HOST_CONF_DIR,
    REDIS_HOST_DATA_DIR,
    REDIS_PORT,
    REDIS_SAVE_POINTS,
    SANDBOX_LABEL,
    STATE_DIR,
)

STATE_LABEL = "proxilion-dr.state-dir"
# A digest of the host-side files a service reads (config, script): when they change,
# the service's compose config changes too, and `docker-compose up` recreates it.
FILES_LABEL = "proxilion-dr.files-digest"
STOP_GRACE = "30s"  # Redis saves on SIGTERM


def relative(path: Path) -> str:
    """`path` as the compose file names it: relative to the project (`./data/redis`)."""
    return "./" + path.relative_to(PROJECT_DIR).as_posix()


def write_file(path: Path, wanted: str, mode: int | None = None) -> bool:
    """Put `wanted` in `path` (in place, keeping the inode a container may have mounted);
    True when an existing, different file was replaced (e.g. after a CONFIG REWRITE),
    so the service reading it must be recreated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        current: str | None = path.read_text()
    except FileNotFoundError:
        current = None
    if current != wanted:
        path.write_text(wanted)
    if mode is not None:
        path.chmod(mode)
    return current is not None and current != wanted


def redis_conf() -> str:
    """The sandbox's redis.conf (persistence on, RDB only, loopback only)."""
    return "\n".join(
        [
            "# proxilion-dr sandbox Redis (written by sandbox/project.py on `up`)",
            f"bind {REDIS_HOST} -::1",
            "protected-mode yes",
            f"port {REDIS_PORT}",
            "daemonize no",
            'logfile ""',
            "loglevel notice",
            "databases 16",
            f"save {REDIS_SAVE_POINTS}",
            "stop-writes-on-bgsave-error yes",
            "rdbcompression yes",
            "rdbchecksum yes",
            f"dbfilename {REDIS_DBFILENAME}",
            f"dir {REDIS_CONTAINER_DATA_DIR}",
            "appendonly no",
            'appendfilename "appendonly.aof"',
            'appenddirname "appendonlydir"',
            "appendfsync everysec",
            "",
        ]
    )


def prometheus_config() -> str:
    """prometheus.yml: scrape the gateway, Prometheus itself and the Pushgateway."""
    every = f"{PROMETHEUS_SCRAPE_SECONDS}s"
    return "\n".join(
        [
            "# proxilion-dr sandbox Prometheus (written by sandbox/project.py on `up`)",
            "global:",
            f"  scrape_interval: {every}",
            f"  evaluation_interval: {every}",
            "rule_files:",
            *(f"  - {name}" for name in PROMETHEUS_RULE_FILES),
            "scrape_configs:",
            "  - job_name: proxilion-gateway",
            f"    static_configs: [{{targets: ['{GATEWAY_HOST}:{GATEWAY_PORT}']}}]",
            "  - job_name: prometheus",
            f"    static_configs: [{{targets: ['{PROMETHEUS_HOST}:{PROMETHEUS_PORT}']}}]",
            "  - job_name: pushgateway",
            "    honor_labels: true",
            f"    static_configs: [{{targets: ['{PUSHGATEWAY_HOST}:{PUSHGATEWAY_PORT}']}}]",
            "",
        ]
    )


def gateway_alerts() -> str:
    """alerts.yml: the gateway's own rules (the runbook's alerting check reads them)."""
    return "\n".join(
        [
            "# proxilion-dr sandbox gateway alerts (written by sandbox/project.py on `up`)",
            "groups:",
            "  - name: proxilion-gateway",
            "    rules:",
            "      - alert: ProxilionGatewayDown",
            '        expr: up{job="proxilion-gateway"} == 0',
            "        for: 1m",
            "        labels: {severity: critical}",
            "        annotations:",
            "          summary: The gateway does not answer Prometheus's scrape",
            "      - alert: ProxilionGatewayBlocking",
            '        expr: increase(proxilion_http_requests_total{code="403"}[5m]) > 10',
            "        for: 5m",
            "        labels: {severity: warning}",
            "        annotations:",
            "          summary: The gateway blocked more than 10 calls in 5 minutes",
            "",
        ]
    )


def gateway_dashboard() -> str:
    """A small Grafana dashboard of the gateway's own metrics."""
    panels = [
        ("Requests per second", "sum by (code) (rate(proxilion_http_requests_total[5m]))"),
        (
            "Analysis latency p95",
            "histogram_quantile(0.95, sum by (le) "
            "(rate(proxilion_analysis_duration_seconds_bucket[5m])))",
        ),
        ("Gateway up", 'up{job="proxilion-gateway"}'),
    ]
    dashboard = {
        "uid": "proxilion-gateway",
        "title": "Proxilion gateway",
        "tags": ["proxilion"],
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "panels": [
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "gridPos": {"x": 0, "y": 8 * i, "w": 24, "h": 8},
                "targets": [{"expr": expr, "refId": "A"}],
            }
            for i, (title, expr) in enumerate(panels)
        ],
    }
    return json.dumps(dashboard, indent=2) + "\n"


def env_file() -> str:
    """.env: what docker-compose fills `${NAME}` in the compose file with."""
    lines = ["# proxilion-dr sandbox: the gateway's settings and secrets (docker-compose reads it)"]
    lines += [f"{k}={v}" for k, v in {**GATEWAY_SETTINGS, **GATEWAY_SECRET_ENV}.items()]
    return "\n".join(lines) + "\n"


def _host_volumes() -> list[str]:
    return [f"{m['Source']}:{m['Target']}:ro" for m in images.host_mounts()]


def _labels(service: str, files: str) -> dict[str, str]:
    return {SANDBOX_LABEL: service, STATE_LABEL: str(STATE_DIR), FILES_LABEL: files}


def compose_services(files: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The compose file's services; `files` maps a service to its files' digest."""
    host = _host_volumes()
    common = {"image": HOSTFS_IMAGE, "network_mode": "host", "restart": "no"}
    gateway_env = {name: f"${{{name}}}" for name in [*GATEWAY_SETTINGS, *GATEWAY_SECRET_ENV]}
    gateway_env |= {
        "REDIS_HOST": REDIS_HOST,
        "REDIS_PORT": str(REDIS_PORT),
        "GATEWAY_HOST": GATEWAY_HOST,
        "GATEWAY_PORT": str(GATEWAY_PORT),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    conf = PROMETHEUS_CONTAINER_CONF_DIR
    return {
        "gateway": {
            **common,
            "container_name": GATEWAY_CONTAINER,
            "command": ["/usr/bin/python3", "-u", GATEWAY_CONTAINER_SCRIPT],
            "environment": gateway_env,
            "volumes": [*host, f"{GATEWAY_SCRIPT}:{GATEWAY_CONTAINER_SCRIPT}:ro"],
            "depends_on": ["redis"],
            "labels": _labels("gateway", files.get("gateway", "")),
        },
        "redis": {
            **common,
            "container_name": REDIS_CONTAINER,
            "command": ["/usr/bin/redis-server", REDIS_CONTAINER_CONF_FILE],
            "volumes": [
                *host,
                f"{relative(REDIS_HOST_DATA_DIR)}:{REDIS_CONTAINER_DATA_DIR}",
                f"{relative(REDIS_HOST_CONF_DIR)}:{REDIS_CONTAINER_CONF_DIR}",
            ],
            "stop_grace_period": STOP_GRACE,
            "labels": _labels("redis", files.get("redis", "")),
        },
        "prometheus": {
            **common,
            "container_name": PROMETHEUS_CONTAINER,
            "command": [
                "/usr/bin/prometheus",
                f"--config.file={PROMETHEUS_CONTAINER_CONF_FILE}",
                f"--web.listen-address={PROMETHEUS_HOST}:{PROMETHEUS_PORT}",
                "--web.enable-admin-api",
                f"--storage.tsdb.path={PROMETHEUS_CONTAINER_DATA_DIR}",
                f"--storage.tsdb.retention.time={PROMETHEUS_RETENTION}",
                f"--storage.tsdb.min-block-duration={PROMETHEUS_MIN_BLOCK_DURATION}",
            ],
            "volumes": [
                *host,
                f"{relative(PROMETHEUS_HOST_DATA_DIR)}:{PROMETHEUS_CONTAINER_DATA_DIR}",
                f"./prometheus.yml:{PROMETHEUS_CONTAINER_CONF_FILE}:ro",
                *(f"./{name}:{conf}/{name}:ro" for name in PROMETHEUS_RULE_FILES),
            ],
            "labels": _labels("prometheus", files.get("prometheus", "")),
        },
        "pushgateway": {
            **common,
            "container_name": PUSHGATEWAY_CONTAINER,
            "command": [
                "/usr/bin/prometheus-pushgateway",
                f"--web.listen-address={PUSHGATEWAY_HOST}:{PUSHGATEWAY_PORT}",
            ],
            "volumes": host,
            "labels": _labels("pushgateway", files.get("pushgateway", "")),
        },
    }


def compose_file(files: dict[str, str]) -> str:
    """docker-compose.yml of the sandbox (compose file format 2.4, docker-compose 1.29)."""
    header = (
        "# Proxilion MCP Security Gateway: the sandbox stack as a compose project\n"
        "# (written by sandbox/project.py on `python -m sandbox up`; host networking,\n"
        "# the hostfs image runs the host's programs; data under ./data).\n"
    )
    body = yaml.safe_dump(
        {"version": "2.4", "services": compose_services(files)}, sort_keys=False, width=100
    )
    return header + body


def prometheus_files() -> dict[Path, str]:
    """prometheus.yml and the rule files it lists, with their contents."""
    return {
        PROJECT_DIR / "prometheus.yml": prometheus_config(),
        PROJECT_DIR / "alerts.yml": gateway_alerts(),
        PROJECT_DIR / "proxilion-dr-alerts.yml": (
            MONITORING_DIR / "proxilion-dr-alerts.yml"
        ).read_text(),
    }


def dashboard_files() -> dict[Path, str]:
    """grafana/dashboards/: Proxilion DR's backup-health dashboard and a gateway one."""
    dashboards = PROJECT_DIR / "grafana" / "dashboards"
    return {
        dashboards / "proxilion-dr-dashboard.json": (
            MONITORING_DIR / "proxilion-dr-dashboard.json"
        ).read_text(),
        dashboards / "proxilion-gateway.json": gateway_dashboard(),
    }


def write_env_file() -> bool:
    return write_file(COMPOSE_ENV_FILE, env_file(), mode=0o600)
