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
REDIS_HOST_DATA_DIR: Path = STATE_DIR / "redis"
REDIS_DBFILENAME = "dump.rdb"
REDIS_SAVE_POINTS = "900 1 300 10 60 10000"
# redis.conf lives apart from the data, in a directory of its own (CONFIG REWRITE
# replaces the file by renaming, which needs a writable directory).
REDIS_CONTAINER_CONF_DIR = "/conf"
REDIS_CONTAINER_CONF_FILE = f"{REDIS_CONTAINER_CONF_DIR}/redis.conf"
REDIS_HOST_CONF_DIR: Path = STATE_DIR / "redis-conf"
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

# SeaweedFS (host process: master + volume + filer + S3 gateway).
S3_HOST = "127.0.0.1"
S3_PORT = 8333
S3_ENDPOINT = f"http://{S3_HOST}:{S3_PORT}"
S3_BUCKET = "proxilion-backups"
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
