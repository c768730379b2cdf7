#!/usr/bin/env bash
# Set everything up on a fresh machine and run backup-redis and backup-config once against
# the sandbox: installs packages, starts the sandbox stack (a compose project: gateway,
# Redis, Prometheus, Pushgateway; SeaweedFS S3) and a local Prefect server (SQLite), then
# runs the flows and says where the backups went.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

bash scripts/setup.sh
.venv/bin/python -m sandbox up

export PREFECT_HOME="$repo/.sandbox/prefect"
export PREFECT_API_URL="http://127.0.0.1:4200/api"
# The locks' leases on disk (under $PREFECT_HOME): a restart of the server keeps them.
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem
mkdir -p "$PREFECT_HOME"
if ! curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1; then
    echo "Starting the Prefect server (SQLite and leases under $PREFECT_HOME)..."
    setsid .venv/bin/prefect server start --host 127.0.0.1 --port 4200 \
        >"$PREFECT_HOME/server.log" 2>&1 < /dev/null &
    for _ in $(seq 1 120); do
        curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1 && break
        sleep 1
    done
    curl -fsS "$PREFECT_API_URL/health" >/dev/null || {
        echo "Prefect server did not start; see $PREFECT_HOME/server.log" >&2; exit 1; }
fi

eval "$(.venv/bin/python -m sandbox env)"
export PROXILION_DR_BACKUP_DIR="${PROXILION_DR_BACKUP_DIR:-$repo/backups}"
.venv/bin/python -m flows.backup_redis
# The sandbox's compose project (PROXILION_DR_CONFIG_PROJECT_DIR): compose file, Prometheus
# config and rules, dashboards, redis.conf and the gateway's settings; its .env secret not.
.venv/bin/python -m flows.backup_config
# The table an operator opens first (after each backup once `deployments serve` runs).
.venv/bin/python -m flows.backup_status

echo
echo "Backups:   $PROXILION_DR_BACKUP_DIR (and s3://$PROXILION_DR_S3_BUCKET/$PROXILION_DR_S3_PREFIX on the sandbox S3)"
echo "Project:   $PROXILION_DR_CONFIG_PROJECT_DIR (the sandbox stack's compose project)"
echo "Prefect UI: http://127.0.0.1:4200  (flow runs, logs and their report artifacts)"
echo "Schedules: .venv/bin/python -m deployments serve"
