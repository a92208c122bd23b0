#!/bin/sh
# Test op for tests/docker: behaves as the "scenario" input says. Busybox sh only.
set -u
inputs=${GYOZA_INPUTS:-}
scenario=$(printf '%s' "$inputs" | sed -n 's/.*"scenario"[[:space:]]*:[[:space:]]*"\([a-z_]*\)".*/\1/p')
out=${GYOZA_OUTPUTS_DIR:-/gyoza/outputs}
event() { printf '::gyoza::%s\n' "$1"; }

case "$scenario" in
fail)
    echo "about to fail"
    echo "something went wrong" >&2
    exit 3
    ;;
oom)
    echo "allocating"
    head -c 256m /dev/zero | tail
    exit $?
    ;;
sleep)
    event '{"type":"progress","progress":5,"message":"sleeping"}'
    sleep 600
    ;;
ignore_term)
    trap '' TERM
    event '{"type":"progress","progress":5,"message":"ignoring TERM"}'
    while :; do sleep 0.1; done
    ;;
bad_outputs)
    printf 'not json at all' >"$out/outputs.json"
    ;;
array_outputs)
    printf '[1, 2, 3]' >"$out/outputs.json"
    ;;
no_outputs)
    echo "done, nothing to report"
    ;;
big_outputs)
    { printf '{"blob":"'; head -c 1100000 /dev/zero | tr '\0' 'a'; printf '"}'; } >"$out/outputs.json"
    ;;
wait_file)
    event '{"type":"progress","progress":10,"message":"waiting for go"}'
    echo "before go"
    while [ ! -e "$out/go" ]; do sleep 0.02; done
    echo "after go"
    linger=$(printf '%s' "$inputs" | sed -n 's/.*"linger"[[:space:]]*:[[:space:]]*"\([0-9.]*\)".*/\1/p')
    [ -n "$linger" ] && sleep "$linger"
    event '{"type":"progress","progress":50,"message":"got go"}'
    echo "finishing" >&2
    printf '{"went":true}' >"$out/outputs.json"
    ;;
malformed)
    echo '::gyoza::{not json'
    echo '::gyoza::{"type":"bogus","message":"x"}'
    echo '::gyoza::{"type":"progress","progress":"lots"}'
    echo '::gyoza::["a list"]'
    event '{"type":"progress","progress":70,"message":"fine"}'
    event '{"type":"error","message":"recoverable","payload":{"code":7}}'
    printf '{}' >"$out/outputs.json"
    printf 'last line without a newline'
    ;;
chatty)
    n=$(printf '%s' "$inputs" | sed -n 's/.*"lines"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p')
    seq 1 "${n:-1000}"
    event '{"type":"progress","progress":100}'
    printf '{}' >"$out/outputs.json"
    ;;
env)
    if touch /gyoza/inputs.json 2>/dev/null; then ro=false; else ro=true; fi
    nets=$(ls /sys/class/net | tr '\n' ' ')
    printf '{"run_id":"%s","attempt":"%s","gpu_ids":"%s","visible":"%s","inputs_file":%s,"inputs_env":%s,"inputs_ro":%s,"nets":"%s","inputs_file_env":"%s","outputs_dir_env":"%s"}' \
        "$GYOZA_RUN_ID" "$GYOZA_ATTEMPT" "$GYOZA_GPU_IDS" "$NVIDIA_VISIBLE_DEVICES" \
        "$(cat /gyoza/inputs.json)" "$GYOZA_INPUTS" "$ro" "$nets" \
        "$GYOZA_INPUTS_FILE" "$GYOZA_OUTPUTS_DIR" >"$out/outputs.json"
    ;;
*)
    echo "unknown scenario: '$scenario'" >&2
    exit 64
    ;;
esac
