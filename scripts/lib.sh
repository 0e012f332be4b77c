# Shared by the scripts in this folder: paths, versions and the root check.
# Sourced, not run.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The gVisor release cubicle is tested with, read from the file the Go code
# embeds (runtime/gvisor: RunscVersion), so the two cannot disagree. runsc
# must be built static: a cgo build fails at sandbox start.
RUNSC_MODULE=gvisor.dev/gvisor/runsc
RUNSC_VERSION=$(tr -d '[:space:]' <"$REPO/runtime/gvisor/runsc.version")
STATICCHECK_VERSION=v0.8.2
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

# runsc_path prints where the pinned runsc lives in the cache: the path
# runtime/gvisor.RunscPath gives, where `cubicle serve` looks by default.
runsc_path() { echo "$CUBICLE_CACHE_DIR/runsc/$RUNSC_VERSION/runsc"; }
