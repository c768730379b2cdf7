"""Addresses, names and paths of the sandbox stack (stdlib only, cheap to import).

Everything listens on 127.0.0.1 only. The state directory comes from the
``PROXILION_SANDBOX_DIR`` environment variable, default ``<repo>/.sandbox``; it is
resolved once, at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_DIR: Path = Path(__file__).resolve().parent.parent
STATE_DIR: Path = Path(os.environ.get("PROXILION_SANDBOX_DIR") or (REPO_DIR / ".sandbox")).resolve()

# The stack is a compose project in the production layout (docker-compose.yml,
# prometheus.yml, alerts.yml, grafana/dashboards/, .env, data under ./data/), written
# by sandbox/stack.py on `up` and run with docker-compose under this project name.
PROJECT_DIR: Path = STATE_DIR / "project"
COMPOSE_PROJECT = "proxilion"
COMPOSE_FILE: Path = PROJECT_DIR / "docker-compose.yml"
COMPOSE_ENV_FILE: Path = PROJECT_DIR / ".env"
MONITORING_DIR: Path = REPO_DIR / "monitoring"

# Docker image built locally (no registry can be reached).
HOSTFS_IMAGE = "proxilion-dr/hostfs:latest"
# Every container and image the sandbox makes carries this label.
SANDBOX_LABEL = "proxilion-dr.sandbox"

# Redis 7 (Debian's redis-server run from the host's /usr in a container).
REDIS_CONTAINER = "proxilion-redis"
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
REDIS_CONTAINER_DATA_DIR = "/data"
REDIS_HOST_DATA_DIR: Path = PROJECT_DIR / "data" / "redis"
REDIS_DBFILENAME = "dump.rdb"
REDIS_SAVE_POINTS = "900 1 300 10 60 10000"
# redis.conf lives apart from the data, in a directory of its own in the project
# (CONFIG REWRITE replaces the file by renaming, which needs a writable directory).
REDIS_CONTAINER_CONF_DIR = "/conf"
REDIS_CONTAINER_CONF_FILE = f"{REDIS_CONTAINER_CONF_DIR}/redis.conf"
REDIS_HOST_CONF_DIR: Path = PROJECT_DIR / "redis"
REDIS_HOST_CONF_FILE: Path = REDIS_HOST_CONF_DIR / "redis.conf"

# Stand-in gateway (sandbox/gateway.py run by the host's /usr/bin/python3).
GATEWAY_CONTAINER = "proxilion-gateway"
GATEWAY_HOST = "127.0.0.1"
GATEWAY_PORT = 8787
GATEWAY_URL = f"http://{GATEWAY_HOST}:{GATEWAY_PORT}"
GATEWAY_SCRIPT: Path = Path(__file__).resolve().parent / "gateway.py"
GATEWAY_CONTAINER_SCRIPT = "/app/gateway.py"
# The gateway's operator-facing settings (what backup-config should capture)...
GATEWAY_SETTINGS: dict[str, str] = {
    "MODE": "monitor",
    "SESSION_STORE": "redis",
    "ALERT_THRESHOLD": "50",
    "BLOCK_THRESHOLD": "70",
    "SESSION_TTL_HOURS": "24",
}
# ...and a secret that a config backup must withhold.
GATEWAY_SECRET_ENV: dict[str, str] = {"GATEWAY_API_TOKEN": "sandbox-token-not-for-backup"}

# Prometheus 2.x (Debian's /usr/bin/prometheus run from the host's /usr in a container),
# scraping the gateway, itself and the Pushgateway. Its TSDB lives in
# <project>/data/prometheus, bind-mounted at /prometheus, so both the Docker archive API
# and the host path reach it; its config files are the project's, mounted under /config.
PROMETHEUS_CONTAINER = "prometheus"
PROMETHEUS_HOST = "127.0.0.1"
PROMETHEUS_PORT = 9090
PROMETHEUS_URL = f"http://{PROMETHEUS_HOST}:{PROMETHEUS_PORT}"
PROMETHEUS_CONTAINER_DATA_DIR = "/prometheus"
PROMETHEUS_HOST_DATA_DIR: Path = PROJECT_DIR / "data" / "prometheus"
PROMETHEUS_CONTAINER_CONF_DIR = "/config"
PROMETHEUS_CONTAINER_CONF_FILE = f"{PROMETHEUS_CONTAINER_CONF_DIR}/prometheus.yml"
PROMETHEUS_HOST_CONF_FILE: Path = PROJECT_DIR / "prometheus.yml"
# Rule files beside prometheus.yml: the sandbox's own, and Proxilion DR's backup alerts.
PROMETHEUS_RULE_FILES = ("alerts.yml", "proxilion-dr-alerts.yml")
PROMETHEUS_SCRAPE_SECONDS = 5
# Hidden Prometheus 2.x flag: the head is cut into a persisted block every few minutes
# (default 2 h), so the sandbox TSDB holds real scraped blocks soon after `up`.
PROMETHEUS_MIN_BLOCK_DURATION = "2m"
# Long enough that the backfilled history below is never dropped (nor after a restore).
PROMETHEUS_RETENTION = "3650d"
# Known history, written once into the data dir with `promtool tsdb create-blocks-from
# openmetrics` before Prometheus starts: persisted blocks with values tests can predict.
PROMETHEUS_BACKFILL_METRIC = "proxilion_dr_sandbox_history"
PROMETHEUS_BACKFILL_START = 1735689600  # 2025-01-01T00:00:00Z
PROMETHEUS_BACKFILL_SECONDS = 6 * 3600
PROMETHEUS_BACKFILL_STEP = 15
PROMETHEUS_BACKFILL_SERIES = 100
PROMETHEUS_BACKFILL_MARKER = ".sandbox-backfill-v1"


def backfill_value(series: int, timestamp: int) -> int:
    """The backfilled sample of series `series` at `timestamp` (a step of the window)."""
    step = (timestamp - PROMETHEUS_BACKFILL_START) // PROMETHEUS_BACKFILL_STEP
    return (series * 37 + step * 11) % 1000


# Prometheus Pushgateway (Debian's /usr/bin/prometheus-pushgateway in a container): every
# backup, recovery and drill run pushes its outcome here; Prometheus scrapes it.
PUSHGATEWAY_CONTAINER = "pushgateway"
PUSHGATEWAY_HOST = "127.0.0.1"
PUSHGATEWAY_PORT = 9091
PUSHGATEWAY_URL = f"http://{PUSHGATEWAY_HOST}:{PUSHGATEWAY_PORT}"


# SeaweedFS (host process: master + volume + filer + S3 gateway).
S3_HOST = "127.0.0.1"
S3_PORT = 8333
S3_ENDPOINT = f"http://{S3_HOST}:{S3_PORT}"
S3_BUCKET = "proxilion-backups"
S3_LOCKED_BUCKET = "proxilion-backups-locked"  # Object Lock enabled (so versioned), for tests
S3_REGION = "us-east-1"
S3_ACCESS_KEY = "proxilion-dr"
S3_SECRET_KEY = "sandbox-secret-key"
# The other SeaweedFS ports (gRPC ports are these + 10000). Chosen clear of
# 6379 (Redis), 8787 (gateway), 9090 (Prometheus), 4200 (Prefect), 8080.
WEED_MASTER_PORT = 9333
WEED_VOLUME_PORT = 8380
WEED_FILER_PORT = 8388
WEED_DATA_DIR: Path = STATE_DIR / "seaweedfs"
WEED_PID_FILE: Path = STATE_DIR / "seaweedfs.pid"
WEED_LOG_FILE: Path = STATE_DIR / "seaweedfs.log"
WEED_S3_CONFIG_FILE: Path = STATE_DIR / "s3.json"

DOCKERD_LOG_FILE: Path = STATE_DIR / "dockerd.log"

# Where data lived before the stack became a compose project; `up` moves it into the
# project's data dirs once (so the switch keeps the sandbox's Redis and Prometheus data).
LEGACY_DATA_DIRS: dict[Path, Path] = {
    STATE_DIR / "redis": REDIS_HOST_DATA_DIR,
    STATE_DIR / "prometheus": PROMETHEUS_HOST_DATA_DIR,
}
