#!/usr/bin/env bash
# Installs what cubicle needs on a Debian 12 machine: Debian packages
# (debootstrap and friends), runsc built static from the pinned gVisor module
# (cached by version outside the repo), and, with --test, the test tools
# (staticcheck, the E2B npm SDKs).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
as_root "$@"

with_tests=false
[ "${1:-}" = --test ] && with_tests=true

command -v go >/dev/null || { say "Go is not installed: put Go 1.26 at /usr/local/go (https://go.dev/dl)"; exit 1; }
case "$(go env GOVERSION)" in
go1.2[6-9]* | go1.[3-9]*) ;;
*) say "Go $(go env GOVERSION) is too old: cubicle needs Go 1.26"; exit 1 ;;
esac

# e2fsprogs: mkfs.ext4 formats the sandboxes' disks (runtime/gvisor/disk.go).
pkgs=(debootstrap ca-certificates iproute2 e2fsprogs)
$with_tests && pkgs+=(nodejs npm)
# guest/codeinterp's tests drive real Jupyter kernels (Debian's python3, not a pyenv one).
$with_tests && pkgs+=(python3-ipykernel python3-numpy python3-pandas python3-matplotlib python3-scipy)
missing=()
for p in "${pkgs[@]}"; do
	# nodejs may come from another source than Debian; any working node will do.
	if [ "$p" = nodejs ] || [ "$p" = npm ]; then command -v "${p/nodejs/node}" >/dev/null && continue; fi
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	say "installing Debian packages: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

runsc=$(runsc_path)
if [ ! -x "$runsc" ]; then
	say "building runsc $RUNSC_VERSION (static; about a minute, cached in $(dirname "$runsc"))"
	tmp=$(mktemp -d)
	(cd "$tmp" && CGO_ENABLED=0 GOBIN="$tmp/bin" GOFLAGS=-mod=mod go install "$RUNSC_MODULE@$RUNSC_VERSION")
	mkdir -p "$(dirname "$runsc")"
	mv "$tmp/bin/runsc" "$runsc"
	rm -rf "$tmp"
fi
say "runsc: $runsc"

if $with_tests; then
	gobin=$(go env GOPATH)/bin
	if [ ! -x "$gobin/staticcheck" ] || ! "$gobin/staticcheck" -version 2>/dev/null | grep -q "${STATICCHECK_VERSION#v}"; then
		say "installing staticcheck $STATICCHECK_VERSION"
		(cd /tmp && go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION")
	fi
	say "installing the E2B npm SDKs for the end-to-end tests"
	(cd "$REPO/e2e/sdk" && npm ci --no-audit --no-fund --loglevel=error)
fi
