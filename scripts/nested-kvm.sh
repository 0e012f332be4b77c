#!/usr/bin/env bash
# nested-kvm.sh: a /dev/kvm with hardware virtualization on any machine,
# by running an L1 Linux guest under QEMU in software emulation (TCG) with
# an emulated AMD CPU that has SVM (-cpu EPYC,+svm). Inside L1, Debian's
# kvm_amd gives a real-looking /dev/kvm with nested paging, on which
# cubicle's VMM boots a Linux guest (L2). Works where the host has no
# /dev/kvm, a PVM one, or a real one (docs/STATUS.md has what was seen with it).
#
#   scripts/nested-kvm.sh
#       runs the microVM checks (TestLinuxBoot, TestLinuxInit, and any
#       TestLinux*Snapshot*/TestLinux*Restore* test in vmm/linux), one
#       "PASS name" / "FAIL name" line each, ending with exactly one line
#       "nested-kvm: N passed, M failed"; exits 1 if M > 0. Where the host's
#       /dev/kvm has real VT-x/AMD-V (vmm/linux.CanBoot), the checks run
#       directly on the host instead.
#   scripts/nested-kvm.sh run [--share DIR] -- CMD [ARG...]
#       boots L1 with DIR's files (a copy, read-write, in L1's memory) at
#       /work, runs CMD there as root, streams L1's serial console to
#       stdout and exits with CMD's exit code (124 if QEMU timed out, 125
#       if L1 ended without reporting one). CMD runs under busybox: no go,
#       no gcc; test binaries are built beforehand (CGO_ENABLED=0 go test
#       -c), the L2 kernel comes from vmm/linux/build.sh, and the hooks
#       $CUBICLE_VMLINUX, $CUBICLE_TESTINIT and $CUBICLE_TESTGUEST_DIR
#       point the tests at prebuilt files.
#   scripts/nested-kvm.sh prepare
#       builds (or finds) the cached L1 kernel and base initramfs and
#       prints their directory.
#
# Environment: NESTED_KVM_TIMEOUT (seconds QEMU may run, default 1800 for
# run, and 180 + 360 per check for the checks),
# NESTED_KVM_MEM (default 4G), NESTED_KVM_SMP (default 2), NESTED_KVM_FORCE=1
# (use QEMU even where the host could run the checks directly),
# NESTED_KVM_KERNEL_PKG (the Debian linux-image package, default what
# linux-image-amd64 depends on), CUBICLE_CACHE_DIR (default
# /var/cache/cubicle; the L1 files are cached in nested-kvm/<key> below it,
# keyed by the kernel package and version, busybox's version and this
# script).
#
# Times under emulation are 10-100x real ones and swing with load: they
# prove correctness, never performance.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
script=$root/scripts/nested-kvm.sh
cache=${CUBICLE_CACHE_DIR:-/var/cache/cubicle}/nested-kvm
qemu_timeout=${NESTED_KVM_TIMEOUT:-1800}
mem=${NESTED_KVM_MEM:-4G}
smp=${NESTED_KVM_SMP:-2}
# The L1 kernel modules /dev/kvm needs (kvm-amd pulls in kvm, ccp and
# irqbypass through modules.dep), tun for the virtio-net tests, and what
# package network's tap mode needs for runtime/microvm's tests (veth,
# nftables NAT and conntrack over netlink).
modules=(kvm-amd tun veth crc32c-generic nft-chain-nat nft-nat nf-conntrack-netlink)

log() { echo "nested-kvm: $*" >&2; }
die() {
	log "$*"
	exit 2
}

# ensure_tools installs the Debian packages the harness uses, only those
# missing.
ensure_tools() {
	local missing=() pair
	for pair in qemu-system-x86_64:qemu-system-x86 cpio:cpio depmod:kmod timeout:coreutils; do
		command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
	done
	# The busybox in L1 must be static: nothing else is there.
	dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' ||
		missing+=(busybox-static)
	[ ${#missing[@]} -eq 0 ] && return 0
	log "installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 || {
		apt-get update >&2
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
	}
}

# kernel_pkg prints the Debian kernel package and its candidate version.
kernel_pkg() {
	local pkg=${NESTED_KVM_KERNEL_PKG:-} ver=
	if [ -z "$pkg" ]; then
		pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
		if [ -z "$pkg" ]; then
			apt-get update >&2
			pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
		fi
	fi
	[ -n "$pkg" ] || die "cannot find the Debian kernel package (apt-cache depends linux-image-amd64)"
	ver=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
	[ -n "$ver" ] || die "no version of $pkg in apt's lists"
	echo "$pkg $ver"
}

# l1_init is L1's /init (busybox sh). Stage one copies the initramfs onto
# a tmpfs and switch_roots into it, since the jailer's pivot_root refuses
# an initramfs root; stage two mounts what the tests expect (proc, sys,
# devtmpfs, a tmpfs /tmp, the cgroup layout of vmm/jailer), loads the KVM
# modules, runs /nested-kvm/run from the payload, prints the marker line
# with its exit code and powers off.
l1_init() {
	cat <<'EOF'
#!/bin/sh
export PATH=/bin HOME=/root TMPDIR=/tmp
if [ ! -e /.nested-kvm-tmpfs ]; then
	mount -t tmpfs -o mode=0755,size=90% tmpfs /newroot || exit 1
	for e in /*; do
		case $e in /newroot | /proc | /sys | /dev) continue ;; esac
		cp -a "$e" /newroot/ || exit 1
	done
	mkdir -p /newroot/proc /newroot/sys /newroot/dev
	: >/newroot/.nested-kvm-tmpfs
	exec switch_root /newroot /init
fi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
# vmm/jailer: v1 memory and pids hierarchies, cgroup2 at "unified".
mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
for c in memory pids; do
	mkdir /sys/fs/cgroup/$c
	mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
mkdir /sys/fs/cgroup/unified
mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
hostname l1
ip link set lo up
for m in /lib/nested-kvm/*.ko; do
	insmod "$m" || echo "nested-kvm: insmod $m failed"
done
if [ -c /dev/kvm ]; then
	echo "nested-kvm: L1 has /dev/kvm (kvm_amd nested=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null))"
else
	echo "nested-kvm: L1 has no /dev/kvm"
fi
rc=127
if [ -f /nested-kvm/run ]; then
	cd /work 2>/dev/null || cd /
	sh /nested-kvm/run
	rc=$?
fi
cd /
echo "nested-kvm-exit $(cat /nested-kvm/token 2>/dev/null) $rc"
sync
poweroff -f
# Should poweroff return, PID 1 exiting panics the kernel, which reboots
# at once (panic=-1), which QEMU's -no-reboot turns into an exit.
exit "$rc"
EOF
}

# mkcpio DIR OUT packs DIR's contents into an uncompressed newc archive
# (names relative to DIR, owned by root), as the kernel unpacks them.
mkcpio() {
	(cd "$1" && find . -mindepth 1 | sed 's,^\./,,' | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$2"
}

# prepare builds the L1 kernel and base initramfs into the cache (once per
# key) and prints the cache directory.
prepare() {
	ensure_tools
	local pkgver pkg ver key dir tmp
	pkgver=$(kernel_pkg)
	pkg=${pkgver% *}
	ver=${pkgver#* }
	key=$({
		echo "$pkg $ver"
		dpkg-query -W -f='${Version}\n' busybox-static
		echo "${modules[*]}"
		cat "$script"
	} | sha256sum | cut -c1-16)
	dir=$cache/$key
	if [ -f "$dir/vmlinuz" ] && [ -f "$dir/base.cpio" ]; then
		echo "$dir"
		return 0
	fi
	mkdir -p "$cache"
	# One builder at a time; a second waits and then finds it built.
	exec 9>"$cache/.lock"
	flock 9
	if [ -f "$dir/vmlinuz" ] && [ -f "$dir/base.cpio" ]; then
		echo "$dir"
		return 0
	fi
	log "building the L1 kernel and initramfs from $pkg $ver into $dir"
	tmp=$(mktemp -d "$cache/.build.XXXXXX")
	# shellcheck disable=SC2064 # expand $tmp now: it is local
	trap "rm -rf '$tmp'" EXIT
	# The package is kept (by version) so that a change to this script
	# rebuilds the initramfs without downloading the kernel again.
	local debs=$cache/debs deb
	mkdir -p "$debs"
	deb=$(find "$debs" -name "${pkg}_${ver//:/%3a}_*.deb" | head -n 1)
	if [ -z "$deb" ]; then
		(cd "$tmp" && apt-get download "$pkg=$ver" >&2) ||
			{ apt-get update >&2 && (cd "$tmp" && apt-get download "$pkg=$ver" >&2); }
		find "$debs" -name "${pkg}_*.deb" -delete
		mv "$tmp/${pkg}_"*.deb "$debs/"
		deb=$(find "$debs" -name "${pkg}_${ver//:/%3a}_*.deb" | head -n 1)
	fi
	dpkg-deb -x "$deb" "$tmp/x"
	local kver=${pkg#linux-image-} moddir base
	moddir=$tmp/x/lib/modules/$kver
	[ -d "$moddir" ] || moddir=$tmp/x/usr/lib/modules/$kver
	[ -d "$moddir" ] || die "$pkg has no modules for $kver"
	# The package ships no modules.dep (its postinst runs depmod).
	local depbase=${moddir%/lib/modules/*}
	depmod -b "$depbase" "$kver"
	base=$tmp/base
	mkdir -p "$base"/{bin,dev,proc,sys,tmp,run,root,newroot,lib/nested-kvm}
	cp /bin/busybox "$base/bin/busybox"
	local a
	for a in $("$base/bin/busybox" --list); do
		[ "$a" = busybox ] || ln -s busybox "$base/bin/$a"
	done
	mknod -m 600 "$base/dev/console" c 5 1
	l1_init >"$base/init"
	chmod 755 "$base/init"
	# Load order: modules.dep lists a module's dependencies so that loading
	# them last to first works (as modprobe does), then the module itself.
	local m line n=0 f seen=" "
	for m in "${modules[@]}"; do
		line=$(awk -v m="$m" '{ f = $1; sub(/:$/, "", f); b = f; sub(/.*\//, "", b); sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", b); gsub(/_/, "-", b); if (b == m) { print; exit } }' "$moddir/modules.dep")
		[ -n "$line" ] || die "no module $m in $pkg"
		local files=()
		read -r -a files <<<"${line/:/}"
		local i
		for ((i = ${#files[@]} - 1; i >= 1; i--)); do
			f=${files[i]}
			case $seen in *" $f "*) continue ;; esac
			seen+="$f "
			n=$((n + 1))
			copy_module "$moddir/$f" "$base/lib/nested-kvm/$(printf %02d "$n")-$(basename "${f%%.ko*}").ko"
		done
		f=${files[0]}
		case $seen in *" $f "*) continue ;; esac
		seen+="$f "
		n=$((n + 1))
		copy_module "$moddir/$f" "$base/lib/nested-kvm/$(printf %02d "$n")-$(basename "${f%%.ko*}").ko"
	done
	mkdir -p "$tmp/out"
	cp "$tmp/x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
	mkcpio "$base" "$tmp/out/base.cpio"
	echo "$pkg $ver" >"$tmp/out/source"
	rm -rf "$dir"
	mv "$tmp/out" "$dir"
	rm -rf "$tmp"
	trap - EXIT
	flock -u 9
	echo "$dir"
}

# copy_module SRC DST copies a kernel module, uncompressed (busybox
# insmod reads plain .ko files).
copy_module() {
	case $1 in
	*.ko.xz) xz -dc "$1" >"$2" ;;
	*.ko.zst) zstd -qdc "$1" >"$2" ;;
	*.ko.gz) gzip -dc "$1" >"$2" ;;
	*) cp "$1" "$2" ;;
	esac
}

# quote ARG prints ARG single-quoted for sh.
quote() {
	local s=${1//\'/\'\\\'\'}
	printf "'%s'" "$s"
}

# boot STAGE runs L1 with the payload in STAGE (files for /work, and
# /nested-kvm/run) and returns the payload's exit code; the console goes to
# stdout as it comes, and to STAGE.log.
boot() {
	local stage=$1 l1 token initrd st rc
	l1=$(prepare)
	token=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
	mkdir -p "$stage/nested-kvm"
	echo "$token" >"$stage/nested-kvm/token"
	initrd=$stage.initrd
	mkcpio "$stage" "$stage.payload.cpio"
	cat "$l1/base.cpio" "$stage.payload.cpio" >"$initrd"
	rm -f "$stage.payload.cpio"
	log "booting L1 ($(cat "$l1/source"), -m $mem -smp $smp, up to ${qemu_timeout}s)"
	set +e +o pipefail
	# QEMU's "TCG doesn't support requested feature" warnings are noise.
	timeout -k 10 "$qemu_timeout" qemu-system-x86_64 \
		-accel tcg,thread=multi -cpu EPYC,+svm -m "$mem" -smp "$smp" -M pc \
		-nodefaults -display none -serial stdio -monitor none -no-reboot \
		-kernel "$l1/vmlinuz" -initrd "$initrd" \
		-append 'console=ttyS0 panic=-1 loglevel=4 rdinit=/init' \
		</dev/null 2> >(grep -v "TCG doesn't support requested feature" >&2) |
		sed -u 's/\r//g' | tee "$stage.log"
	st=${PIPESTATUS[0]}
	set -e -o pipefail
	rm -f "$initrd"
	rc=$(sed -n "s/^.*nested-kvm-exit $token \([0-9]*\).*$/\1/p" "$stage.log" | tail -n 1)
	if [ -n "$rc" ]; then
		return "$rc"
	fi
	case $st in
	124 | 137) log "QEMU ran past ${qemu_timeout}s and was killed" && return 124 ;;
	*) log "L1 ended without reporting an exit code (QEMU exit $st)" && return 125 ;;
	esac
}

# direct says whether the host itself can boot Linux guests (and so runs
# things without QEMU).
direct() {
	[ "${NESTED_KVM_FORCE:-}" != 1 ] || return 1
	command -v go >/dev/null || return 1
	local why
	why=$(cd "$root" && go run ./vmm/linux/internal/canboot 2>/dev/null) && return 0
	log "${why:-no: cannot tell (vmm/linux/internal/canboot failed)}; using nested KVM under QEMU"
	return 1
}

cmd_run() {
	local share=
	while [ $# -gt 0 ]; do
		case $1 in
		--share)
			share=$2
			shift 2
			;;
		--)
			shift
			break
			;;
		-*) die "run: unknown option $1 (usage: run [--share DIR] -- CMD [ARG...])" ;;
		*) break ;;
		esac
	done
	[ $# -gt 0 ] || die "run: no command (usage: run [--share DIR] -- CMD [ARG...])"
	[ -z "$share" ] || [ -d "$share" ] || die "run: --share $share is not a directory"
	if direct; then
		log "the host has hardware virtualization: running directly"
		(cd "${share:-.}" && "$@")
		return
	fi
	local tmp stage a line
	tmp=$(mktemp -d "${TMPDIR:-/tmp}/nested-kvm.XXXXXX")
	# shellcheck disable=SC2064 # expand $tmp now: it is local
	trap "rm -rf '$tmp'" EXIT
	stage=$tmp/stage
	mkdir -p "$stage/work" "$stage/nested-kvm"
	[ -z "$share" ] || cp -a "$share/." "$stage/work/"
	line="exec"
	for a in "$@"; do
		line+=" $(quote "$a")"
	done
	printf '%s\n' "export PATH=/work:/bin" "$line" >"$stage/nested-kvm/run"
	boot "$stage"
}

# checks prints the microVM checks in vmm/linux: TestLinuxBoot,
# TestLinuxInit (cubicle init as PID 1, guest/init) and any Linux
# snapshot/restore test.
checks() {
	echo TestLinuxBoot
	echo TestLinuxInit
	sed -n 's/^func \(TestLinux[A-Za-z0-9_]*\(Snapshot\|Restore\)[A-Za-z0-9_]*\)(t \*testing\.T).*/\1/p' \
		"$root"/vmm/linux/*_test.go | sort -u
}

# checks_script prints the sh script (busybox or the host's) that runs the
# checks with the test binary and prebuilt files in the current directory.
# A check passes only if the test ran and passed: a skip is a failure here.
checks_script() {
	cat <<'EOF'
export CUBICLE_VMLINUX=$PWD/vmlinux CUBICLE_TESTINIT=$PWD/testinit CUBICLE_INIT_DISKS=$PWD/initdisks
failed=0
EOF
	local c
	for c in "$@"; do
		cat <<EOF
echo "=== nested-kvm check $c"
{ ./linux.test -test.run '^$c\$' -test.v -test.count=1 -test.timeout 5m; echo \$? >/tmp/$c.rc; } 2>&1 | tee /tmp/$c.out
if [ "\$(cat /tmp/$c.rc)" = 0 ] && grep -q '^--- PASS: $c ' /tmp/$c.out; then
	echo "nested-kvm-check: $c PASS"
else
	echo "nested-kvm-check: $c FAIL"
	failed=\$((failed + 1))
fi
EOF
	done
	cat <<'EOF'
exit $failed
EOF
}

cmd_checks() {
	command -v go >/dev/null || die "the checks need go to build the test binaries"
	local tmp stage work vmlinux list=() c
	mapfile -t list < <(checks)
	if [ "${#list[@]}" -lt 2 ]; then
		log "vmm/linux has no Linux snapshot/restore test yet: only TestLinuxBoot runs"
	fi
	# An L2 can wedge both of L1's CPUs (soft lockup), so that not even the
	# test's own timeout fires: QEMU's limit is what ends that. Unless set,
	# it is L1's boot plus each check's 5 minutes, with room to spare.
	[ -n "${NESTED_KVM_TIMEOUT:-}" ] || qemu_timeout=$((180 + 360 * ${#list[@]}))
	tmp=$(mktemp -d "${TMPDIR:-/tmp}/nested-kvm.XXXXXX")
	# shellcheck disable=SC2064 # expand $tmp now: it is local
	trap "rm -rf '$tmp'" EXIT
	stage=$tmp/stage
	work=$stage/work
	mkdir -p "$work"
	log "building the L2 guest kernel (vmm/linux/build.sh; cached)"
	vmlinux=$(bash "$root/vmm/linux/build.sh")
	cp "$vmlinux" "$work/vmlinux"
	log "building the test binaries"
	(cd "$root" && CGO_ENABLED=0 go test -c -o "$work/linux.test" ./vmm/linux &&
		CGO_ENABLED=0 go build -trimpath -o "$work/testinit" ./vmm/linux/internal/testinit &&
		CGO_ENABLED=0 go build -trimpath -o "$tmp/cubicle" ./cmd/cubicle &&
		go run ./vmm/linux/internal/initdisks -cubicle "$tmp/cubicle" "$work/initdisks")
	checks_script "${list[@]}" >"$work/checks.sh"
	# The verdicts come from the log: a failed check or a dead L1 is
	# counted below, not an early exit here.
	if direct; then
		log "the host has hardware virtualization: running the checks directly"
		(cd "$work" && sh ./checks.sh) | tee "$stage.log" || true
	else
		mkdir -p "$stage/nested-kvm"
		echo "exec sh ./checks.sh" >"$stage/nested-kvm/run"
		boot "$stage" || true
	fi
	local passed=0 failed=0 verdict
	for c in "${list[@]}"; do
		verdict=$(sed -n "s/^nested-kvm-check: $c \(PASS\|FAIL\)$/\1/p" "$stage.log" | tail -n 1)
		if [ "$verdict" = PASS ]; then
			echo "PASS $c"
			passed=$((passed + 1))
		else
			if [ "$verdict" = FAIL ]; then
				echo "FAIL $c"
			else
				echo "FAIL $c (no result: it did not run to the end)"
			fi
			failed=$((failed + 1))
		fi
	done
	echo "nested-kvm: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}

case ${1:-} in
"") cmd_checks ;;
run)
	shift
	cmd_run "$@"
	;;
prepare) prepare ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
*) die "unknown command $1 (run with --help)" ;;
esac
