// Package e2e is the end-to-end suite: it starts a real `cubicle serve` (the
// binary in $CUBICLE_BIN, or one it builds) and drives it with the real E2B
// npm SDKs (e2e/sdk) and with raw HTTP for the bad-input cases.
package e2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/client"
	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/nat"
	"github.com/cubicle-dev/cubicle/network/policy"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
)

// server is one running `cubicle serve` under test.
type server struct {
	bin, dataDir string
	apiURL       string
	sandboxURL   string
	apiKey       string
	cmd          *exec.Cmd
	exited       chan struct{} // closed when cmd has been waited for
	log          *syncBuffer
}

var (
	srv *server
	// fakeNet is the fake internet sandboxes resolve names in and reach.
	fakeNet *inet
)

// The e2e server's own address pool and device-name prefix, apart from a
// developer's server on the same host.
const (
	e2ePool       = "100.90.0.0/16"
	e2eLinkPrefix = "cbe"
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		// Not a silent "ok": the suite exists to run a real server, and
		// a run that cannot start one has tested nothing.
		fmt.Fprintln(os.Stderr, "e2e: FAIL: the end-to-end suite starts a real cubicle serve, which needs root: run it as root (scripts/test.sh does)")
		os.Exit(1)
	}
	code, err := run(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		if srv != nil {
			fmt.Fprintf(os.Stderr, "--- cubicle serve log ---\n%s\n", srv.log.String())
		}
		os.Exit(1)
	}
	os.Exit(code)
}

func run(m *testing.M) (int, error) {
	bin := os.Getenv("CUBICLE_BIN")
	if bin == "" {
		dir, err := os.MkdirTemp("", "cubicle-e2e-bin-")
		if err != nil {
			return 0, err
		}
		defer os.RemoveAll(dir)
		bin = filepath.Join(dir, "cubicle")
		build := exec.Command("go", "build", "-o", bin, "../cmd/cubicle")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			return 0, fmt.Errorf("building cubicle: %v\n%s", err, out)
		}
	}
	// The data dir holds a copy of the base template; /var/tmp is on disk,
	// not a tmpfs.
	dataDir, err := os.MkdirTemp("/var/tmp", "cubicle-e2e-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dataDir)
	key, err := exec.Command(bin, "keys", "create", "--data-dir", dataDir, "--name", "e2e").Output()
	if err != nil {
		return 0, fmt.Errorf("cubicle keys create: %w", err)
	}
	fakeNet, err = startInet(netip.MustParsePrefix(e2ePool))
	if err != nil {
		return 0, err
	}
	defer fakeNet.Close()
	srv = &server{bin: bin, dataDir: dataDir, apiKey: strings.TrimSpace(string(key))}
	if err := srv.start(); err != nil {
		return 0, err
	}
	code := m.Run()
	if code != 0 {
		fmt.Fprintf(os.Stderr, "--- cubicle serve log (last 150 lines) ---\n%s\n", srv.log.tail(150))
	}
	srv.killAll()
	stopErr := srv.stop()
	// A server that died mid-test, or did not stop, left sandboxes the
	// API could not kill: destroy them from their state.
	if err := reapLeftovers(srv.dataDir); err != nil {
		return code, errors.Join(stopErr, err)
	}
	if stopErr != nil {
		return code, stopErr
	}
	// runsc keeps an empty network namespace mounted in its state root
	// (one per concurrent first use); it would pin the data dir.
	for i := 0; i < 16 && unix.Unmount(filepath.Join(srv.dataDir, "gvisor", "runsc", "null-netns"), unix.MNT_DETACH) == nil; i++ {
	}
	// serve leaves its egress maps pinned and its NAT table in place on
	// purpose (a restart adopts them); the test's are removed here.
	if err := os.RemoveAll(filepath.Join(policy.DefaultPinRoot, e2eLinkPrefix)); err != nil {
		return code, err
	}
	if err := nat.Disable(nat.Options{Pool: netip.MustParsePrefix(e2ePool), Table: e2eLinkPrefix, NetNS: netns.None()}); err != nil {
		return code, err
	}
	return code, nil
}

// start runs cubicle serve and waits for its ready file.
func (s *server) start() error {
	ready := filepath.Join(s.dataDir, "ready")
	os.Remove(ready)
	args := []string{"serve", "--data-dir", s.dataDir, "--api-addr", "127.0.0.1:0", "--proxy-addr", "127.0.0.1:0",
		"--ready-file", ready, "--pool-size", "2", "--log-level", "debug",
		// Its own addresses and device names: a developer's server may be
		// running on the same host.
		"--network-prefix", e2ePool, "--link-prefix", e2eLinkPrefix,
		// Sandboxes resolve names in the fake internet only, and reach it
		// as the internet: it is TEST-NET-2 and this host's LAN, both
		// closed by default.
		"--dns-upstream", fakeNet.dns.String(), "--allow-cidr", inetNet}
	s.cmd = exec.Command(s.bin, args...)
	if s.log == nil {
		s.log = &syncBuffer{}
	}
	s.cmd.Stdout = s.log
	s.cmd.Stderr = s.log
	if os.Getenv("CUBICLE_E2E_VERBOSE") != "" {
		s.cmd.Stdout = io.MultiWriter(s.log, os.Stderr)
		s.cmd.Stderr = s.cmd.Stdout
	}
	if err := s.cmd.Start(); err != nil {
		return err
	}
	s.exited = make(chan struct{})
	var waitErr error
	go func() { waitErr = s.cmd.Wait(); close(s.exited) }()
	// The first start builds the base template (a debootstrap when the
	// cache is cold), so this waits long.
	deadline := time.After(15 * time.Minute)
	for {
		if b, err := os.ReadFile(ready); err == nil {
			for _, line := range strings.Split(string(b), "\n") {
				if k, v, ok := strings.Cut(line, "="); ok {
					switch k {
					case "api":
						s.apiURL = "http://" + v
					case "proxy":
						s.sandboxURL = "http://" + v
					}
				}
			}
			return nil
		}
		select {
		case <-s.exited:
			return fmt.Errorf("cubicle serve exited before serving: %v; its log ends:\n%s", waitErr, s.log.tail(40))
		case <-deadline:
			s.cmd.Process.Kill()
			return fmt.Errorf("cubicle serve not ready after 15 minutes")
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stop ends cubicle serve the way an operator does (SIGTERM).
func (s *server) stop() error {
	if s.cmd == nil || s.cmd.Process == nil {
		return nil
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
		return nil
	case <-time.After(60 * time.Second):
		s.cmd.Process.Kill()
		return fmt.Errorf("cubicle serve did not stop within 60s of SIGTERM")
	}
}

func (s *server) client() *client.Client {
	return client.New(s.apiURL, s.sandboxURL, s.apiKey)
}

// killAll removes every sandbox the tests left behind.
func (s *server) killAll() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := s.client()
	sbs, err := c.List(ctx)
	if err != nil {
		return
	}
	for _, sb := range sbs {
		c.Kill(ctx, sb.SandboxID)
	}
}

// env is the environment an E2B SDK user sets to reach this server.
func (s *server) env() []string {
	return append(append(os.Environ(),
		"E2B_API_URL="+s.apiURL,
		// The SDK's Volume file methods call the content API, which
		// cubicle serves on its API address.
		"E2B_VOLUME_API_URL="+s.apiURL,
		"E2B_SANDBOX_URL="+s.sandboxURL,
		"E2B_DOMAIN=cubicle.localhost",
		"E2B_API_KEY="+s.apiKey,
	), fakeNet.env()...)
}

type syncBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// tail returns the last n lines written.
func (b *syncBuffer) tail(n int) string {
	lines := strings.Split(strings.TrimRight(b.String(), "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// runNode runs node test files from e2e/sdk against the server.
func runNode(t *testing.T, args ...string) {
	t.Helper()
	if _, err := os.Stat("sdk/node_modules/e2b"); err != nil {
		t.Fatalf("the E2B SDK is not installed: run scripts/deps.sh --test (npm ci in e2e/sdk): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", append([]string{"--test", "--test-reporter=spec", "--test-concurrency=2", "--test-force-exit"}, args...)...)
	cmd.Dir = "sdk"
	cmd.Env = srv.env()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		t.Log(sc.Text())
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("node tests failed: %v", err)
	}
}

func TestSDK(t *testing.T) {
	runNode(t, "sandbox.test.mjs", "commands.test.mjs", "pty.test.mjs", "files.test.mjs", "lifecycle.test.mjs", "network.test.mjs", "snapshot.test.mjs", "rollback.test.mjs")
}

// TestSDKDeadSandboxes: sandboxes that die under the SDK (dead.test.mjs).
func TestSDKDeadSandboxes(t *testing.T) {
	runNode(t, "dead.test.mjs")
}

func TestSDKv1(t *testing.T) {
	runNode(t, "v1.test.mjs")
}

// TestServerKeepsServing checks the server still answers after the suites.
func TestServerKeepsServing(t *testing.T) {
	resp, err := http.Get(srv.apiURL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("health: %s", resp.Status)
	}
}

// reapLeftovers destroys every sandbox still in dataDir's runtime state,
// with the runtime and network code serve itself uses, and removes the
// network devices left (spares of a server that did not close its pool).
// With nothing left it does nothing.
func reapLeftovers(dataDir string) error {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	pool, err := network.NewPool(network.Options{Prefix: netip.MustParsePrefix(e2ePool), LinkPrefix: e2eLinkPrefix, Logger: log})
	if err != nil {
		return fmt.Errorf("reaping leftovers: %w", err)
	}
	defer pool.Close()
	rt, err := gvisor.New(gvisor.Options{Runsc: os.Getenv("CUBICLE_RUNSC"), StateDir: filepath.Join(dataDir, "gvisor"), Logger: log})
	if err != nil {
		return fmt.Errorf("reaping leftovers: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sbs, err := rt.List(ctx)
	if err != nil {
		return fmt.Errorf("reaping leftovers: %w", err)
	}
	var errs []error
	for _, sb := range sbs {
		fmt.Fprintf(os.Stderr, "e2e: destroying sandbox %s left by the server\n", sb.ID)
		errs = append(errs, rt.Kill(ctx, sb.ID))
	}
	// Then their devices, as the orchestrator releases them after a kill.
	for _, a := range pool.List() {
		errs = append(errs, pool.Teardown(ctx, a.ID))
	}
	return errors.Join(errs...)
}
