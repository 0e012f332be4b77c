#!/usr/bin/env bash
# Real-SDK check of guest/envd: installs the official e2b npm SDK in a temp dir
# (never in the repo), builds and starts envd on port 49983 and runs sdk-smoke.mjs.
# Needs node + npm, network access to the npm registry, and root (envd switches users).
#   guest/envd/testdata/sdk-smoke.sh [e2b-version]   (default 2.51.0)
set -euo pipefail

version=${1:-2.51.0}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../../.." && pwd)
work=$(mktemp -d /tmp/envd-sdk-smoke.XXXXXX)
envd_pid=
cleanup() {
  [ -n "$envd_pid" ] && kill "$envd_pid" 2>/dev/null && wait "$envd_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/sdk" "$work/scratch"
# mktemp makes 0700 directories; the non-root user checks need to enter them.
chmod 755 "$work" "$work/scratch"
(cd "$work/sdk" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund "e2b@$version" >/dev/null)
echo "e2b SDK $(node -p "require('$work/sdk/node_modules/e2b/package.json').version")"

(cd "$root" && CGO_ENABLED=0 go build -o "$work/cubicle" ./cmd/cubicle)
# Listens on all addresses: the SDK dials "localhost", which may resolve to ::1.
"$work/cubicle" envd --port 49983 --rundir "$work/run" --no-init >"$work/envd.log" 2>&1 &
envd_pid=$!
for _ in $(seq 50); do
  curl -fsS -o /dev/null http://127.0.0.1:49983/health 2>/dev/null && break
  sleep 0.1
done

status=0
E2B_SDK_DIR="$work/sdk" SMOKE_DIR="$work/scratch" ENVD_URL=http://localhost:49983 \
  node "$here/sdk-smoke.mjs" || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- envd log (last 40 lines) ---"
  tail -n 40 "$work/envd.log"
fi
exit "$status"
