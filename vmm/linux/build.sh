#!/usr/bin/env bash
# Builds the cubicle guest kernel: vmlinux from Debian's linux-source
# package, configured with allnoconfig plus the fragment `config` beside
# this script, into a cache directory keyed by a hash of the fragment and
# the source version (the same key linux_test.go computes).
#
#   vmm/linux/build.sh [cache-dir]    prints the path of vmlinux
#   vmm/linux/build.sh --key          prints the cache key only
#
# The cache directory defaults to ${CUBICLE_CACHE_DIR:-/var/cache/cubicle}/linux.
# A build takes about 3.5 minutes on 2 cores; a cached kernel is returned at
# once. linux-source-6.1 and the build tools are installed with apt-get when
# missing (root needed for that only).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
config=$here/config
version=6.1
cache=${1:-${CUBICLE_CACHE_DIR:-/var/cache/cubicle}/linux}
key=$( { cat "$config"; echo "linux-source-$version"; } | sha256sum | cut -c1-16)
if [ "${1:-}" = --key ]; then
	echo "$key"
	exit 0
fi
out=$cache/$key
if [ -f "$out/vmlinux" ]; then
	echo "$out/vmlinux"
	exit 0
fi

tarball=/usr/src/linux-source-$version.tar.xz
if [ ! -f "$tarball" ] || ! command -v bc flex bison >/dev/null; then
	echo "build.sh: installing linux-source-$version and the build tools" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		"linux-source-$version" bc flex bison libelf-dev libssl-dev make gcc >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/cubicle-linux.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build.sh: unpacking $tarball" >&2
tar -C "$work" -xf "$tarball"
src=$work/linux-source-$version
make -C "$src" O="$work/build" KCONFIG_ALLCONFIG="$config" allnoconfig >&2
# An option whose dependencies the fragment lacks vanishes silently: check.
while read -r line; do
	case $line in
	CONFIG_*=*)
		grep -qx -- "$line" "$work/build/.config" || {
			echo "build.sh: $line did not survive allnoconfig (a dependency is missing from $config)" >&2
			exit 1
		}
		;;
	esac
done <"$config"
echo "build.sh: building vmlinux (a few minutes)" >&2
make -C "$src" O="$work/build" -j"$(nproc)" vmlinux >&2
mkdir -p "$out"
cp "$work/build/.config" "$out/config"
cp "$work/build/vmlinux" "$out/vmlinux.tmp"
mv "$out/vmlinux.tmp" "$out/vmlinux"
echo "$out/vmlinux"
