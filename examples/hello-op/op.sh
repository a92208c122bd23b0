#!/bin/sh
# hello-op: a gyoza op that needs nothing but a POSIX shell.
# Input:  {"name": "..."} (optional).  Output: {"greeting": "hello, <name>", "steps": 3}.
set -eu

# A real op would use a JSON parser; a shell can pick a plain string out with sed.
name=$(printf '%s' "${GYOZA_INPUTS:-}" |
    sed -n 's/.*"name"[[:space:]]*:[[:space:]]*"\([^"\\]*\)".*/\1/p')
name=${name:-world}
outputs_dir=${GYOZA_OUTPUTS_DIR:-/gyoza/outputs}

# Events are stdout lines that start with ::gyoza:: followed by one JSON object.
printf '::gyoza::{"type":"info","message":"greeting %s"}\n' "$name"
for step in 1 2 3; do
    printf 'working on step %d\n' "$step"    # an ordinary log line
    printf '::gyoza::{"type":"progress","progress":%d,"message":"step %d of 3"}\n' \
        $((step * 100 / 3)) "$step"
done
echo "this line goes to stderr" >&2

# Outputs: one JSON object in outputs.json, written whole then renamed into place.
printf '{"greeting":"hello, %s","steps":3}\n' "$name" >"$outputs_dir/.outputs.json.tmp"
mv "$outputs_dir/.outputs.json.tmp" "$outputs_dir/outputs.json"
