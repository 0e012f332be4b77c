#!/usr/bin/env bash
# Builds the cubicle binary into bin/cubicle. It must be static
# (CGO_ENABLED=0): the same binary runs as envd inside every sandbox.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"
mkdir -p bin
CGO_ENABLED=0 go build -trimpath -o bin/cubicle ./cmd/cubicle
say "built $REPO/bin/cubicle ($(bin/cubicle version))"
