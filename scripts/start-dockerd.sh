#!/usr/bin/env bash
# Make sure a Docker engine answers. If `docker info` already works, do nothing;
# otherwise start dockerd in the background with no bridge network and no iptables
# changes (gyoza's containers always run with network_mode none) and wait for it.
#
#   GYOZA_DOCKERD_LOG   dockerd's log file (default /var/log/gyoza-dockerd.log)
#   GYOZA_DOCKERD_WAIT  seconds to wait for the engine (default 60)
set -euo pipefail

log_file=${GYOZA_DOCKERD_LOG:-/var/log/gyoza-dockerd.log}
wait_s=${GYOZA_DOCKERD_WAIT:-60}

log() { echo "start-dockerd: $*" >&2; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

# True when a live (not zombie) dockerd process exists.
dockerd_alive() {
    local pid state
    for pid in $(pgrep -x dockerd 2>/dev/null || true); do
        state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
        if [ -n "$state" ] && [ "$state" != Z ]; then
            return 0
        fi
    done
    return 1
}

if ! command -v docker >/dev/null 2>&1; then
    log "the docker command is missing; run scripts/install-system.sh as root"
    exit 1
fi

if engine_up; then
    log "docker engine already running"
    exit 0
fi

if dockerd_alive; then
    log "a dockerd process exists but does not answer yet; waiting for it"
else
    if [ "$(id -u)" -ne 0 ]; then
        log "docker does not answer and starting dockerd needs root"
        exit 1
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
        log "dockerd is missing; run scripts/install-system.sh"
        exit 1
    fi
    mkdir -p "$(dirname "$log_file")"
    log "starting dockerd (log: $log_file)"
    setsid dockerd --bridge=none --iptables=false --ip6tables=false \
        >>"$log_file" 2>&1 </dev/null &
fi

deadline=$((SECONDS + wait_s))
while ! engine_up; do
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "docker engine did not answer within ${wait_s}s; last lines of $log_file:"
        tail -n 30 "$log_file" >&2 2>/dev/null || true
        exit 1
    fi
    if ! dockerd_alive; then
        log "dockerd exited; last lines of $log_file:"
        tail -n 30 "$log_file" >&2 2>/dev/null || true
        exit 1
    fi
    sleep 0.5
done
log "docker engine is up"
