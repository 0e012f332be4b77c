package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/creack/pty"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/store"
)

// goodConfig is what serveCmd's defaults give, in a data dir of the test's.
func goodConfig(t *testing.T) serveConfig {
	dir := t.TempDir()
	return serveConfig{
		dataDir: filepath.Join(dir, "data"), cacheDir: filepath.Join(dir, "cache"),
		apiAddr: "127.0.0.1:0", proxyAddr: "127.0.0.1:0", publicHost: "localhost", domain: "cubicle.localhost",
		poolSize: 4, platform: "systrap", netPrefix: network.DefaultPrefix.String(), linkPrefix: network.DefaultLinkPrefix,
		netSpares: 8, dnsUpstream: "192.0.2.53", maxTimeout: 24 * time.Hour, logLevel: "info", isolation: isolationGVisor,
	}
}

// TestServeCheckRefusesBadFlags: every flag is checked before serve makes
// anything; the error names the flag, and the data dir is not even made.
func TestServeCheckRefusesBadFlags(t *testing.T) {
	testenv.RequireRoot(t, "is serve's first check")
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, tc := range []struct {
		name, want string
		mod        func(*serveConfig)
	}{
		{"link prefix with a digit", "--link-prefix", func(c *serveConfig) { c.linkPrefix = "rel2" }},
		{"link prefix too long for the pool", "--link-prefix", func(c *serveConfig) { c.linkPrefix = "muchtoolongname" }},
		{"network prefix unparsable", "--network-prefix", func(c *serveConfig) { c.netPrefix = "100.96.0.0" }},
		{"network prefix with host bits", "--network-prefix", func(c *serveConfig) { c.netPrefix = "100.96.0.1/11" }},
		{"network prefix IPv6", "--network-prefix", func(c *serveConfig) { c.netPrefix = "fd00::/64" }},
		{"deny cidr unparsable", "deny-cidr", func(c *serveConfig) { c.denyCIDR = []string{"10.0.0.0/33"} }},
		{"allow cidr unparsable", "allow-cidr", func(c *serveConfig) { c.allowCIDR = []string{"lan"} }},
		{"cors origin with a path", "--cors-origins", func(c *serveConfig) { c.corsOrigins = "https://a.example/x" }},
		{"negative memory over-commit", "admission flags", func(c *serveConfig) { c.capacity.MemoryOvercommit = -1 }},
		{"negative spares", "--network-spares", func(c *serveConfig) { c.netSpares = -1 }},
		{"negative pool", "--pool-size", func(c *serveConfig) { c.poolSize = -1 }},
		{"API address without port", "--api-addr", func(c *serveConfig) { c.apiAddr = "127.0.0.1" }},
		{"proxy address in use", "--proxy-addr", func(c *serveConfig) { c.proxyAddr = busy.Addr().String() }},
		{"DNS upstream not an address", "--dns-upstream", func(c *serveConfig) { c.dnsUpstream = "8.8.8.8,resolver" }},
		{"DNS upstream port 0", "--dns-upstream", func(c *serveConfig) { c.dnsUpstream = "192.0.2.1:0" }},
		{"DNS upstream unspecified", "--dns-upstream", func(c *serveConfig) { c.dnsUpstream = "0.0.0.0" }},
		{"zero max timeout", "--max-timeout", func(c *serveConfig) { c.maxTimeout = 0 }},
		{"negative max timeout", "--max-timeout", func(c *serveConfig) { c.maxTimeout = -time.Second }},
		{"log level", "--log-level", func(c *serveConfig) { c.logLevel = "loud" }},
		{"platform", "--platform", func(c *serveConfig) { c.platform = "kvmx" }},
		{"domain", "--domain", func(c *serveConfig) { c.domain = "a..b" }},
		{"domain with a scheme", "--domain", func(c *serveConfig) { c.domain = "http://x" }},
		{"public host with a path", "--public-host", func(c *serveConfig) { c.publicHost = "host/x" }},
		{"ready file in no directory", "--ready-file", func(c *serveConfig) { c.readyFile = "/nonexistent/ready" }},
		{"runsc missing", "runsc", func(c *serveConfig) { c.runsc = "/nonexistent/runsc" }},
		{"isolation", "--isolation", func(c *serveConfig) { c.isolation = "firecracker" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := goodConfig(t)
			tc.mod(&c)
			_, err := c.check()
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("check() = %v, want an error naming %s", err, tc.want)
			}
			if _, serr := os.Stat(c.dataDir); !os.IsNotExist(serr) {
				t.Errorf("check made the data dir (%v)", serr)
			}
		})
	}
}

// TestServeRefusesBadFlagAtOnce runs serve itself with a bad link prefix
// in a fresh data dir: it fails without a database, a template build or a
// key.
func TestServeRefusesBadFlagAtOnce(t *testing.T) {
	testenv.RequireRoot(t, "is serve's first check")
	c := goodConfig(t)
	c.linkPrefix = "rel2"
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := serve(ctx, c); err == nil || !strings.Contains(err.Error(), "rel2") {
		t.Fatalf("serve = %v, want the link prefix refused", err)
	}
	if ctx.Err() != nil {
		t.Fatal("serve ran until the test's deadline instead of refusing at once")
	}
	if _, err := os.Stat(c.dataDir); !os.IsNotExist(err) {
		t.Errorf("a refused start made its data dir (%v)", err)
	}
}

func TestCheckFree(t *testing.T) {
	dir := t.TempDir()
	if err := checkFree("--data-dir", dir, 1); err != nil {
		t.Fatalf("1 byte: %v", err)
	}
	// A directory still to be made is judged by its nearest parent.
	if err := checkFree("--data-dir", filepath.Join(dir, "a", "b"), 1); err != nil {
		t.Fatalf("missing dir: %v", err)
	}
	err := checkFree("--data-dir", dir, 1<<62)
	if err == nil || !strings.Contains(err.Error(), "MiB free") || !strings.Contains(err.Error(), "--data-dir") {
		t.Fatalf("4 EiB: %v, want a refusal naming the flag and the free space", err)
	}
}

// TestFirstAPIKeyOnlyForTerminal: the first key is made and shown when
// stdout is a terminal; otherwise none is made (it would land in a log),
// and the banner says how to make one.
func TestFirstAPIKeyOnlyForTerminal(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if key, err := firstAPIKey(ctx, st, w); err != nil || key != "" {
		t.Fatalf("to a pipe: key %q, %v; want none", key, err)
	}
	if n, _ := st.CountActiveAPIKeys(ctx); n != 0 {
		t.Fatalf("%d keys made for a pipe, want 0", n)
	}
	var b strings.Builder
	printBanner(&b, banner{apiURL: "http://a", sandboxURL: "http://s", domain: "d", dataDir: dir})
	if !strings.Contains(b.String(), "cubicle keys create --data-dir "+dir) || strings.Contains(b.String(), "e2b_") {
		t.Errorf("banner without a key:\n%s", b.String())
	}

	ptmx, tty, err := pty.Open()
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	defer ptmx.Close()
	defer tty.Close()
	key, err := firstAPIKey(ctx, st, tty)
	if err != nil || !strings.HasPrefix(key, store.KeyPrefix) {
		t.Fatalf("to a terminal: key %q, %v; want a new key", key, err)
	}
	if again, err := firstAPIKey(ctx, st, tty); err != nil || again != "" {
		t.Fatalf("with a key already: %q, %v; want none", again, err)
	}
}
