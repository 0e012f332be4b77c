package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/capacity"
	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/policy"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
	"github.com/cubicle-dev/cubicle/vmm/linux"
)

// Free space a start needs, checked before it makes anything, so that a
// full disk is a clear refusal and not a template build or a database
// write that fails half-way.
const (
	// minFreeData is for the data directory: the state database, the
	// copies of templates, the sandboxes' writable layers and disks.
	minFreeData = 1 << 30
	// minFreeCache is for the cache directory, where a first start
	// debootstraps the base template and the code interpreter's.
	minFreeCache = 2 << 30
)

// checked is a serveConfig that check has verified, with its values parsed.
type checked struct {
	self      string // this binary, which also runs as envd in sandboxes
	runsc     string
	prefix    netip.Prefix
	upstreams []netip.AddrPort
	logLevel  slog.Level
	// corsOrigins and trustedProxies are the API's (see apiOptions).
	corsOrigins    []string
	trustedProxies []netip.Prefix
	// egressOpts carries --deny-cidr and --allow-cidr.
	egressOpts policy.Options
	// backend is the isolation serve runs (chooseIsolation), backendWhy
	// why.
	backend, backendWhy string
}

// check verifies every flag, and what the start needs from the host,
// before serve makes anything: a bad flag is refused at once with nothing
// made (no database, no template build, no eBPF pins, no devices). It makes
// the paths in c absolute. A new flag gets its check here.
func (c *serveConfig) check() (checked, error) {
	var k checked
	if os.Geteuid() != 0 {
		return k, errors.New("serve needs root: it creates network namespaces, cgroups and gVisor sandboxes")
	}
	if err := k.logLevel.UnmarshalText([]byte(c.logLevel)); err != nil {
		return k, fmt.Errorf("--log-level %q: want debug, info, warn or error", c.logLevel)
	}
	for _, p := range []struct {
		flag string
		path *string
	}{{"--data-dir", &c.dataDir}, {"--cache-dir", &c.cacheDir}, {"--ready-file", &c.readyFile}} {
		if *p.path == "" {
			if p.flag == "--ready-file" {
				continue
			}
			return k, fmt.Errorf("%s is empty", p.flag)
		}
		abs, err := filepath.Abs(*p.path)
		if err != nil {
			return k, fmt.Errorf("%s: %w", p.flag, err)
		}
		*p.path = abs
	}
	if c.readyFile != "" {
		if fi, err := os.Stat(filepath.Dir(c.readyFile)); err != nil || !fi.IsDir() {
			return k, fmt.Errorf("--ready-file %s: its directory does not exist", c.readyFile)
		}
	}
	var err error
	if k.corsOrigins, k.trustedProxies, err = c.apiOptions(); err != nil {
		return k, err
	}
	if err := checkListen(map[string]string{"--api-addr": c.apiAddr, "--proxy-addr": c.proxyAddr}); err != nil {
		return k, err
	}
	if err := checkHostName(c.domain); err != nil {
		return k, fmt.Errorf("--domain: %w", err)
	}
	if strings.TrimSpace(c.publicHost) == "" || strings.ContainsAny(c.publicHost, "/ ") {
		return k, fmt.Errorf("--public-host %q: want a host name or address, without scheme or path", c.publicHost)
	}
	if c.poolSize < 0 {
		return k, fmt.Errorf("--pool-size %d: want 0 or more", c.poolSize)
	}
	if c.maxTimeout <= 0 {
		return k, fmt.Errorf("--max-timeout %v: want a positive duration", c.maxTimeout)
	}
	if err := gvisor.CheckPlatform(c.platform); err != nil {
		return k, fmt.Errorf("--platform: %w", err)
	}
	if k.prefix, err = netip.ParsePrefix(c.netPrefix); err != nil {
		return k, fmt.Errorf("--network-prefix: %w", err)
	}
	// The ledger proper is made once the runtime says where disks go; its
	// ratios and reserves are checked now.
	if _, err := capacity.New(c.capacity); err != nil {
		return k, fmt.Errorf("admission flags: %w", err)
	}
	if k.egressOpts.DenyCIDRs, err = parseCIDRs("deny-cidr", c.denyCIDR); err != nil {
		return k, err
	}
	if k.egressOpts.AllowCIDRs, err = parseCIDRs("allow-cidr", c.allowCIDR); err != nil {
		return k, err
	}
	if err := (network.Options{Prefix: k.prefix, LinkPrefix: c.linkPrefix, Spares: c.netSpares}).Check(); err != nil {
		return k, fmt.Errorf("--network-prefix %s, --link-prefix %q, --network-spares %d: %w", c.netPrefix, c.linkPrefix, c.netSpares, err)
	}
	if k.upstreams, err = c.dnsUpstreams(); err != nil {
		return k, err
	}
	if k.backend, k.backendWhy, err = chooseIsolation(c.isolation, linux.CanBoot, checkJail); err != nil {
		return k, err
	}
	if k.backend == isolationGVisor {
		if k.runsc, err = gvisor.FindRunsc(c.runsc, c.cacheDir); err != nil {
			return k, err
		}
	}
	if k.self, err = os.Executable(); err != nil {
		return k, fmt.Errorf("finding my own binary: %w", err)
	}
	if err := checkStatic(k.self); err != nil {
		return k, err
	}
	if err := checkFree("--data-dir", c.dataDir, minFreeData); err != nil {
		return k, err
	}
	if err := checkFree("--cache-dir", c.cacheDir, minFreeCache); err != nil {
		return k, err
	}
	return k, nil
}

// checkListen parses each listen address and binds it for a moment, so that
// a typo or a port in use is refused before minutes of start-up work. The
// real listen comes later and may still lose a race; serve then undoes.
func checkListen(addrs map[string]string) error {
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for flag, a := range addrs {
		if _, err := net.ResolveTCPAddr("tcp", a); err != nil {
			return fmt.Errorf("%s %q: %w", flag, a, err)
		}
		l, err := net.Listen("tcp", a)
		if err != nil {
			return fmt.Errorf("%s: %w", flag, err)
		}
		lns = append(lns, l)
	}
	return nil
}

// checkHostName accepts DNS names of letters, digits, hyphens and dots:
// the proxy routes <port>-<sandboxID>.<domain>.
func checkHostName(name string) error {
	if name == "" || len(name) > 253 {
		return fmt.Errorf("%q: want a DNS name", name)
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("%q: want a DNS name (labels of 1-63 letters, digits or inner hyphens)", name)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return fmt.Errorf("%q: want a DNS name (labels of 1-63 letters, digits or inner hyphens)", name)
			}
		}
	}
	return nil
}

// checkFree refuses a directory (or, when it does not exist yet, the
// nearest one above it) whose file system has less than min bytes free.
func checkFree(flag, dir string, min uint64) error {
	d := dir
	for {
		var st unix.Statfs_t
		err := unix.Statfs(d, &st)
		if err == nil {
			if free := st.Bavail * uint64(st.Bsize); free < min {
				return fmt.Errorf("%s %s: %d MiB free on its file system, cubicle needs at least %d MiB", flag, dir, free>>20, min>>20)
			}
			return nil
		}
		if !errors.Is(err, unix.ENOENT) || d == filepath.Dir(d) {
			return fmt.Errorf("%s %s: %w", flag, dir, err)
		}
		d = filepath.Dir(d)
	}
}
