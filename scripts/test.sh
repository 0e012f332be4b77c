#!/usr/bin/env bash
# Runs the whole test suite, as CI does: static checks, the Go tests of
# every package (with -race), and the end-to-end suite, which starts a real
# `cubicle serve` and drives it with the real E2B npm SDKs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
as_root "$@"
cd "$REPO"
bash scripts/deps.sh --test
# Again: deps.sh may have installed Go or Node, which lib.sh puts on PATH.
source scripts/lib.sh
bash scripts/build.sh

say "gofmt, go vet, staticcheck"
unformatted=$(gofmt -l $(git ls-files '*.go'))
[ -z "$unformatted" ] || { say "not gofmt'ed: $unformatted"; exit 1; }
go vet ./...
"$(go env GOPATH)/bin/staticcheck" ./...

export CUBICLE_RUNSC=$(runsc_path)
export CUBICLE_BIN=$REPO/bin/cubicle
say "go test (unit and integration, -race)"
go test -race -count=1 -timeout 20m $(go list ./... | grep -v /e2e)
say "end-to-end: cubicle serve + the E2B npm SDKs"
go test -count=1 -timeout 30m -v ./e2e/
say "all tests passed"
