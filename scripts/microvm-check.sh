#!/usr/bin/env bash
# microvm-check.sh: runtime/microvm's suite on real Linux guests, inside
# scripts/nested-kvm.sh's L1 (or directly where /dev/kvm has VT-x/AMD-V).
# L1 has busybox only, so everything is made here first: the guest kernel
# (vmm/linux/build.sh, cached), the test binary, a template image (the
# base template's rootfs made into an image as serve makes it,
# template.BuildImage, by vmm/linux/internal/initdisks) and an empty ext4
# sandbox disk.
#
#   scripts/microvm-check.sh [TEST-REGEXP]
#
# Environment: CUBICLE_ROOTFS_TAR (the template rootfs tar; default: the
# base template's in $CUBICLE_CACHE_DIR/rootfs), NESTED_KVM_MEM (default
# 8G: the shared files live in L1's memory), NESTED_KVM_TIMEOUT.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${CUBICLE_CACHE_DIR:-/var/cache/cubicle}
run=${1:-.}
tar=${CUBICLE_ROOTFS_TAR:-}
if [ -z "$tar" ]; then
	# The base template's rootfs: the one whose recipe has no base of its own.
	for j in "$cache"/rootfs/*.json; do
		if ! grep -q '"base"' "$j" && grep -q '"suite"' "$j"; then
			tar=${j%.json}.tar
			break
		fi
	done
fi
[ -f "$tar" ] || {
	echo "microvm-check: no template rootfs tar (set CUBICLE_ROOTFS_TAR)" >&2
	exit 2
}

stage=$(mktemp -d "${TMPDIR:-/tmp}/microvm-check.XXXXXX")
trap 'rm -rf "$stage"' EXIT
work=$stage/work
mkdir -p "$work" "$stage/rootfs"
cp "$(bash "$root/vmm/linux/build.sh")" "$work/vmlinux"
(cd "$root" && CGO_ENABLED=0 go build -trimpath -o "$stage/cubicle" ./cmd/cubicle &&
	CGO_ENABLED=0 go test -c -o "$work/microvm.test" ./runtime/microvm)

tar -C "$stage/rootfs" -xf "$tar"
# The template image as serve makes it (template.BuildImage: the rootfs,
# /.cubicle/cubicle and init's mount points) and an empty sandbox disk of
# the suite's size (runtime/microvm: testDiskMB).
(cd "$root" && go run ./vmm/linux/internal/initdisks -cubicle "$stage/cubicle" -rootfs "$stage/rootfs" -disk-mib 64 "$work")
rm -rf "$stage/rootfs"

cat >"$work/run.sh" <<EOS
export CUBICLE_VMLINUX=\$PWD/vmlinux CUBICLE_MICROVM_IMAGE=\$PWD/template.ext4 CUBICLE_MICROVM_DISK=\$PWD/sandbox.ext4
./microvm.test -test.v -test.count=1 -test.timeout 25m -test.run '$run'
EOS
NESTED_KVM_MEM=${NESTED_KVM_MEM:-8G} NESTED_KVM_TIMEOUT=${NESTED_KVM_TIMEOUT:-1800} \
	bash "$root/scripts/nested-kvm.sh" run --share "$work" -- sh run.sh
