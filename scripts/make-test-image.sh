#!/usr/bin/env bash
# Build the test image gyoza-test/busybox:latest with `docker import` of a tiny root
# filesystem: Debian's static busybox plus a symlink for each of its applets. No image
# registry is needed. Idempotent: does nothing when the image exists, unless --force.
#
#   GYOZA_TEST_IMAGE  image name (default gyoza-test/busybox:latest)
#   GYOZA_BUSYBOX     the static busybox binary (default /bin/busybox)
set -euo pipefail

image=${GYOZA_TEST_IMAGE:-gyoza-test/busybox:latest}
busybox=${GYOZA_BUSYBOX:-/bin/busybox}
force=0

for arg in "$@"; do
    case "$arg" in
    --force) force=1 ;;
    -h | --help)
        echo "usage: $0 [--force]"
        exit 0
        ;;
    *)
        echo "make-test-image: unknown argument: $arg" >&2
        exit 2
        ;;
    esac
done

log() { echo "make-test-image: $*" >&2; }

if [ "$force" = 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
    log "$image already exists"
    exit 0
fi

if [ ! -x "$busybox" ]; then
    log "$busybox not found; run scripts/install-system.sh (package busybox-static)"
    exit 1
fi
if ldd "$busybox" >/dev/null 2>&1; then
    log "$busybox is dynamically linked; install busybox-static"
    exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root,proc,sys,dev,var/tmp}
chmod 1777 "$root/tmp" "$root/var/tmp"
cp "$busybox" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] && continue
    ln -sf busybox "$root/bin/$applet"
done
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP

log "importing $image"
tar -C "$root" --numeric-owner --owner=0 --group=0 -cf - . |
    docker import \
        --change 'CMD ["/bin/sh"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'LABEL org.gyoza.test-image=busybox' \
        - "$image" >/dev/null
log "built $image"
