#!/usr/bin/env bash
# Installs what cubicle needs on a Debian 12 machine: Debian packages
# (debootstrap and friends), Go when the machine has none new enough (the
# pinned toolchain from the Go module proxy), runsc built static from the
# pinned gVisor module (cached by version outside the repo), and, with
# --test, the test tools: gcc and binutils (go test -race, the C test
# guest), Node.js new enough for the E2B SDKs (the pinned one from the npm
# registry when the machine's is older), staticcheck, the E2B npm SDKs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
as_root "$@"

with_tests=false
[ "${1:-}" = --test ] && with_tests=true

# e2fsprogs: mkfs.ext4 formats the sandboxes' disks (runtime/gvisor/disk.go)
# and, with debugfs and e2fsck, makes the templates' ext4 images
# (template/image.go).
# curl, unzip: fetching Go and Node below.
pkgs=(debootstrap ca-certificates iproute2 e2fsprogs curl unzip)
# gcc: cgo for go test -race; gcc and binutils (objcopy): the VMM's C test
# guest (vmm/testguest).
$with_tests && pkgs+=(gcc libc6-dev binutils)
# busybox-static: the image e2e/template_test.go builds and serves from a
# registry on loopback.
$with_tests && pkgs+=(busybox-static)
# guest/codeinterp's tests drive real Jupyter kernels (Debian's python3, not a pyenv one).
# The guest kernel's build (vmm/linux/build.sh). scripts/nested-kvm.sh
# installs QEMU and its L1's tools itself, only where the host needs them
# (busybox-static replaces a busybox package).
$with_tests && pkgs+=(linux-source-6.1 bc flex bison libelf-dev libssl-dev make)
$with_tests && pkgs+=(python3-ipykernel python3-numpy python3-pandas python3-matplotlib python3-scipy)
missing=()
for p in "${pkgs[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	say "installing Debian packages: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! go_ok; then
	say "Go ${GO_MIN} or later not found (have: $(go env GOVERSION 2>/dev/null || echo none))"
	install_go
	go_ok || { say "Go $GO_VERSION was installed into $(go_dir) but does not run"; exit 1; }
fi
say "go: $(command -v go) ($(go env GOVERSION))"

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
	if ! node_ok; then
		say "Node.js $NODE_MIN or later with npm not found (have: $(node --version 2>/dev/null || echo none))"
		install_node
		node_ok || { say "Node $NODE_VERSION was installed into $(node_dir) but does not run"; exit 1; }
	fi
	say "node: $(command -v node) ($(node --version))"
	gobin=$(go env GOPATH)/bin
	if [ ! -x "$gobin/staticcheck" ] || ! "$gobin/staticcheck" -version 2>/dev/null | grep -q "${STATICCHECK_VERSION#v}"; then
		say "installing staticcheck $STATICCHECK_VERSION"
		(cd /tmp && go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION")
	fi
	say "installing the E2B npm SDKs for the end-to-end tests"
	(cd "$REPO/e2e/sdk" && npm ci --no-audit --no-fund --loglevel=error)
fi
