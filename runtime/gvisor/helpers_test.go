package gvisor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
)

// probePath is the test stand-in for envd (testdata/probe), built once by
// TestMain as a static binary.
var probePath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cubicle-probe-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	probePath = filepath.Join(dir, "probe")
	cmd := exec.Command("go", "build", "-o", probePath, "./testdata/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building testdata/probe: %v\n%s", err, out)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireRunsc fails the test loudly when it cannot run sandboxes (no root,
// no runsc), unless CUBICLE_SKIP_RUNSC=1 asks to skip such tests.
func requireRunsc(tb testing.TB) {
	tb.Helper()
	var why string
	if os.Geteuid() != 0 {
		why = "these tests need root (namespaces, mounts, cgroups)"
	} else if _, err := FindRunsc("", ""); err != nil {
		why = err.Error()
	} else {
		return
	}
	if os.Getenv("CUBICLE_SKIP_RUNSC") == "1" {
		tb.Skipf("skipped by CUBICLE_SKIP_RUNSC=1: %s", why)
	}
	tb.Fatalf("%s; set CUBICLE_SKIP_RUNSC=1 to skip the gVisor tests", why)
}

// env is one test's world: a network pool and a runtime over a fresh state
// dir. Its cleanup kills every sandbox left and checks nothing leaked. As
// the orchestrator does, create claims each sandbox's devices from the
// pool before the runtime runs it, and kill releases them after.
type env struct {
	tb       testing.TB
	stateDir string
	// cgroupParent keeps the env's cgroups apart from a server's and from
	// other test processes', so the leak check sees only its own.
	cgroupParent string
	netOpts      network.Options
	pool         *network.Pool
	rt           *Runtime
}

// newEnv makes an env whose pool uses prefix: test prefixes lie in
// 100.88.0.0/16, outside network.DefaultPrefix, so that a server or another
// package's tests using the default pool on this host do not collide with
// them in the pool's overlap check.
func newEnv(tb testing.TB, prefix string) *env {
	tb.Helper()
	return newEnvAt(tb, prefix, tb.TempDir())
}

// newEnvAt is newEnv with the runtime's state in stateDir.
func newEnvAt(tb testing.TB, prefix, stateDir string) *env {
	tb.Helper()
	requireRunsc(tb)
	e := &env{tb: tb, stateDir: stateDir, cgroupParent: fmt.Sprintf("/cubicle-test-%d-%d", os.Getpid(), time.Now().UnixNano())}
	e.netOpts = network.Options{
		Prefix:     netip.MustParsePrefix(prefix),
		NetnsDir:   tb.TempDir(),
		LinkPrefix: "cbgv",
		Logger:     e.logger(),
	}
	e.pool, e.rt = e.restart()
	tb.Cleanup(e.cleanup)
	return e
}

// restart makes a new pool and runtime over the same state, as a server
// restart does.
func (e *env) restart() (*network.Pool, *Runtime) {
	e.tb.Helper()
	pool, err := network.NewPool(e.netOpts)
	if err != nil {
		e.tb.Fatal(err)
	}
	rt, err := New(Options{
		StateDir:     e.stateDir,
		CgroupParent: e.cgroupParent,
		Logger:       e.logger(),
	})
	if err != nil {
		e.tb.Fatal(err)
	}
	return pool, rt
}

// create claims cfg.ID's network devices and starts the sandbox in them;
// on error the devices go again.
func (e *env) create(ctx context.Context, cfg runtime.Config) (runtime.Sandbox, error) {
	att, err := e.pool.Setup(ctx, cfg.ID)
	if err != nil {
		return runtime.Sandbox{}, err
	}
	cfg.Network = att
	sb, err := e.rt.Create(ctx, cfg)
	if err != nil {
		if terr := e.pool.Teardown(ctx, cfg.ID); terr != nil {
			e.tb.Errorf("releasing the network of a failed create: %v", terr)
		}
		return runtime.Sandbox{}, err
	}
	return sb, nil
}

// kill destroys sandbox id, then releases its network devices.
func (e *env) kill(ctx context.Context, id string) error {
	if err := e.rt.Kill(ctx, id); err != nil {
		return err
	}
	return e.pool.Teardown(ctx, id)
}

// logger sends the runtime's log to the test's log, shown when it fails
// or with -v. Benchmarks always print their log, so they get none.
func (e *env) logger() *slog.Logger {
	if _, ok := e.tb.(*testing.B); ok {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(tbWriter{e.tb}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tbWriter struct{ tb testing.TB }

func (w tbWriter) Write(p []byte) (int, error) {
	w.tb.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

func (e *env) cleanup() {
	ctx := context.Background()
	sbs, err := e.rt.List(ctx)
	if err != nil {
		e.tb.Errorf("List at cleanup: %v", err)
	}
	for _, sb := range sbs {
		if err := e.rt.Kill(ctx, sb.ID); err != nil {
			e.tb.Errorf("Kill %s at cleanup: %v", sb.ID, err)
		}
	}
	for _, a := range e.pool.List() {
		if err := e.pool.Teardown(ctx, a.ID); err != nil {
			e.tb.Errorf("Teardown %s at cleanup: %v", a.ID, err)
		}
	}
	e.checkNoLeaks()
	// runsc keeps one empty network namespace for all gofers under its
	// root (--gofer-network-namespace=null), stacked by concurrent
	// creates; it is shared, not a sandbox's: Close removes every layer.
	if err := e.rt.Close(); err != nil {
		e.tb.Errorf("Close: %v", err)
	}
	for _, m := range mountsUnder(e.tb, e.rt.runscRoot) {
		e.tb.Errorf("mount left after Close: %s", m)
	}
}

// checkNoLeaks asserts that nothing of any sandbox is left: no sandbox
// directory, no runsc container, no mount under the state dir, no loop
// device backed by a file under it, no network device or namespace, no
// cgroup. The disk image cache is the runtime's, not a sandbox's.
func (e *env) checkNoLeaks() {
	e.tb.Helper()
	ents, _ := os.ReadDir(e.stateDir)
	for _, ent := range ents {
		if ent.Name() != runscDir && ent.Name() != diskCacheDir {
			e.tb.Errorf("leaked sandbox dir %s", ent.Name())
		}
	}
	for _, l := range loopDevicesUnder(e.stateDir) {
		e.tb.Errorf("leaked loop device %s", l)
	}
	if out, err := e.rt.runscCmd(context.Background(), "list", "--quiet"); err != nil || strings.TrimSpace(string(out)) != "" {
		e.tb.Errorf("runsc still lists containers: %q %v", out, err)
	}
	for _, m := range append(mountsUnder(e.tb, e.stateDir), mountsUnder(e.tb, e.netOpts.NetnsDir)...) {
		if m == filepath.Join(e.rt.runscRoot, "null-netns") {
			continue
		}
		e.tb.Errorf("leaked mount %s", m)
	}
	if left, err := e.pool.Devices(); err != nil || len(left) > 0 {
		e.tb.Errorf("leaked network devices %v %v", left, err)
	}
	// Every hierarchy, named ones (name=systemd) included.
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", e.cgroupParent))
	for _, d := range dirs {
		subs, _ := os.ReadDir(d)
		for _, s := range subs {
			if s.IsDir() {
				e.tb.Errorf("leaked cgroup %s", filepath.Join(d, s.Name()))
			}
		}
		os.Remove(d) // the parent; a server would keep it, a test drops it
	}
}

// loopDevicesUnder lists the loop devices whose backing file is under dir,
// as "/dev/loopN (file)"; a deleted file still shows its old path.
func loopDevicesUnder(dir string) []string {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // detached meanwhile
		}
		if backing := strings.TrimSpace(string(b)); strings.HasPrefix(backing, dir+"/") {
			dev := filepath.Base(filepath.Dir(filepath.Dir(f)))
			out = append(out, fmt.Sprintf("/dev/%s (%s)", dev, backing))
		}
	}
	return out
}

func mountsUnder(tb testing.TB, dir string) []string {
	tb.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		tb.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir) {
			out = append(out, f[4])
		}
	}
	return out
}

// makeTemplate builds a minimal root filesystem: the directories runsc
// mounts over, an /etc/passwd, and a marker file.
func makeTemplate(tb testing.TB) string {
	tb.Helper()
	root := tb.TempDir()
	for _, d := range []string{"proc", "dev", "tmp", "etc", "sys", "root", "home"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			tb.Fatal(err)
		}
	}
	files := map[string]string{
		"etc/passwd":   "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
		"etc/group":    "root:x:0:\nuser:x:1000:\n",
		"etc/template": "from the template\n",
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(root, name), []byte(data), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	return root
}

// treeDigest summarises every path, mode, size, mtime and content under
// root, to show that a template was not modified.
func treeDigest(tb testing.TB, root string) string {
	tb.Helper()
	var lines []string
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		line := fmt.Sprintf("%s %v %d %d", path, fi.Mode(), fi.Size(), fi.ModTime().UnixNano())
		if fi.Mode().IsRegular() {
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			line += " " + hex.EncodeToString(sum[:])
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// config is a sandbox configuration over template with the probe as envd.
func config(id, template string) runtime.Config {
	return runtime.Config{
		ID:         id,
		TemplateID: "test",
		RootFS:     template,
		CPUCount:   1,
		MemoryMB:   256,
		DiskSizeMB: 1024,
		Envd:       probePath,
		EnvdArgs:   []string{"-port", "49983"},
	}
}

// testID makes a sandbox ID that differs between test runs, so a run never
// meets the leftovers of an earlier one.
func testID(name string) string {
	s := fmt.Sprintf("%s%x", name, time.Now().UnixNano())
	if len(s) > 20 {
		s = s[:20]
	}
	return s
}

var client = &http.Client{Timeout: 5 * time.Second}

func url(sb runtime.Sandbox, path string) string {
	return fmt.Sprintf("http://%s%s", netip.AddrPortFrom(sb.Addr, runtime.EnvdPort), path)
}

// waitHealthy polls envd's /health until it answers 204.
func waitHealthy(tb testing.TB, sb runtime.Sandbox, timeout time.Duration) {
	tb.Helper()
	if err := pollHealth(sb.Addr, timeout); err != nil {
		tb.Fatalf("sandbox %s: %v", sb.ID, err)
	}
}

// pollHealth connects to envd's port until it accepts, then asks /health.
// Until the sentry serves the address, connections are refused at once, so
// polling every millisecond costs little.
func pollHealth(addr netip.Addr, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	ap := netip.AddrPortFrom(addr, runtime.EnvdPort).String()
	var err error
	for time.Now().Before(deadline) {
		var c net.Conn
		c, err = net.DialTimeout("tcp", ap, 100*time.Millisecond)
		if err != nil {
			time.Sleep(time.Millisecond)
			continue
		}
		c.SetDeadline(time.Now().Add(time.Second))
		_, err = io.WriteString(c, "GET /health HTTP/1.0\r\n\r\n")
		var buf [32]byte
		n, _ := io.ReadAtLeast(c, buf[:], 12)
		c.Close()
		if err == nil && strings.HasPrefix(string(buf[:n]), "HTTP/1.0 204") {
			return nil
		}
		err = fmt.Errorf("/health answered %q", buf[:n])
		time.Sleep(time.Millisecond)
	}
	return fmt.Errorf("envd not healthy within %v: %v", timeout, err)
}

func get(tb testing.TB, sb runtime.Sandbox, path string) (int, string) {
	tb.Helper()
	resp, err := client.Get(url(sb, path))
	if err != nil {
		tb.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func post(tb testing.TB, sb runtime.Sandbox, path string) (int, string) {
	tb.Helper()
	resp, err := client.Post(url(sb, path), "text/plain", nil)
	if err != nil {
		tb.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
