# Shared by the scripts in this folder: paths, versions and the root check.
# Sourced, not run.

# The gVisor release cubicle is tested with. runsc must be built static: a
# cgo build fails at sandbox start.
RUNSC_MODULE=gvisor.dev/gvisor/runsc
RUNSC_VERSION=v0.0.0-20260905035102-160fafc42237
STATICCHECK_VERSION=v0.8.2

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CUBICLE_CACHE_DIR=${CUBICLE_CACHE_DIR:-/var/cache/cubicle}
export PATH=/usr/local/go/bin:$PATH:$(go env GOPATH 2>/dev/null || echo /root/go)/bin

say() { printf '\033[1m[cubicle]\033[0m %s\n' "$*" >&2; }

# as_root re-runs the calling script as root: sandboxes need namespaces,
# cgroups and mounts.
as_root() {
	if [ "$(id -u)" != 0 ]; then
		command -v sudo >/dev/null || { say "run this as root (sudo is not installed)"; exit 1; }
		exec sudo -E env "PATH=$PATH" bash "$0" "$@"
	fi
}

# runsc_path prints where the pinned runsc lives in the cache.
runsc_path() { echo "$CUBICLE_CACHE_DIR/runsc/$RUNSC_VERSION/runsc"; }
