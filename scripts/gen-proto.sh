#!/usr/bin/env bash
# Regenerates the Go code for envd's protobuf services (guest/envd/spec → guest/envd/gen).
# Needs protoc (with the well-known types, e.g. /usr/include/google/protobuf), and
# protoc-gen-go + protoc-gen-connect-go pinned to the versions in go.mod:
#   go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
#   go install connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$(go env GOPATH)/bin:/root/go/bin:$PATH"

spec="$root/guest/envd/spec"
out="$root/guest/envd/gen"

# Regenerate from scratch so a deleted .proto leaves no stale Go behind.
rm -rf "$out"
mkdir -p "$out"

protoc \
  -I "$spec" \
  --go_out="$out" --go_opt=paths=source_relative \
  --connect-go_out="$out" --connect-go_opt=paths=source_relative \
  "$spec/process/process.proto" \
  "$spec/filesystem/filesystem.proto"

gofmt -l "$out" | (! grep .) || { echo "generated code is not gofmt-clean" >&2; exit 1; }
