package main

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/api"
	"github.com/cubicle-dev/cubicle/capacity"
	"github.com/cubicle-dev/cubicle/guest/envd"
	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/dns"
	"github.com/cubicle-dev/cubicle/network/egress"
	"github.com/cubicle-dev/cubicle/network/nat"
	"github.com/cubicle-dev/cubicle/network/policy"
	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/proxy"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
	"github.com/cubicle-dev/cubicle/store"
	"github.com/cubicle-dev/cubicle/template"
)

type serveConfig struct {
	dataDir     string
	cacheDir    string
	apiAddr     string
	proxyAddr   string
	publicHost  string
	domain      string
	poolSize    int
	runsc       string
	platform    string
	netPrefix   string
	linkPrefix  string
	netSpares   int
	dnsUpstream string
	noBuild     bool
	maxTimeout  time.Duration
	logLevel    string
	readyFile   string
	capacity    capacity.Options
}

func serveCmd() *cobra.Command {
	var c serveConfig
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the E2B-compatible API and sandbox proxy",
		Long: `serve runs cubicle: the E2B control-plane API, the sandbox data-plane proxy,
and the orchestrator. At first start it builds the default template "base" and
creates an API key, and prints the environment an E2B SDK needs.`,
		RunE: func(cmd *cobra.Command, args []string) error { return serve(cmd.Context(), c) },
	}
	f := cmd.Flags()
	dataDirFlag(f, &c.dataDir)
	f.StringVar(&c.cacheDir, "cache-dir", envOr("CUBICLE_CACHE_DIR", "/var/cache/cubicle"), "cache for slow artifacts (env CUBICLE_CACHE_DIR)")
	f.StringVar(&c.apiAddr, "api-addr", envOr("CUBICLE_API_ADDR", ":3000"), "listen address of the control-plane API (env CUBICLE_API_ADDR)")
	f.StringVar(&c.proxyAddr, "proxy-addr", envOr("CUBICLE_PROXY_ADDR", ":3001"), "listen address of the sandbox proxy (env CUBICLE_PROXY_ADDR)")
	f.StringVar(&c.publicHost, "public-host", envOr("CUBICLE_PUBLIC_HOST", "localhost"), "host name clients use to reach this server, for the printed URLs (env CUBICLE_PUBLIC_HOST)")
	f.StringVar(&c.domain, "domain", envOr("CUBICLE_DOMAIN", "cubicle.localhost"), "sandbox domain: the proxy routes <port>-<sandboxID>.<domain> (env CUBICLE_DOMAIN)")
	f.IntVar(&c.poolSize, "pool-size", envInt("CUBICLE_POOL_SIZE", 4), "pre-started sandboxes kept ready per template (env CUBICLE_POOL_SIZE)")
	f.StringVar(&c.runsc, "runsc", envOr("CUBICLE_RUNSC", ""), "path of runsc (env CUBICLE_RUNSC; default: PATH, then <cache-dir>/bin/runsc)")
	f.StringVar(&c.platform, "platform", envOr("CUBICLE_GVISOR_PLATFORM", "systrap"), "gVisor platform (env CUBICLE_GVISOR_PLATFORM)")
	f.StringVar(&c.netPrefix, "network-prefix", envOr("CUBICLE_NETWORK_PREFIX", network.DefaultPrefix.String()), "address range for sandbox networks (env CUBICLE_NETWORK_PREFIX)")
	f.StringVar(&c.linkPrefix, "link-prefix", envOr("CUBICLE_LINK_PREFIX", network.DefaultLinkPrefix), "names the host's sandbox devices and namespaces; servers sharing a host need distinct ones (env CUBICLE_LINK_PREFIX)")
	f.IntVar(&c.netSpares, "network-spares", envInt("CUBICLE_NETWORK_SPARES", 8), "sandbox network devices kept made in advance, so creating a sandbox makes none (env CUBICLE_NETWORK_SPARES)")
	f.StringVar(&c.dnsUpstream, "dns-upstream", envOr("CUBICLE_DNS_UPSTREAM", ""), "servers the sandboxes' resolver forwards to, comma-separated ip or ip:port (env CUBICLE_DNS_UPSTREAM; default: the host's /etc/resolv.conf)")
	f.BoolVar(&c.noBuild, "no-build", false, "fail instead of building a missing default template")
	f.DurationVar(&c.maxTimeout, "max-timeout", 24*time.Hour, "longest sandbox timeout a client may ask for")
	f.StringVar(&c.logLevel, "log-level", envOr("CUBICLE_LOG_LEVEL", "info"), "debug, info, warn or error (env CUBICLE_LOG_LEVEL)")
	capacityFlags(f, &c.capacity)
	f.StringVar(&c.readyFile, "ready-file", "", "write the API and proxy addresses here once serving (for scripts and tests)")
	return cmd
}

func envInt(key string, def int) int {
	if v := os.Getenv(key); v != "" {
		if n, err := strconv.Atoi(v); err == nil {
			return n
		}
	}
	return def
}

func ensureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	return nil
}

func serve(ctx context.Context, c serveConfig) error {
	log := newLogger(c.logLevel)
	if os.Geteuid() != 0 {
		return errors.New("serve needs root: it creates network namespaces, cgroups and gVisor sandboxes")
	}
	if err := ensureDir(c.dataDir); err != nil {
		return err
	}
	unlock, err := lockDataDir(c.dataDir)
	if err != nil {
		return err
	}
	defer unlock()
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding my own binary: %w", err)
	}
	if err := checkStatic(self); err != nil {
		return err
	}
	runsc, err := findRunsc(c.runsc, c.cacheDir)
	if err != nil {
		return err
	}

	st, err := openStore(c.dataDir)
	if err != nil {
		return err
	}
	defer st.Close()
	apiKey, err := firstAPIKey(ctx, st)
	if err != nil {
		return err
	}

	templates, err := ensureBaseTemplate(ctx, c)
	if err != nil {
		return err
	}
	if err := ensureCodeInterpreterTemplate(ctx, c); err != nil {
		return err
	}

	prefix, err := netip.ParsePrefix(c.netPrefix)
	if err != nil {
		return fmt.Errorf("--network-prefix: %w", err)
	}
	// The egress goroutines (host address following, sweeping) stop
	// before the policy manager closes: deferred calls run last first.
	egressCtx, stopEgress := context.WithCancel(ctx)
	pm, err := startEgress(egressCtx, prefix, c.linkPrefix, log.With("component", "egress"))
	if err != nil {
		stopEgress()
		return err
	}
	// Close keeps the pinned maps and attached programs: sandboxes stay
	// confined while the server is down, and the next start adopts them.
	defer pm.Close()
	defer stopEgress()
	upstreams, err := c.dnsUpstreams()
	if err != nil {
		return err
	}
	enforcer, err := egress.New(pm, dns.Options{Upstreams: upstreams, Logger: log.With("component", "dns")})
	if err != nil {
		return err
	}
	defer enforcer.Close()
	netPool, err := network.NewPool(network.Options{
		Prefix: prefix, LinkPrefix: c.linkPrefix, Spares: c.netSpares,
		// Devices are put under the default policy as they are made, off
		// the create path; Create then only switches the policy.
		OnCreate:  func(a network.Attachment) error { return enforcer.Prepare(a, runtime.DefaultEgress) },
		OnDestroy: func(a network.Attachment) { _ = enforcer.Release(a) },
		Logger:    log.With("component", "network"),
	})
	if err != nil {
		return err
	}
	// Spares go before the resolver stops (deferred calls run last first).
	defer netPool.Close()
	rt, err := gvisor.New(gvisor.Options{
		Runsc:    runsc,
		StateDir: filepath.Join(c.dataDir, "gvisor"),
		Network:  netPool,
		Egress:   enforcer,
		Platform: c.platform,
		Logger:   log.With("component", "gvisor"),
	})
	if err != nil {
		return err
	}

	c.capacity.DiskPath = rt.StateDir()
	ledger, err := capacity.New(c.capacity)
	if err != nil {
		return err
	}

	resolver := &routes{}
	px := proxy.New(resolver, c.domain, log.With("component", "proxy"))
	orch, err := orchestrator.New(ctx, orchestrator.Options{
		Runtime:       rt,
		Store:         st,
		Templates:     templates,
		Envd:          self,
		EnvdArgs:      []string{"envd"},
		PoolSize:      c.poolSize,
		PoolTemplates: []string{template.BaseID, template.CodeInterpreterAlias},
		MaxTimeout:    c.maxTimeout,
		Capacity:      ledger,
		OnEvict:       px.Evict,
		Logger:        log.With("component", "orchestrator"),
	})
	if err != nil {
		return err
	}
	resolver.orch = orch

	apiSrv := &http.Server{
		Handler: api.New(api.Options{
			Orchestrator: orch, Store: st, EnvdVersion: envd.Version, Logger: log.With("component", "api"),
		}),
		ReadHeaderTimeout: 30 * time.Second,
	}
	proxySrv := px.Server("")
	apiLn, err := net.Listen("tcp", c.apiAddr)
	if err != nil {
		orch.Close(context.Background())
		return fmt.Errorf("API listen on %s: %w", c.apiAddr, err)
	}
	proxyLn, err := net.Listen("tcp", c.proxyAddr)
	if err != nil {
		apiLn.Close()
		orch.Close(context.Background())
		return fmt.Errorf("proxy listen on %s: %w", c.proxyAddr, err)
	}
	errc := make(chan error, 2)
	go func() { errc <- apiSrv.Serve(apiLn) }()
	go func() { errc <- proxySrv.Serve(proxyLn) }()

	apiURL := "http://" + net.JoinHostPort(c.publicHost, portOf(apiLn))
	sandboxURL := "http://" + net.JoinHostPort(c.publicHost, portOf(proxyLn))
	printBanner(os.Stdout, apiURL, sandboxURL, c.domain, apiKey)
	if c.readyFile != "" {
		ready := fmt.Sprintf("api=%s\nproxy=%s\n", apiLn.Addr(), proxyLn.Addr())
		if err := os.WriteFile(c.readyFile, []byte(ready), 0o600); err != nil {
			log.Error("writing ready file", "err", err)
		}
	}

	select {
	case <-ctx.Done():
	case err = <-errc:
		log.Error("server stopped", "err", err)
	}
	log.Info("shutting down; sandboxes keep running and are adopted at the next start")
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	apiSrv.Shutdown(sctx)
	proxySrv.Shutdown(sctx)
	return errors.Join(err, orch.Close(sctx))
}

// startEgress loads the eBPF egress policy (pinned under
// /sys/fs/bpf/cubicle/<linkPrefix>, adopted again after a restart), keeps
// its hard-denied host addresses in step with the host's until ctx ends,
// sweeps expired domain answers from it, and sets up masquerading of the
// sandbox pool out of the default route. Without a default route
// sandboxes still run, with no way out.
func startEgress(ctx context.Context, pool netip.Prefix, linkPrefix string, log *slog.Logger) (*policy.Manager, error) {
	// The host's addresses are denied from the first packet on; a start
	// with none would open them to adopted sandboxes until FollowHostAddrs.
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("egress policy: netlink: %w", err)
	}
	hostAddrs, err := policy.HostAddrs(h, pool)
	h.Close()
	if err != nil {
		return nil, fmt.Errorf("egress policy: %w", err)
	}
	pm, err := policy.New(policy.Options{Name: linkPrefix, PoolPrefix: pool, HostAddrs: hostAddrs, NetNS: netns.None(), Logger: log})
	if err != nil {
		return nil, fmt.Errorf("egress policy: %w", err)
	}
	if err := pm.FollowHostAddrs(ctx); err != nil {
		pm.Close()
		return nil, fmt.Errorf("egress policy: %w", err)
	}
	go func() {
		t := time.NewTicker(time.Minute)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if n, err := pm.SweepLearned(); err != nil {
					log.Warn("sweeping expired domain answers", "err", err)
				} else if n > 0 {
					log.Debug("swept expired domain answers", "removed", n)
				}
			}
		}
	}()
	uplink, err := nat.Enable(nat.Options{Pool: pool, Table: linkPrefix, NetNS: netns.None()})
	if err != nil {
		log.Warn("no egress NAT: sandboxes cannot reach beyond this host", "err", err)
	} else {
		log.Info("egress NAT", "pool", pool, "uplink", uplink)
	}
	return pm, nil
}

// dnsUpstreams are the servers sandbox queries are forwarded to:
// --dns-upstream, or the host's own resolvers.
func (c serveConfig) dnsUpstreams() ([]netip.AddrPort, error) {
	if c.dnsUpstream == "" {
		ups, err := dns.UpstreamsFromResolvConf("/etc/resolv.conf")
		if err != nil {
			return nil, fmt.Errorf("sandbox DNS: %w (set --dns-upstream)", err)
		}
		return ups, nil
	}
	var out []netip.AddrPort
	for _, f := range strings.Split(c.dnsUpstream, ",") {
		f = strings.TrimSpace(f)
		ap, err := netip.ParseAddrPort(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return nil, fmt.Errorf("--dns-upstream: %q is not an address or address:port", f)
			}
			ap = netip.AddrPortFrom(a, 53)
		}
		out = append(out, ap)
	}
	return out, nil
}

// lockDataDir makes sure one server at a time owns a data directory: two
// would adopt, reap and destroy each other's sandboxes.
func lockDataDir(dir string) (unlock func(), err error) {
	path := filepath.Join(dir, "serve.lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("another cubicle serve is using %s (lock %s held)", dir, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

func portOf(ln net.Listener) string {
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return port
}

func printBanner(w *os.File, apiURL, sandboxURL, domain, apiKey string) {
	key := apiKey
	if key == "" {
		key = "<your key; `cubicle keys create` makes one>"
	}
	fmt.Fprintf(w, `
cubicle is serving.
  API:         %s
  sandbox URL: %s
  domain:      %s
`, apiURL, sandboxURL, domain)
	if apiKey != "" {
		fmt.Fprintf(w, "  API key:     %s   (shown once; stored hashed)\n", apiKey)
	}
	fmt.Fprintf(w, `
Point the E2B SDK at it:
  export E2B_API_URL=%s E2B_SANDBOX_URL=%s E2B_DOMAIN=%s E2B_API_KEY=%s

`, apiURL, sandboxURL, domain, key)
}

// firstAPIKey makes the first API key when there is none, so that a fresh
// install is usable at once; it returns "" when keys already exist.
func firstAPIKey(ctx context.Context, st *store.Store) (string, error) {
	n, err := st.CountActiveAPIKeys(ctx)
	if err != nil || n > 0 {
		return "", err
	}
	_, secret, err := st.CreateAPIKey(ctx, "first")
	return secret, err
}

// checkStatic refuses a dynamically linked binary: it runs as envd inside
// sandboxes whose root filesystem has none of the host's libraries.
func checkStatic(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("reading %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked; build it with CGO_ENABLED=0 (it also runs as envd inside sandboxes)", path)
		}
	}
	return nil
}

func findRunsc(flag, cacheDir string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	if p, err := exec.LookPath("runsc"); err == nil {
		return p, nil
	}
	p := filepath.Join(cacheDir, "bin", "runsc")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("runsc not found in PATH or %s: run scripts/deps.sh, or pass --runsc", p)
}
