package main

import (
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

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
	"github.com/cubicle-dev/cubicle/store"
	"github.com/cubicle-dev/cubicle/template"
	"github.com/cubicle-dev/cubicle/template/builder"
	"github.com/cubicle-dev/cubicle/volume"
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
	denyCIDR    []string
	allowCIDR   []string
	noBuild     bool
	maxTimeout  time.Duration
	logLevel    string
	readyFile   string
	// artifactCacheMax caps template builds' reproducible artifacts.
	artifactCacheMax sizeFlag
	// insecureRegistries may serve template builds' images over plain
	// HTTP (loopback registries always may).
	insecureRegistries []string
	// corsOrigins and trustedProxies configure the API (serve_api.go).
	corsOrigins    string
	trustedProxies string
	capacity       capacity.Options
	// isolation is --isolation: auto, microvm or gvisor (isolation.go).
	isolation string
}

func serveCmd() *cobra.Command {
	var c serveConfig
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the E2B-compatible API and sandbox proxy",
		Long: `serve runs cubicle: the E2B control-plane API, the sandbox data-plane proxy,
and the orchestrator. At first start it builds the default template "base";
started from a terminal it creates the first API key and prints it. It
prints the environment an E2B SDK needs.`,
		PreRunE: func(cmd *cobra.Command, args []string) error { return fromEnv(cmd.Flags(), numericEnv) },
		RunE:    func(cmd *cobra.Command, args []string) error { return serve(cmd.Context(), c) },
	}
	f := cmd.Flags()
	dataDirFlag(f, &c.dataDir)
	f.StringVar(&c.cacheDir, "cache-dir", envOr("CUBICLE_CACHE_DIR", "/var/cache/cubicle"), "cache for slow artifacts (env CUBICLE_CACHE_DIR)")
	f.StringVar(&c.apiAddr, "api-addr", envOr("CUBICLE_API_ADDR", ":3000"), "listen address of the control-plane API (env CUBICLE_API_ADDR)")
	f.StringVar(&c.proxyAddr, "proxy-addr", envOr("CUBICLE_PROXY_ADDR", ":3001"), "listen address of the sandbox proxy (env CUBICLE_PROXY_ADDR)")
	f.StringVar(&c.publicHost, "public-host", envOr("CUBICLE_PUBLIC_HOST", "localhost"), "host name clients use to reach this server, for the printed URLs (env CUBICLE_PUBLIC_HOST)")
	f.StringVar(&c.domain, "domain", envOr("CUBICLE_DOMAIN", "cubicle.localhost"), "sandbox domain: the proxy routes <port>-<sandboxID>.<domain> (env CUBICLE_DOMAIN)")
	f.IntVar(&c.poolSize, "pool-size", 4, "pre-started sandboxes kept ready per template (env CUBICLE_POOL_SIZE)")
	f.StringVar(&c.runsc, "runsc", envOr("CUBICLE_RUNSC", ""), "path of runsc (env CUBICLE_RUNSC; default: the pinned build scripts/deps.sh makes in <cache-dir>/runsc/<version>/runsc, then PATH)")
	f.StringVar(&c.isolation, "isolation", envOr("CUBICLE_ISOLATION", isolationAuto), "sandbox backend: microvm (a KVM microVM each; needs /dev/kvm with VT-x/AMD-V), gvisor, or auto: microvm where the host can, else gvisor (env CUBICLE_ISOLATION)")
	f.StringVar(&c.platform, "platform", envOr("CUBICLE_GVISOR_PLATFORM", "systrap"), "gVisor platform (env CUBICLE_GVISOR_PLATFORM)")
	f.StringVar(&c.netPrefix, "network-prefix", envOr("CUBICLE_NETWORK_PREFIX", network.DefaultPrefix.String()), "address range for sandbox networks (env CUBICLE_NETWORK_PREFIX)")
	f.StringVar(&c.linkPrefix, "link-prefix", envOr("CUBICLE_LINK_PREFIX", network.DefaultLinkPrefix), "names the host's sandbox devices and namespaces; servers sharing a host need distinct ones (env CUBICLE_LINK_PREFIX)")
	f.IntVar(&c.netSpares, "network-spares", 8, "sandbox network devices kept made in advance, so creating a sandbox makes none (env CUBICLE_NETWORK_SPARES)")
	f.StringVar(&c.dnsUpstream, "dns-upstream", envOr("CUBICLE_DNS_UPSTREAM", ""), "servers the sandboxes' resolver forwards to, comma-separated ip or ip:port (env CUBICLE_DNS_UPSTREAM; default: the host's /etc/resolv.conf)")
	c.artifactCacheMax = 20 << 30
	f.Var(&c.artifactCacheMax, "artifact-cache-max", "cap on what template builds keep to be quicker next time (RUN steps' trees, unpacked images, uploads), least recently used removed first; K, M, G or T; 0: no cap (env CUBICLE_ARTIFACT_CACHE_MAX)")
	f.StringSliceVar(&c.insecureRegistries, "insecure-registry", envList("CUBICLE_INSECURE_REGISTRIES"), "registries (host or host:port) that template builds may pull images from over plain HTTP; loopback ones always may; repeatable or comma-separated (env CUBICLE_INSECURE_REGISTRIES)")
	f.StringSliceVar(&c.denyCIDR, "deny-cidr", envList("CUBICLE_DENY_CIDR"), "ranges no sandbox may reach whatever its policy, like this host's own addresses; repeatable or comma-separated (env CUBICLE_DENY_CIDR)")
	f.StringSliceVar(&c.allowCIDR, "allow-cidr", envList("CUBICLE_ALLOW_CIDR"), "ranges taken out of those closed to sandboxes by default (private and special-purpose ranges, this host's LAN and gateways): sandboxes reach them as they reach the internet, under their policies; never opens this host's own addresses, other sandboxes or metadata; repeatable or comma-separated (env CUBICLE_ALLOW_CIDR)")
	f.BoolVar(&c.noBuild, "no-build", false, "fail instead of building a missing default template")
	f.DurationVar(&c.maxTimeout, "max-timeout", 24*time.Hour, "longest sandbox timeout a client may ask for")
	f.StringVar(&c.logLevel, "log-level", envOr("CUBICLE_LOG_LEVEL", "info"), "debug, info, warn or error (env CUBICLE_LOG_LEVEL)")
	capacityFlags(f, &c.capacity)
	f.StringVar(&c.readyFile, "ready-file", "", "write the API and proxy addresses here once serving (for scripts and tests)")
	apiFlags(f, &c)
	return cmd
}

// envList is key's comma-separated value, nil when unset.
func envList(key string) []string {
	if v := os.Getenv(key); v != "" {
		return strings.Split(v, ",")
	}
	return nil
}

// parseCIDRs parses the values of --deny-cidr or --allow-cidr: IPv4 CIDRs,
// or addresses taken as /32s.
func parseCIDRs(flag string, vals []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, v := range vals {
		v = strings.TrimSpace(v)
		if v == "" {
			continue
		}
		p, err := netip.ParsePrefix(v)
		if err != nil {
			a, aerr := netip.ParseAddr(v)
			if aerr != nil {
				return nil, fmt.Errorf("--%s: %q is not an IPv4 CIDR or address", flag, v)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if !p.Addr().Is4() {
			return nil, fmt.Errorf("--%s: %q is not IPv4 (sandboxes have no IPv6 egress)", flag, v)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// numericEnv names the environment variables of serve's numeric flags.
// They are applied by fromEnv, which parses them as the flags parse their
// own values, so that CUBICLE_POOL_SIZE=abc is an error and not, silently,
// the default.
var numericEnv = map[string]string{
	"pool-size":          "CUBICLE_POOL_SIZE",
	"network-spares":     "CUBICLE_NETWORK_SPARES",
	"overcommit-memory":  "CUBICLE_OVERCOMMIT_MEMORY",
	"overcommit-cpu":     "CUBICLE_OVERCOMMIT_CPU",
	"reserve-memory-mb":  "CUBICLE_RESERVE_MEMORY_MB",
	"reserve-disk-mb":    "CUBICLE_RESERVE_DISK_MB",
	"artifact-cache-max": "CUBICLE_ARTIFACT_CACHE_MAX",
}

// fromEnv gives each flag in env (flag name → variable) its variable's
// value where the command line did not set the flag.
func fromEnv(f *pflag.FlagSet, env map[string]string) error {
	for name, key := range env {
		v := os.Getenv(key)
		if v == "" || f.Changed(name) {
			continue
		}
		if err := f.Set(name, v); err != nil {
			return fmt.Errorf("%s=%q (for --%s): %w", key, v, name, err)
		}
	}
	return nil
}

// ensureDir makes dir private to root (0700), tightening an existing one
// made looser by an older version: it holds the state database, whose
// API key hashes and envd tokens are secrets.
func ensureDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, fi.Mode().Perm()&0o700); err != nil {
			return fmt.Errorf("make %s private: %w", dir, err)
		}
	}
	return nil
}

// serve runs the server until ctx ends. It checks every flag before it
// makes anything (check), and whatever it made is undone when it stops,
// after a failed start as after a clean stop (see parts.close), except what
// sandboxes still running need.
func serve(ctx context.Context, c serveConfig) (err error) {
	k, err := c.check()
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: k.logLevel}))
	log.Info("sandbox isolation", "backend", k.backend, "why", k.backendWhy)
	p := &parts{log: log, linkPrefix: c.linkPrefix, pool: k.prefix}
	defer func() {
		if err != nil {
			log.Error("stopping on an error; undoing what this start made", "err", err)
		}
		err = errors.Join(err, p.close())
	}()

	if err := ensureDir(c.dataDir); err != nil {
		return err
	}
	if p.unlock, err = lockDataDir(c.dataDir); err != nil {
		return err
	}
	if p.st, err = openStore(c.dataDir); err != nil {
		return err
	}
	templates, err := ensureBaseTemplate(ctx, c)
	if err != nil {
		return err
	}
	if err := ensureCodeInterpreterTemplate(ctx, c); err != nil {
		return err
	}

	// Pins that exist already belong to sandboxes an earlier server left
	// running (or to one that crashed): a start that fails before the
	// runtime can say which sandboxes run keeps them.
	p.pinsExisted = exists(p.pinDir())
	p.egressStarted = true
	// The egress goroutines (host address following, sweeping) stop
	// before the policy manager closes (parts.close).
	egressCtx, stopEgress := context.WithCancel(ctx)
	p.stopEgress = stopEgress
	if p.pm, err = startEgress(egressCtx, k.prefix, c.linkPrefix, k.egressOpts, log.With("component", "egress")); err != nil {
		return err
	}
	if p.enforcer, err = egress.New(p.pm, dns.Options{Upstreams: k.upstreams, Logger: log.With("component", "dns")}); err != nil {
		return err
	}
	// Devices are put under the default policy as they are made, off the
	// create path, and released as they go; the orchestrator claims them
	// and switches the policy.
	p.netPool, err = network.NewPool(p.enforcer.PoolOptions(network.Options{
		Prefix: k.prefix, LinkPrefix: c.linkPrefix, Spares: c.netSpares, Mode: networkMode(k.backend),
		Logger: log.With("component", "network"),
	}))
	if err != nil {
		return err
	}
	p.rt, err = newBackend(ctx, k.backend, c, k, templates.reg, p.netPool, log)
	if err != nil {
		return err
	}

	c.capacity.DiskPath = p.rt.StateDir()
	ledger, err := capacity.New(c.capacity)
	if err != nil {
		return err
	}

	resolver := &routes{}
	px := proxy.New(resolver, c.domain, log.With("component", "proxy"))
	p.orch, err = orchestrator.New(ctx, orchestrator.Options{
		Runtime:       p.rt,
		Network:       p.netPool,
		Egress:        p.enforcer,
		Store:         p.st,
		Templates:     templates,
		Envd:          k.self,
		EnvdArgs:      []string{"envd"},
		PoolSize:      c.poolSize,
		PoolTemplates: []string{template.BaseID, template.CodeInterpreterAlias},
		MaxTimeout:    c.maxTimeout,
		Capacity:      ledger,
		SnapshotDir:   filepath.Join(c.dataDir, "snapshots"),
		OnEvict:       px.Evict,
		Logger:        log.With("component", "orchestrator"),
	})
	if err != nil {
		return err
	}
	resolver.orch = p.orch
	builds, tmplAPI, err := startBuilds(c, k, templates, p.orch, log)
	if err != nil {
		return err
	}
	p.builds = builds
	if builds != nil {
		builds.CollectEvery(int64(c.artifactCacheMax), 10*time.Minute)
	}
	// Volumes' files live beside the state, root's alone.
	vols, err := volume.Open(filepath.Join(c.dataDir, "volumes"))
	if err != nil {
		return err
	}

	apiSrv := &http.Server{
		Handler: api.New(api.Options{
			Orchestrator: p.orch, Store: p.st, EnvdVersion: envd.Version, Logger: log.With("component", "api"),
			CORSOrigins: k.corsOrigins, TrustedProxies: k.trustedProxies, Isolation: k.backend, Volumes: vols,
			Templates: tmplAPI,
		}),
		ReadHeaderTimeout: 30 * time.Second,
	}
	proxySrv := px.Server("")
	apiLn, err := net.Listen("tcp", c.apiAddr)
	if err != nil {
		return fmt.Errorf("API listen on %s: %w", c.apiAddr, err)
	}
	p.listeners = append(p.listeners, apiLn)
	proxyLn, err := net.Listen("tcp", c.proxyAddr)
	if err != nil {
		return fmt.Errorf("proxy listen on %s: %w", c.proxyAddr, err)
	}
	p.listeners = append(p.listeners, proxyLn)
	// The first key is made last, once nothing but printing it is left,
	// and only for a terminal: see firstAPIKey.
	apiKey, err := firstAPIKey(ctx, p.st, os.Stdout)
	if err != nil {
		return err
	}
	p.servers = []*http.Server{apiSrv, proxySrv}
	errc := make(chan error, 2)
	go func() { errc <- apiSrv.Serve(apiLn) }()
	go func() { errc <- proxySrv.Serve(proxyLn) }()

	apiURL := "http://" + net.JoinHostPort(c.publicHost, portOf(apiLn))
	sandboxURL := "http://" + net.JoinHostPort(c.publicHost, portOf(proxyLn))
	printBanner(os.Stdout, banner{apiURL: apiURL, sandboxURL: sandboxURL, domain: c.domain, dataDir: c.dataDir, apiKey: apiKey})
	if c.readyFile != "" {
		ready := fmt.Sprintf("api=%s\nproxy=%s\n", apiLn.Addr(), proxyLn.Addr())
		if err := os.WriteFile(c.readyFile, []byte(ready), 0o600); err != nil {
			log.Error("writing ready file", "err", err)
		}
	}

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err = <-errc:
		log.Error("server stopped", "err", err)
	}
	return err
}

// parts are what serve has made so far, for close to undo. Fields are set
// as each part is made; nil ones were not.
type parts struct {
	log        *slog.Logger
	linkPrefix string
	pool       netip.Prefix

	unlock func()
	st     *store.Store
	// pinsExisted says the egress policy's pins were there before this
	// start: an earlier server's sandboxes may rely on them.
	pinsExisted   bool
	egressStarted bool
	stopEgress    context.CancelFunc
	pm            *policy.Manager
	enforcer      *egress.Enforcer
	netPool       *network.Pool
	rt            backendRuntime
	orch          *orchestrator.Orchestrator
	builds        *builder.Manager
	listeners     []net.Listener
	servers       []*http.Server
}

func (p *parts) pinDir() string { return filepath.Join(policy.DefaultPinRoot, p.linkPrefix) }

// close undoes what serve made, last made first. Sandboxes that are still
// running or paused (users' sandboxes; pooled ones are drained) keep what
// confines them, the pinned egress policy and the NAT table, for the next
// start to adopt; with none left, nothing of the server stays in the
// kernel. The same rule holds after a failed start, where pins that were
// there before it are an earlier server's and stay.
func (p *parts) close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs []error
	for _, s := range p.servers {
		errs = append(errs, s.Shutdown(ctx))
	}
	for _, l := range p.listeners {
		l.Close() // already closed by Shutdown when served
	}
	// Builds under way stop (and give back their devices) before the
	// orchestrator and the network go.
	if p.builds != nil {
		p.builds.Close()
	}
	if p.orch != nil {
		errs = append(errs, p.orch.Close(ctx))
	}
	// Spares go before the resolver stops.
	if p.netPool != nil {
		errs = append(errs, p.netPool.Close())
	}
	if p.enforcer != nil {
		errs = append(errs, p.enforcer.Close())
	}
	if p.stopEgress != nil {
		p.stopEgress()
	}
	keep := p.pinsExisted
	if p.rt != nil {
		left, err := p.rt.List(ctx)
		keep = err != nil || len(left) > 0
		if err != nil {
			errs = append(errs, err)
		} else if len(left) > 0 {
			p.log.Info("sandboxes keep running, confined, and are adopted at the next start", "sandboxes", len(left))
		}
		errs = append(errs, p.rt.Close())
	}
	switch {
	case !p.egressStarted:
	case keep:
		if p.pm != nil {
			p.pm.Close()
		}
	default:
		if p.pm != nil {
			errs = append(errs, p.pm.Remove())
		} else if err := os.RemoveAll(p.pinDir()); err != nil {
			errs = append(errs, err) // a policy.New that failed half-way
		}
		errs = append(errs, nat.Disable(nat.Options{Pool: p.pool, Table: p.linkPrefix, NetNS: netns.None()}))
	}
	if p.st != nil {
		errs = append(errs, p.st.Close())
	}
	if p.unlock != nil {
		p.unlock()
	}
	return errors.Join(errs...)
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

// startEgress loads the eBPF egress policy (pinned under
// /sys/fs/bpf/cubicle/<linkPrefix>, adopted again after a restart), keeps
// its hard-denied host addresses in step with the host's until ctx ends,
// sweeps expired domain answers from it, and sets up masquerading of the
// sandbox pool out of the default route. Without a default route
// sandboxes still run, with no way out. opts carries the operator's
// --deny-cidr and --allow-cidr; the rest is filled in here.
func startEgress(ctx context.Context, pool netip.Prefix, linkPrefix string, opts policy.Options, log *slog.Logger) (*policy.Manager, error) {
	// The host's addresses, networks and gateways are denied from the
	// first packet on; a start with none would open them to adopted
	// sandboxes until FollowHostAddrs.
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("egress policy: netlink: %w", err)
	}
	hostAddrs, err := policy.HostAddrs(h, pool)
	if err == nil {
		opts.HostLAN, err = policy.HostLAN(h, pool)
	}
	h.Close()
	if err != nil {
		return nil, fmt.Errorf("egress policy: %w", err)
	}
	opts.Name, opts.PoolPrefix, opts.HostAddrs, opts.NetNS, opts.Logger = linkPrefix, pool, hostAddrs, netns.None(), log
	pm, err := policy.New(opts)
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
		if ap.Port() == 0 || ap.Addr().IsUnspecified() {
			return nil, fmt.Errorf("--dns-upstream: %q is not a server's address", f)
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

// banner is what printBanner shows.
type banner struct {
	apiURL, sandboxURL, domain, dataDir string
	// apiKey is the first API key, made by this start; "" when keys
	// existed or stdout is not a terminal.
	apiKey string
}

func printBanner(w io.Writer, b banner) {
	key := b.apiKey
	if key == "" {
		key = "<your key>"
	}
	fmt.Fprintf(w, `
cubicle is serving.
  API:         %s
  sandbox URL: %s
  domain:      %s
`, b.apiURL, b.sandboxURL, b.domain)
	if b.apiKey != "" {
		fmt.Fprintf(w, "  API key:     %s   (shown once; stored hashed)\n", b.apiKey)
	} else {
		fmt.Fprintf(w, "  API key:     make one with `cubicle keys create --data-dir %s` (printed once)\n", b.dataDir)
	}
	fmt.Fprintf(w, `
Point the E2B SDK at it:
  export E2B_API_URL=%s E2B_SANDBOX_URL=%s E2B_DOMAIN=%s E2B_API_KEY=%s
  export E2B_VOLUME_API_URL=%s   # the Volume class's file methods

`, b.apiURL, b.sandboxURL, b.domain, key, b.apiURL)
}

// firstAPIKey makes the first API key when there is none, so that a fresh
// install started by hand is usable at once, and returns it for printing;
// it returns "" when keys already exist. It makes none when out is not a
// terminal: there the banner would put the secret into a log (a journal,
// a file), so the banner tells the operator to run `cubicle keys create`,
// which prints a key to whoever asked for it. Writing the key to a file
// instead would leave a plain-text secret behind that nothing removes.
func firstAPIKey(ctx context.Context, st *store.Store, out *os.File) (string, error) {
	if !term.IsTerminal(int(out.Fd())) {
		return "", nil
	}
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
