#!/usr/bin/env bash
# microvm-check.sh: runtime/microvm's suite on real Linux guests, inside
# scripts/nested-kvm.sh's L1 (or directly where /dev/kvm has VT-x/AMD-V).
# L1 has busybox only, so everything is made here first: the guest kernel
# (vmm/linux/build.sh, cached), the test binary, a template image (the
# base template's rootfs plus the static cubicle binary at
# /.cubicle/cubicle, as guest/init's contract lays it out) and an empty
# ext4 sandbox disk.
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
mkdir -p "$stage/rootfs/.cubicle/rw" "$stage/rootfs/.cubicle/root"
for d in proc sys dev tmp; do mkdir -p "$stage/rootfs/$d"; done
install -m 0755 "$stage/cubicle" "$stage/rootfs/.cubicle/cubicle"
size=$(($(du -sm "$stage/rootfs" | cut -f1) * 12 / 10 + 64))
mkfs.ext4 -q -F -m 0 -d "$stage/rootfs" "$work/template.img" "${size}M"
rm -rf "$stage/rootfs"
truncate -s 64M "$work/empty.img"
mkfs.ext4 -q -F -m 0 -E lazy_itable_init=0,lazy_journal_init=0 "$work/empty.img"

cat >"$work/run.sh" <<EOS
export CUBICLE_VMLINUX=\$PWD/vmlinux CUBICLE_MICROVM_IMAGE=\$PWD/template.img CUBICLE_MICROVM_DISK=\$PWD/empty.img
./microvm.test -test.v -test.count=1 -test.timeout 25m -test.run '$run'
EOS
NESTED_KVM_MEM=${NESTED_KVM_MEM:-8G} NESTED_KVM_TIMEOUT=${NESTED_KVM_TIMEOUT:-1800} \
	bash "$root/scripts/nested-kvm.sh" run --share "$work" -- sh run.sh
