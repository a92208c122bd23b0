#!/usr/bin/env bash
# Install the system packages gyoza's tests need on Debian 12: Docker Engine
# (docker.io), PostgreSQL, a static busybox (the root filesystem of the test image),
# Chromium and its driver (the web dashboard's browser tests and `make screenshots`)
# and, only when missing, Node.js and npm. Idempotent: it asks apt for nothing when
# everything is already installed. Must run as root.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

log() { echo "install-system: $*" >&2; }

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

wanted=(docker.io postgresql busybox-static chromium chromium-driver)
missing=()
for pkg in "${wanted[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    for pkg in nodejs npm; do
        installed "$pkg" || missing+=("$pkg")
    done
fi

if [ "${#missing[@]}" -eq 0 ]; then
    log "all system packages present"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    log "missing packages: ${missing[*]}; run this script as root to install them"
    exit 1
fi

log "installing: ${missing[*]}"

# Keep package scripts from starting services (dockerd, the Debian 'main' PostgreSQL
# cluster) during the install: gyoza's own scripts start what the tests need.
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    added_policy=1
fi
cleanup() { if [ "$added_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt_install() {
    apt-get install -y -qq -o Dpkg::Use-Pty=0 "${missing[@]}" >/tmp/gyoza-apt-install.log 2>&1
}

# Refresh the package lists only when they are absent or an install from the
# present lists fails (stale lists point at files the mirror no longer has).
if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    log "apt-get update"
    apt-get update -qq
fi
if ! apt_install; then
    log "install failed with the present package lists; running apt-get update and retrying"
    apt-get update -qq
    if ! apt_install; then
        tail -n 40 /tmp/gyoza-apt-install.log >&2
        log "apt-get install failed (full log: /tmp/gyoza-apt-install.log)"
        exit 1
    fi
fi
log "installed: ${missing[*]}"
