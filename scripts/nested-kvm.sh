#!/usr/bin/env bash
# nested-kvm.sh: a /dev/kvm with hardware virtualization on any machine,
# by running an L1 Linux guest under QEMU in software emulation (TCG) with
# an emulated AMD CPU that has SVM (-cpu EPYC,+svm). Inside L1, Debian's
# kvm_amd gives a real-looking /dev/kvm with nested paging, on which
# cubicle's VMM boots a Linux guest (L2). Works where the host has no
# /dev/kvm, a PVM one, or a real one (docs/STATUS.md has what was seen with it).
#
#   scripts/nested-kvm.sh [--uncovered]
#       runs the tests listed in scripts/nested-kvm.tests (package, -run
#       regex, timeout, what they need: a Linux-booting /dev/kvm or any
#       usable one), each on the host where its /dev/kvm has what the line
#       needs (vmm/linux/internal/canboot says), else all together in one
#       L1. One "PASS line" / "FAIL line: why" per line, ending with
#       exactly one line "nested-kvm: N passed, M failed"; exits 1 if
#       M > 0. Under emulation a line that fails is run once more in a
#       fresh L1, and the output says so ("passed only on a second run");
#       failing twice is a failure. A line kept from running by an earlier
#       one that wedged L1 runs in the next L1 without losing its try.
#       With --uncovered (scripts/test.sh), lines the host can run are only
#       named ("HOST ..."): its go test run covers them.
#   scripts/nested-kvm.sh run [--share DIR] -- CMD [ARG...]
#       boots L1 with DIR's files (a copy, read-write, in L1's memory) at
#       /work, runs CMD there as root, streams L1's serial console to
#       stdout and exits with CMD's exit code (124 if QEMU timed out, 125
#       if L1 ended without reporting one). CMD runs under busybox: no go,
#       no gcc; test binaries are built beforehand (CGO_ENABLED=0 go test
#       -c), the L2 kernel comes from vmm/linux/build.sh, and the hooks
#       $CUBICLE_VMLINUX, $CUBICLE_TESTINIT and $CUBICLE_TESTGUEST_DIR
#       point the tests at prebuilt files.
#   scripts/nested-kvm.sh without-kvm
#       runs go test on the packages of scripts/nested-kvm.tests where
#       /dev/kvm has no driver (ENODEV, as on a kernel that is itself a PVM
#       guest): every test that needs KVM must skip there, none fail.
#   scripts/nested-kvm.sh prepare
#       builds (or finds) the cached L1 kernel and base initramfs and
#       prints their directory.
#
# Environment: NESTED_KVM_TIMEOUT (seconds QEMU may run, default 1800 for
# run, and for the tests 180 + each line's timeout + 60 per line),
# NESTED_KVM_TESTS (the tests file, default scripts/nested-kvm.tests),
# NESTED_KVM_MEM (default 4G), NESTED_KVM_SMP (default 2), NESTED_KVM_FORCE=1
# (use QEMU even where the host could run a line directly),
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
# A host's usual files that tests expect (vmm/jailer bind-mounts
# /etc/hostname into its jail).
mkdir -p /etc
echo l1 >/etc/hostname
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

# host_can NEEDS says whether the host itself can run tests that need
# NEEDS (linux: a Linux guest boots on its /dev/kvm; kvm: the VMM can use
# its /dev/kvm, PVM included), as vmm/linux/internal/canboot answers;
# NESTED_KVM_FORCE=1 says no. The answer is asked once.
host_can() {
	[ "${NESTED_KVM_FORCE:-}" != 1 ] || return 1
	local var=host_$1 arg='' why
	if [ -z "${!var:-}" ]; then
		[ "$1" = kvm ] && arg=-kvm
		if ! command -v go >/dev/null; then
			why="no: cannot tell (no go command to run vmm/linux/internal/canboot)"
		elif why=$(cd "$root" && go run ./vmm/linux/internal/canboot $arg 2>&1); then
			why=yes
		fi
		printf -v "$var" '%s' "${why:-no: cannot tell (vmm/linux/internal/canboot failed)}"
		[ "${!var}" = yes ] || log "host, for tests that need $1: ${!var}"
	fi
	[ "${!var}" = yes ]
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
	if host_can linux; then
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

# The lines of the tests file (see scripts/nested-kvm.tests), by index.
t_pkg=() t_run=() t_timeout=() t_needs=() t_skip=()

# seconds DURATION prints a Go duration of the form 90s, 5m or 1h in
# seconds.
seconds() {
	case $1 in
	*[!0-9smh]* | [!0-9]* | *[0-9]) return 1 ;;
	*s) echo "${1%s}" ;;
	*m) echo $((${1%m} * 60)) ;;
	*h) echo $((${1%h} * 3600)) ;;
	*) return 1 ;;
	esac
}

# read_tests reads the tests file, refusing a malformed line.
read_tests() {
	local file=$1 pkg run timeout needs skip extra n=0
	[ -f "$file" ] || die "no tests file $file"
	while read -r pkg run timeout needs skip extra; do
		n=$((n + 1))
		case $pkg in "" | \#*) continue ;; esac
		if [ -z "$needs" ] || [ -n "$extra" ]; then
			die "$file:$n: want: package regex timeout needs [skip-regex]"
		fi
		case $needs in linux | kvm) ;; *) die "$file:$n: needs is linux or kvm, not $needs" ;; esac
		seconds "$timeout" >/dev/null || die "$file:$n: timeout $timeout is not like 90s, 5m or 1h"
		[ -d "$root/$pkg" ] || die "$file:$n: no package directory $pkg"
		t_pkg+=("$pkg") t_run+=("$run") t_timeout+=("$timeout") t_needs+=("$needs") t_skip+=("$skip")
	done <"$file"
	[ ${#t_pkg[@]} -gt 0 ] || die "$file lists no tests"
}

# label I names line I of the tests file in the output.
label() { echo "${t_pkg[$1]} -run ${t_run[$1]}${t_skip[$1]:+ -skip ${t_skip[$1]}}"; }

# checks_script I... prints the sh script (busybox's in L1, or the
# host's) that runs lines I... with the work directory (test binaries in
# <package>/, prebuilt files in prebuilt/) as the current directory. Each
# line prints nested-kvm-start and then nested-kvm-check PASS or FAIL with
# a nested-kvm-why; a line passes only if its binary exited 0, some test
# passed and none skipped (a skip here means the test ran nowhere).
checks_script() {
	cat <<'EOF2'
top=$PWD
export CUBICLE_VMLINUX=$top/prebuilt/vmlinux CUBICLE_TESTINIT=$top/prebuilt/testinit
export CUBICLE_TESTGUEST_DIR=$top/prebuilt/testguest CUBICLE_INIT_DISKS=$top/prebuilt/initdisks
EOF2
	local i args
	for i in "$@"; do
		args="-test.run $(quote "${t_run[i]}")"
		[ -z "${t_skip[i]}" ] || args+=" -test.skip $(quote "${t_skip[i]}")"
		args+=" -test.timeout ${t_timeout[i]} -test.v -test.count=1"
		cat <<EOF2
echo "nested-kvm-start: $i"
cd "\$top/${t_pkg[i]}"
{ ./pkg.test $args; echo \$? >/tmp/nested-kvm-$i.rc; } 2>&1 | tee /tmp/nested-kvm-$i.out
cd "\$top"
rc=\$(cat /tmp/nested-kvm-$i.rc)
out=/tmp/nested-kvm-$i.out
if [ "\$rc" != 0 ]; then
	why="exit \$rc\$(sed -n 's/^--- FAIL: \([^ ]*\).*/ \1/p' \$out | head -n 5 | tr -d '\n')"
elif ! grep -q '^--- PASS: ' \$out; then
	why="no test ran"
elif grep -q -- '--- SKIP: ' \$out; then
	why="skipped:\$(sed -n 's/^ *--- SKIP: \([^ ]*\).*/ \1/p' \$out | head -n 5 | tr -d '\n')"
else
	why=
fi
if [ -z "\$why" ]; then
	echo "nested-kvm-check: $i PASS"
else
	echo "nested-kvm-why: $i \$why"
	echo "nested-kvm-check: $i FAIL"
fi
EOF2
	done
}

# verdict LOG I prints PASS or FAIL for line I from a log, or nothing.
verdict() { sed -n "s/^.*nested-kvm-check: $2 \(PASS\|FAIL\)\$/\1/p" "$1" | tail -n 1; }
why() { sed -n "s/^.*nested-kvm-why: $2 //p" "$1" | tail -n 1; }
started() { grep -q "nested-kvm-start: $2\$" "$1"; }

# cmd_checks runs the tests file's lines: each on the host where its
# /dev/kvm has what the line needs, else inside L1 (see the tests file for
# the retry rule). With --uncovered, lines the host can run are left to
# scripts/test.sh's go test, which runs them already.
cmd_checks() {
	local uncovered=false
	case ${1:-} in
	--uncovered) uncovered=true ;;
	"") ;;
	*) die "unknown option $1 (run with --help)" ;;
	esac
	command -v go >/dev/null || die "the checks need go to build the test binaries"
	read_tests "${NESTED_KVM_TESTS:-$root/scripts/nested-kvm.tests}"
	local n=${#t_pkg[@]} i host=() l1=() covered=() pkgs=() p needs_linux=false needs_kvm=false
	for ((i = 0; i < n; i++)); do
		if host_can "${t_needs[i]}"; then
			if $uncovered; then
				covered+=("$i")
				continue
			fi
			host+=("$i")
		else
			l1+=("$i")
		fi
		[ "${t_needs[i]}" = linux ] && needs_linux=true
		[ "${t_needs[i]}" = kvm ] && needs_kvm=true
		case " ${pkgs[*]} " in *" ${t_pkg[i]} "*) ;; *) pkgs+=("${t_pkg[i]}") ;; esac
	done
	for i in "${covered[@]}"; do
		echo "HOST $(label "$i") (this host's /dev/kvm runs it: scripts/test.sh's go test does)"
	done
	local tmp stage work
	tmp=$(mktemp -d "${TMPDIR:-/tmp}/nested-kvm.XXXXXX")
	# shellcheck disable=SC2064 # expand $tmp now: it is local
	trap "rm -rf '$tmp'" EXIT
	stage=$tmp/stage
	work=$stage/work
	mkdir -p "$work/prebuilt"
	# The L2 kernel and testinit are what Linux-guest tests need, the C
	# test guest what the others need: nothing in L1 can build them.
	if $needs_linux; then
		log "building the L2 guest kernel (vmm/linux/build.sh; cached)"
		cp "$(bash "$root/vmm/linux/build.sh")" "$work/prebuilt/vmlinux"
		(cd "$root" && CGO_ENABLED=0 go build -trimpath -o "$work/prebuilt/testinit" ./vmm/linux/internal/testinit)
		# TestLinuxInit's template image and sandbox disk, with a static
		# cubicle as the guest's init: L1 has no mkfs.ext4.
		(cd "$root" && CGO_ENABLED=0 go build -trimpath -o "$tmp/cubicle" ./cmd/cubicle &&
			go run ./vmm/linux/internal/initdisks -cubicle "$tmp/cubicle" "$work/prebuilt/initdisks")
	fi
	if $needs_kvm; then
		(cd "$root" && go run ./vmm/testguest/internal/prebuild "$work/prebuilt/testguest")
	fi
	for p in "${pkgs[@]}"; do
		log "building the tests of $p"
		mkdir -p "$work/$p"
		(cd "$root" && CGO_ENABLED=0 go test -c -o "$work/$p/pkg.test" "./$p")
		[ ! -d "$root/$p/testdata" ] || cp -a "$root/$p/testdata" "$work/$p/"
	done
	local passed=0 failed=0 retried=()
	declare -A result reason tries
	if [ ${#host[@]} -gt 0 ]; then
		# On hardware a failure is real: no second run.
		log "running ${#host[@]} line(s) on the host, whose /dev/kvm can"
		checks_script "${host[@]}" >"$work/host.sh"
		(cd "$work" && sh ./host.sh) >"$stage.host.log" 2>&1 || true
		cat "$stage.host.log"
		for i in "${host[@]}"; do
			result[$i]=$(verdict "$stage.host.log" "$i")
			reason[$i]=$(why "$stage.host.log" "$i")
			[ -n "${result[$i]}" ] || reason[$i]="did not run to the end"
		done
	fi
	# L1: every pending line runs in one boot; a line that fails is run
	# once more in a fresh L1; a line an earlier one kept from running
	# (L1 died, or QEMU's limit ended it) runs in the next boot without
	# losing its try. Every boot spends at least one try, so this ends.
	local pending=("${l1[@]}") next boots=0 any limit
	while [ ${#pending[@]} -gt 0 ]; do
		boots=$((boots + 1))
		# An L2 can wedge both of L1's CPUs (soft lockup) so that not even
		# the test's own timeout fires: QEMU's limit ends that. Unless
		# set, it is L1's boot plus each line's timeout and a minute.
		if [ -z "${NESTED_KVM_TIMEOUT:-}" ]; then
			qemu_timeout=180
			for i in "${pending[@]}"; do
				qemu_timeout=$((qemu_timeout + $(seconds "${t_timeout[i]}") + 60))
			done
		fi
		limit=$qemu_timeout
		checks_script "${pending[@]}" | sed '1a export CUBICLE_TEST_EMULATED=1' >"$work/checks.sh"
		mkdir -p "$stage/nested-kvm"
		echo "exec sh ./checks.sh" >"$stage/nested-kvm/run"
		log "L1 boot $boots: ${#pending[@]} line(s)"
		boot "$stage" || true
		cp "$stage.log" "$stage.log.$boots"
		any=false
		for i in "${pending[@]}"; do
			started "$stage.log" "$i" && any=true
		done
		next=()
		for i in "${pending[@]}"; do
			local v
			v=$(verdict "$stage.log" "$i")
			if [ "$v" = PASS ]; then
				result[$i]=PASS
				continue
			fi
			if [ "$v" = FAIL ]; then
				reason[$i]=$(why "$stage.log" "$i")
			elif started "$stage.log" "$i"; then
				reason[$i]="did not run to the end (L1 died, or QEMU's ${limit}s limit ended it)"
			elif ! $any; then
				reason[$i]="L1 ran no test (it did not boot, or died first)"
			else
				next+=("$i") # kept from running by an earlier line: no try spent
				continue
			fi
			tries[$i]=$((${tries[$i]:-0} + 1))
			if [ "${tries[$i]}" -lt 2 ]; then
				echo "nested-kvm: $(label "$i") failed (${reason[$i]}): one more run in a fresh L1"
				next+=("$i")
			else
				result[$i]=FAIL
			fi
		done
		pending=("${next[@]}")
	done
	for i in "${host[@]}" "${l1[@]}"; do
		if [ "${result[$i]:-}" = PASS ]; then
			if [ "${tries[$i]:-0}" -gt 0 ]; then
				echo "PASS $(label "$i") (on its second run; the first: ${reason[$i]})"
				retried+=("$(label "$i")")
			else
				echo "PASS $(label "$i")"
			fi
			passed=$((passed + 1))
		else
			echo "FAIL $(label "$i"): ${reason[$i]:-no result}"
			failed=$((failed + 1))
		fi
	done
	[ ${#retried[@]} -eq 0 ] || echo "nested-kvm: ${#retried[@]} passed only on a second run in a fresh L1: ${retried[*]}"
	echo "nested-kvm: $passed passed, $failed failed"
	[ "$failed" -eq 0 ]
}

# cmd_without_kvm runs the tests file's packages with go test where
# /dev/kvm is a node with no driver behind it (a misc minor nobody
# registers: open fails with ENODEV, as on a kernel that is itself a PVM
# guest), in a private mount namespace: every test that needs KVM must
# skip, saying why; none may fail for it.
cmd_without_kvm() {
	command -v go >/dev/null || die "without-kvm needs go"
	command -v unshare >/dev/null || die "without-kvm needs unshare (util-linux)"
	read_tests "${NESTED_KVM_TESTS:-$root/scripts/nested-kvm.tests}"
	local pkgs=() p
	for p in "${t_pkg[@]}"; do
		case " ${pkgs[*]} " in *" ./$p "*) ;; *) pkgs+=("./$p") ;; esac
	done
	log "go test ${pkgs[*]} with a /dev/kvm that has no driver (ENODEV)"
	# shellcheck disable=SC2016 # expanded by the inner bash
	(cd "$root" && unshare -m --propagation private bash -c '
		set -e
		node=$(mktemp -u /tmp/nested-kvm-nokvm.XXXXXX)
		mknod "$node" c 10 250
		mount --bind "$node" /dev/kvm
		rm -f "$node"
		exec go test -count=1 "$@"' _ "${pkgs[@]}")
}

case ${1:-} in
"" | --uncovered) cmd_checks "$@" ;;
without-kvm) cmd_without_kvm ;;
run)
	shift
	cmd_run "$@"
	;;
prepare) prepare ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
*) die "unknown command $1 (run with --help)" ;;
esac
