#!/usr/bin/env bash
# The one command a newcomer runs: installs what cubicle needs, builds it, and
# runs `cubicle serve`, which builds the default template "base" on first
# start (with progress) and prints the E2B environment to use.
# Extra arguments go to `cubicle serve`.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
as_root "$@"
bash "$REPO/scripts/deps.sh"
bash "$REPO/scripts/build.sh"
# serve finds the runsc deps.sh built under $CUBICLE_CACHE_DIR by itself.
exec "$REPO/bin/cubicle" serve "$@"
