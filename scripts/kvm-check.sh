#!/usr/bin/env bash
# kvm-check.sh: issue 10's figures for the microVM backend, on a host whose
# /dev/kvm has real VT-x/AMD-V, one line per figure:
#   - create → first commands.run("true") answered, p50/p99/mean at c=1 and
#     c=50 (`cubicle bench create`; target p50 ≤ 25 ms, p99 ≤ 60 ms at c=50);
#   - host memory per idle sandbox, amortised over 100 and over 1000
#     sandboxes (`cubicle bench idle`; target ≤ 8 MiB), two ways: the host's
#     MemAvailable before less after, over N; and the PSS of the sandboxes'
#     own host processes (the VMMs), summed, over N.
# It checks the host first (`cubicle doctor`'s kvm line: exit 2 where
# /dev/kvm cannot boot a Linux guest), builds cubicle, starts a private
# `cubicle serve` on loopback ports with its own data dir, address range and
# link prefix, measures, then kills every sandbox and stops the server,
# leaving nothing (checked, also at start). Figures come with a header line
# naming the machine: without it they are worthless.
#
#   scripts/kvm-check.sh [--isolation microvm|gvisor] [--baseline] [-n N]
#                        [-c 1,50] [--idle 100,1000] [options]
#
#   --isolation gvisor   the same figures with the gVisor backend (no KVM
#                        needed): checks the script itself anywhere
#   --baseline           after microvm, the same figures with gVisor in the
#                        same invocation, and the ratios microvm/gvisor
#   -n N                 creates per concurrency level (default 500)
#   -c LIST              concurrency levels of the creates (default 1,50)
#   --idle LIST          idle sandbox counts, ascending (default 100,1000):
#                        one population, measured as it grows
#   --idle-concurrency C creates in flight while making them (default 8)
#   --pool-size P        serve's --pool-size (default 4, serve's default)
#   --network-spares S   serve's --network-spares (default 64)
#   --settle S           quiet seconds before each reading (default 10)
#   --min-available-mb M stop making idle sandboxes when the host's
#                        MemAvailable falls under M (default 2048)
#   --reserve-disk-mb M  serve's --reserve-disk-mb (default: 10% of the data
#                        dir's disk, at least 8192: gVisor fallocates each
#                        sandbox's disk)
#   --link-prefix P      serve's device/namespace prefix (default kvmck)
#   --network-prefix C   serve's address range (default 100.72.0.0/16: apart
#                        from serve's default and the tests' 100.88.0.0/16)
#
# Admission is not what is measured: serve gets --overcommit-memory and
# --overcommit-cpu of 1000, and the idle sandboxes stop at the MemAvailable
# floor, at serve's disk reserve or at the first failed create, whichever
# comes first (a note line says which and how many were made).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "$0")/lib.sh"
as_root "$@"

isolation=microvm
baseline=false
create_n=500
conc=1,50
idle=100,1000
idle_c=8
pool=4
spares=64
settle=10
min_avail=2048
reserve_disk=
lp=kvmck
netpfx=100.72.0.0/16

usage() { sed -n '/^#   scripts/,/^# comes first/p' "$0" | sed 's/^# \{0,1\}//'; }
die() {
	echo "kvm-check: $*" >&2
	exit 1
}
need() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
	case $1 in
	--isolation) need "$@"; isolation=$2; shift ;;
	--baseline) baseline=true ;;
	-n) need "$@"; create_n=$2; shift ;;
	-c) need "$@"; conc=$2; shift ;;
	--idle) need "$@"; idle=$2; shift ;;
	--idle-concurrency) need "$@"; idle_c=$2; shift ;;
	--pool-size) need "$@"; pool=$2; shift ;;
	--network-spares) need "$@"; spares=$2; shift ;;
	--settle) need "$@"; settle=$2; shift ;;
	--min-available-mb) need "$@"; min_avail=$2; shift ;;
	--reserve-disk-mb) need "$@"; reserve_disk=$2; shift ;;
	--link-prefix) need "$@"; lp=$2; shift ;;
	--network-prefix) need "$@"; netpfx=$2; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument $1" ;;
	esac
	shift
done
case $isolation in
microvm | gvisor) ;;
*) die "--isolation $isolation: microvm or gvisor" ;;
esac
if $baseline && [ "$isolation" = gvisor ]; then
	die "--baseline compares microvm with gvisor: it goes with --isolation microvm"
fi
[[ $create_n =~ ^[1-9][0-9]*$ ]] || die "-n $create_n: a positive count"
[[ $conc =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "-c $conc: positive counts, comma-separated"
[[ $idle =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--idle $idle: positive counts, comma-separated"
[[ $settle =~ ^[0-9]+$ ]] || die "--settle $settle: whole seconds"
[[ $lp =~ ^[a-z]+$ ]] || die "--link-prefix $lp: lower-case letters"

data_parent=/var/tmp # on disk, not a tmpfs: the data dir holds a template copy
if [ -z "$reserve_disk" ]; then
	reserve_disk=$(df -Pm "$data_parent" | awk 'NR==2 { r = int($2 / 10); print (r < 8192 ? 8192 : r) }')
fi

bash "$REPO/scripts/build.sh"
bin=$REPO/bin/cubicle

# The host first: a microVM needs /dev/kvm that boots Linux (VT-x/AMD-V,
# not PVM), which is what doctor's kvm line says with "ok".
kvm_line=$("$bin" doctor 2>&1 | awk '$1 == "kvm"') || true
kvm_status=$(awk '{ print $2 }' <<<"$kvm_line")
kvm_detail=$(sed -E 's/^kvm +[a-z]+ +//' <<<"$kvm_line")
if [ "$isolation" = microvm ] && [ "$kvm_status" != ok ]; then
	echo "kvm-check: refused: this host's /dev/kvm cannot boot a Linux guest, so no microVM figure can be measured here." >&2
	echo "kvm-check: cubicle doctor: ${kvm_line:-no kvm line}" >&2
	echo "kvm-check: run it where \`cubicle doctor\` says \"kvm ok\" (real VT-x/AMD-V), or pass --isolation gvisor to check the script itself with the gVisor backend (no microVM figures)." >&2
	exit 2
fi

# The machine, because figures without it are worthless.
cpu=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
sockets=$(grep '^physical id' /proc/cpuinfo | sort -u | wc -l)
memtotal=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
if grep -qw hypervisor /proc/cpuinfo; then
	virt="a virtual machine ($(systemd-detect-virt 2>/dev/null || echo "hypervisor flag set"))"
else
	virt="bare metal"
fi
rev=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
printf 'machine %s | %s CPUs online (%s sockets) | %s | kernel %s | %s | kvm: %s %s\n' \
	"$cpu" "$(nproc)" "$sockets" "$memtotal" "$(uname -r)" "$virt" "${kvm_status:-none}" "$kvm_detail"
printf 'run %s | cubicle %s (%s) | isolation %s%s | -n %s -c %s, idle %s (-c %s), pool %s, spares %s, settle %ss | load %s\n' \
	"$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$("$bin" version | awk '{ print $2 }')" "$rev" "$isolation" \
	"$($baseline && echo " + gvisor baseline")" "$create_n" "$conc" "$idle" "$idle_c" "$pool" "$spares" "$settle" \
	"$(cut -d' ' -f1-3 /proc/loadavg)"
[ "$isolation" = microvm ] || echo "note: isolation gvisor: these are gVisor figures, none of them a microVM figure"

work=$(mktemp -d "${TMPDIR:-/tmp}/kvm-check.XXXXXX")
serve_pid=
serving_iso=
data=
failed=false

# leftovers prints what a server with link prefix $lp (and data dir $1,
# when given) left on the host: devices, namespaces, pins, mounts,
# processes holding files in the data dir. Nothing printed: nothing left.
leftovers() {
	local d=${1:-} l
	l=$(ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep -E "^${lp}[0-9]+$" | head -5 | tr '\n' ' ') || true
	[ -z "$l" ] || echo "network devices: $l"
	l=$(find /run/netns -maxdepth 1 -regextype posix-extended -regex "/run/netns/${lp}[0-9]+" -printf '%f ' 2>/dev/null | cut -d' ' -f1-5) || true
	[ -z "$l" ] || echo "network namespaces: $l"
	[ ! -e "/sys/fs/bpf/cubicle/$lp" ] || echo "eBPF pins: /sys/fs/bpf/cubicle/$lp"
	# Earlier runs' data dirs, and anything still using them.
	local pat="$data_parent/cubicle-kvmcheck-"
	[ -z "$d" ] || pat=$d
	l=$(awk -v p="$pat" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo | head -5 | tr '\n' ' ')
	[ -z "$l" ] || echo "mounts: $l"
	l=$(find /proc/[0-9]*/fd -lname "$pat*" 2>/dev/null | cut -d/ -f3 | sort -u | head -5 | tr '\n' ' ') || true
	[ -z "$l" ] || echo "processes with files open there: $l"
	# The pattern comes from a file: grep's own command line must not
	# hold it (grep reads its own /proc/PID/cmdline too).
	l=$(grep -lsF -f <(printf '%s\n' "$pat") /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | grep -vx "$$" | head -5 | tr '\n' ' ') || true
	[ -z "$l" ] || echo "processes naming it: $l"
	if [ -z "$d" ]; then
		l=$(compgen -G "$pat*" | head -5 | tr '\n' ' ') || true
		[ -z "$l" ] || echo "data dirs: $l"
	elif [ -e "$d" ]; then
		echo "data dir: $d"
	fi
}

# stop_serve kills every sandbox the server has, stops it as an operator
# does (SIGTERM: with none left it removes its pins and NAT table itself),
# removes the data dir and says what is left (nothing, or it fails the run).
stop_serve() {
	[ -n "$data" ] || return 0
	if [ -n "$serve_pid" ]; then
		local ids
		ids=$("$bin" sandbox list 2>/dev/null | awk 'NR > 1 { print $1 }') || true
		if [ -n "$ids" ]; then
			echo "kvm-check: killing $(wc -w <<<"$ids") sandboxes left" >&2
			# shellcheck disable=SC2086 # one argument per ID
			printf '%s\n' $ids | xargs -r -n 50 "$bin" sandbox kill >&2 || true
		fi
		kill -TERM "$serve_pid" 2>/dev/null || true
		local _
		for _ in $(seq 600); do
			kill -0 "$serve_pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$serve_pid" 2>/dev/null; then
			echo "kvm-check: serve did not stop within 60 s of SIGTERM: killed" >&2
			kill -KILL "$serve_pid"
			failed=true
		fi
		if ! wait "$serve_pid"; then
			echo "kvm-check: serve exited non-zero; its log ends:" >&2
			tail -n 20 "$work/serve.log" >&2
			failed=true
		fi
	fi
	serve_pid=
	# runsc keeps an empty network namespace mounted in its state root
	# (one per concurrent first use), which would pin the data dir.
	local m=$data/gvisor/runsc/null-netns
	while [ -e "$m" ] && umount -l "$m" 2>/dev/null; do :; done
	local left
	left=$(leftovers "$data")
	if grep -q '^processes' <<<"$left"; then
		# Sandboxes outlived a server that died: a server started again
		# on this data dir adopts them, and can kill them.
		echo "kvm-check: sandboxes outlived the server; kept $data: start \`$bin serve --isolation $serving_iso --data-dir $data --link-prefix $lp --network-prefix $netpfx\`, kill them through its API, stop it, then remove the data dir" >&2
	else
		rm -rf "$data"
		left=$(leftovers "$data")
	fi
	if [ -n "$left" ]; then
		echo "kvm-check: LEFT after stopping serve:" >&2
		printf '  %s\n' "${left//$'\n'/$'\n'  }" >&2
		failed=true
	else
		echo "clean after $1: no sandboxes, processes, mounts, devices, namespaces, pins or data dir left"
	fi
	data=
}

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	stop_serve interrupted || true
	rm -rf "$work"
	if $failed && [ "$rc" = 0 ]; then
		rc=1
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

left=$(leftovers)
if [ -n "$left" ]; then
	echo "kvm-check: the host is not clean for link prefix $lp (an earlier run, or another server with this prefix: pick --link-prefix):" >&2
	printf '  %s\n' "${left//$'\n'/$'\n'  }" >&2
	exit 1
fi
echo "clean start: no $lp devices, namespaces or pins, no kvm-check data dirs, mounts or processes"

# start_serve ISOLATION starts a private server and waits until it serves
# that backend.
start_serve() {
	local iso=$1
	serving_iso=$iso
	data=$(mktemp -d "$data_parent/cubicle-kvmcheck-XXXXXX")
	E2B_API_KEY=$("$bin" keys create --data-dir "$data" --name kvm-check 2>/dev/null)
	export E2B_API_KEY
	if [ "$iso" = microvm ]; then
		# The guest kernel, cached by its inputs; serve would build it
		# too, without saying much.
		bash "$REPO/vmm/linux/build.sh" >/dev/null
	fi
	"$bin" serve --isolation "$iso" --data-dir "$data" \
		--api-addr 127.0.0.1:0 --proxy-addr 127.0.0.1:0 --ready-file "$data/ready" \
		--network-prefix "$netpfx" --link-prefix "$lp" \
		--pool-size "$pool" --network-spares "$spares" \
		--overcommit-memory 1000 --overcommit-cpu 1000 --reserve-disk-mb "$reserve_disk" \
		--log-level warn >"$work/serve.log" 2>&1 &
	serve_pid=$!
	# The first start builds the base template (a debootstrap when the
	# cache is cold) and, for microvm, its image and snapshot.
	local _
	for _ in $(seq 18000); do
		[ -s "$data/ready" ] && break
		if ! kill -0 "$serve_pid" 2>/dev/null; then
			wait "$serve_pid" || true
			serve_pid=
			echo "kvm-check: cubicle serve --isolation $iso exited before serving; its log ends:" >&2
			tail -n 30 "$work/serve.log" >&2
			exit 1
		fi
		sleep 0.1
	done
	[ -s "$data/ready" ] || die "cubicle serve not ready after 30 minutes"
	E2B_API_URL=http://$(sed -n 's/^api=//p' "$data/ready")
	E2B_SANDBOX_URL=http://$(sed -n 's/^proxy=//p' "$data/ready")
	export E2B_API_URL E2B_SANDBOX_URL
	local health
	health=$(curl -fsS "$E2B_API_URL/health") || die "GET /health failed"
	grep -q "\"isolation\":\"$iso\"" <<<"$health" || die "serve reports $health, not isolation $iso"
}

# jnum FILE KEY prints KEY's number from an indented JSON object of
# cubicle's (one "key": value per line).
jnum() { sed -nE "s/^ *\"$2\": *(-?[0-9.eE+-]+),?$/\1/p" "$1" | head -n1; }

declare -A fig
# figure ISOLATION NAME VALUE DETAIL: prints the line and keeps the value
# for the ratios.
figure() {
	fig[$1:$2]=$3
	echo "figure $2 $3 isolation=$1 $4"
}

measure() {
	local iso=$1 c f j tgt
	start_serve "$iso"
	# Warm-up, not counted: a template's first sandboxes fill caches (and
	# for microvm its snapshot is made at first use); then the pool refills.
	"$bin" bench create -n 5 -c 1 --cold-n 0 --json >/dev/null 2>"$work/warmup.err" ||
		{ cat "$work/warmup.err" >&2; die "warm-up creates failed"; }
	for c in ${conc//,/ }; do
		sleep "$settle"
		j=$work/create-$iso-c$c.json
		"$bin" bench create -n "$create_n" -c "$c" --cold-n 0 --json >"$j" 2>"$work/bench.err" ||
			{ cat "$work/bench.err" >&2; die "bench create -c $c failed"; }
		local detail
		detail="n=$create_n errors=$(jnum "$j" errors)"
		for f in p50 p99 mean; do
			tgt=
			if [ "$iso" = microvm ]; then
				case $f in
				p50) tgt=" (target ≤ 25)" ;;
				p99) tgt=" (target ≤ 60)" ;;
				mean) case $c in
					1) tgt=" (CubeSandbox publishes 47.8 avg at c=1, 96 vCPUs)" ;;
					50) tgt=" (CubeSandbox publishes 276 avg at c=50, 96 vCPUs)" ;;
					esac ;;
				esac
			fi
			figure "$iso" "create_first_run_c${c}_${f}_ms" "$(jnum "$j" "create_${f}_ms")" "$detail$tgt"
		done
		if [ "$(jnum "$j" errors)" != 0 ]; then
			echo "note: $iso -c $c: first error: $(sed -nE 's/^ *"first_error": *"(.*)",?$/\1/p' "$j")"
		fi
	done
	sleep "$settle"
	j=$work/idle-$iso.json
	if ! "$bin" bench idle -n "$idle" -c "$idle_c" --settle "${settle}s" --min-available-mb "$min_avail" \
		--data-dir "$data" --json >"$j" 2>"$work/bench.err"; then
		cat "$work/bench.err" >&2
		[ -s "$j" ] || die "bench idle failed"
		failed=true
	fi
	# One step per line: target n mem_per_sb pss_per_sb processes pss_error.
	awk -F': *' '
		function v(s) { sub(/,$/, "", s); gsub(/"/, "", s); return s }
		/"steps"/ { in_steps = 1 }
		in_steps && /"target"/ { if (t != "") print t, n, m, p, pr, e; t = v($2); e = "-" }
		in_steps && /"n"/ { n = v($2) }
		in_steps && /"mem_available_per_sandbox_mib"/ { m = v($2) }
		in_steps && /"pss_per_sandbox_mib"/ { p = v($2) }
		in_steps && /"processes"/ { pr = v($2) }
		in_steps && /"pss_error"/ { e = "error" }
		in_steps && /^  \]/ { in_steps = 0 }
		END { if (t != "") print t, n, m, p, pr, e }
	' "$j" >"$work/steps"
	local target n mem pss procs err note
	while read -r target n mem pss procs err; do
		note=
		[ "$n" = "$target" ] || note=" (asked $target; see the stopped note)"
		tgt=
		if [ "$iso" = microvm ]; then
			tgt=" (target ≤ 8"
			[ "$target" = 1000 ] && tgt="$tgt; CubeSandbox ~25 MB at 1000"
			tgt="$tgt)"
		fi
		figure "$iso" "idle_mem_available_per_sandbox_n${target}_mib" "$(printf '%.2f' "${mem:-0}")" \
			"n=$n$note$tgt [host MemAvailable before − after, over n]"
		if awk -v m="${mem:-0}" 'BEGIN { exit !(m < 0) }'; then
			echo "note: $iso idle n=$n: MemAvailable rose while the sandboxes were made: something else on this host freed memory, so that figure is noise here (the PSS one is not)"
		fi
		if [ "$err" = error ]; then
			echo "note: $iso idle n=$n: PSS not measured: $(sed -nE 's/^ *"pss_error": *"(.*)",?$/\1/p' "$j" | head -n1)"
		else
			figure "$iso" "idle_pss_per_sandbox_n${target}_mib" "$(printf '%.2f' "${pss:-0}")" \
				"n=$n processes=$procs$note$tgt [sum of the sandboxes' host processes' PSS, over n]"
		fi
	done <"$work/steps"
	local stopped
	stopped=$(sed -nE 's/^ *"stopped": *"(.*)",?$/\1/p' "$j")
	[ -z "$stopped" ] || echo "note: $iso idle: stopped early: $stopped"
	stop_serve "$iso"
}

measure "$isolation"
if $baseline; then
	measure gvisor
	for k in "${!fig[@]}"; do
		[ "${k%%:*}" = microvm ] || continue
		name=${k#*:}
		b=${fig[gvisor:$name]:-}
		[ -n "$b" ] || continue
		echo "ratio $name microvm/gvisor $(awk -v a="${fig[$k]}" -v b="$b" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }')"
	done | sort
fi
$failed && exit 1
exit 0
