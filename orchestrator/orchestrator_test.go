package orchestrator

import (
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
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/capacity"
	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
	"github.com/cubicle-dev/cubicle/store"
)

// These tests drive the orchestrator over the real gVisor runtime and the
// real envd (this repository's cubicle binary, built by TestMain) in a
// minimal root filesystem: nothing of the sandbox is faked.

var envdBin, faultsBin string

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		// Every test skips, saying so, in newWorld; there is no envd to build.
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "cubicle-orch-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	envdBin = filepath.Join(dir, "cubicle")
	faultsBin = filepath.Join(dir, "faults")
	for bin, pkg := range map[string]string{envdBin: "../cmd/cubicle", faultsBin: "./testdata/faults"} {
		build := exec.Command("go", "build", "-o", bin, pkg)
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building %s: %v\n%s", pkg, err, out)
			os.Exit(2)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// minimalRootFS is enough for envd: the dirs it mounts over and a passwd
// with the default user; and /faults (testdata/faults).
func minimalRootFS(t *testing.T) string {
	root := t.TempDir()
	for _, d := range []string{"proc", "dev", "tmp", "sys", "etc", "home/user", "root", "run"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.Chmod(filepath.Join(root, "tmp"), 0o777|os.ModeSticky)
	os.Chown(filepath.Join(root, "home/user"), 1000, 1000)
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
		"etc/group":  "root:x:0:\nuser:x:1000:\n",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(root, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	faults, err := os.ReadFile(faultsBin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "faults"), faults, 0o755); err != nil {
		t.Fatal(err)
	}
	return root
}

type templates map[string]Template

func (ts templates) Lookup(id string) (Template, error) {
	t, ok := ts[id]
	if !ok {
		return Template{}, errors.New("no such template")
	}
	return t, nil
}

// world is one test's host: store, network pool, runtime, templates.
type world struct {
	dataDir string
	st      *store.Store
	rt      *gvisor.Runtime
	net     *network.Pool
	tmpls   templates
	evicted chan string
	// egress, when set (newEgressWorld), puts every device the world's
	// pools make under an egress enforcer, as cubicle serve does.
	egress *egressKit
}

func newWorld(t *testing.T, subnet string) *world {
	t.Helper()
	testenv.RequireRoot(t, "starts gVisor sandboxes: namespaces, mounts, cgroups")
	return newWorldAt(t, subnet, t.TempDir())
}

// newWorldAt is newWorld with its data in dataDir.
func newWorldAt(t *testing.T, subnet, dataDir string) *world {
	t.Helper()
	st, err := store.Open(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	w := &world{dataDir: dataDir, st: st, evicted: make(chan string, 64)}
	w.rt = w.runtime(t, subnet)
	w.tmpls = templates{"tiny": {ID: "tiny", Alias: "tiny", RootFS: minimalRootFS(t), CPUCount: 1, MemoryMB: 256, DiskSizeMB: 512}}
	return w
}

func (w *world) runtime(t *testing.T, subnet string) *gvisor.Runtime {
	t.Helper()
	netOpts := network.Options{Prefix: netip.MustParsePrefix(subnet), LinkPrefix: "cbo", NetnsDir: filepath.Join("/run/netns")}
	if w.egress != nil {
		netOpts = w.egress.poolOptions(netOpts)
	}
	pool, err := network.NewPool(netOpts)
	if err != nil {
		t.Fatal(err)
	}
	w.net = pool
	stateDir := filepath.Join(w.dataDir, "gvisor")
	rt, err := gvisor.New(gvisor.Options{StateDir: stateDir, CgroupParent: "/cubicle-orchestrator-test",
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		list, _ := rt.List(context.Background())
		for _, s := range list {
			rt.Kill(context.Background(), s.ID)
		}
		for _, a := range pool.List() {
			pool.Teardown(context.Background(), a.ID)
		}
		// runsc keeps an empty network namespace per state root mounted
		// here for its gofers (concurrent creates may stack several); it is
		// runsc's, not a sandbox's.
		for i := 0; i < 16 && unix.Unmount(filepath.Join(stateDir, "runsc", "null-netns"), unix.MNT_DETACH) == nil; i++ {
		}
	})
	return rt
}

func (w *world) orchestrator(t *testing.T, poolSize int) *Orchestrator {
	t.Helper()
	return w.orchestratorWith(t, poolSize, nil)
}

// orchestratorWith is orchestrator with admission control by ledger.
func (w *world) orchestratorWith(t *testing.T, poolSize int, ledger *capacity.Ledger) *Orchestrator {
	t.Helper()
	opts := Options{
		Runtime: w.rt, Network: w.net, Store: w.st, Templates: w.tmpls,
		Envd: envdBin, EnvdArgs: []string{"envd"},
		PoolSize: poolSize, PoolTemplates: []string{"tiny"},
		SnapshotDir: filepath.Join(w.dataDir, "snapshots"),
		MaxTimeout:  time.Hour, MetricsInterval: time.Hour,
		Capacity: ledger,
		OnEvict:  func(id string) { w.evicted <- id },
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	if w.egress != nil {
		opts.Egress = w.egress.enf
	}
	o, err := New(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

func health(t *testing.T, in Info) error {
	t.Helper()
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(envdURL(in.Address, "/envs"))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		return fmt.Errorf("/envs without the token answered %s, want 401: the token is not set", resp.Status)
	}
	return nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 300; i++ {
		if cond() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestCreateFromPoolNeverTwiceAndKill(t *testing.T) {
	w := newWorld(t, "100.89.0.0/24")
	o := w.orchestrator(t, 2)
	defer o.Close(context.Background())

	p, err := o.poolFor("tiny")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the pool to fill", func() bool { return len(p.ready) == 2 })

	const n = 5 // more than the pool holds: some are started cold
	var wg sync.WaitGroup
	infos := make([]Info, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			infos[i], errs[i] = o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Minute, Metadata: map[string]string{"i": fmt.Sprint(i)}})
		}()
	}
	wg.Wait()
	seen := map[string]bool{}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("create %d: %v", i, errs[i])
		}
		if seen[infos[i].ID] || seen[infos[i].Address.String()] {
			t.Fatalf("sandbox %s / %s handed out twice", infos[i].ID, infos[i].Address)
		}
		seen[infos[i].ID], seen[infos[i].Address.String()] = true, true
		if err := health(t, infos[i]); err != nil {
			t.Fatalf("sandbox %s: %v", infos[i].ID, err)
		}
	}
	recs, _ := w.st.ListSandboxes(context.Background())
	if len(recs) != n {
		t.Fatalf("store holds %d records, want %d", len(recs), n)
	}

	victim := infos[0]
	if err := o.Kill(context.Background(), victim.ID); err != nil {
		t.Fatal(err)
	}
	if got := <-w.evicted; got != victim.ID {
		t.Fatalf("evicted %s, want %s", got, victim.ID)
	}
	if _, err := o.Get(victim.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("killed sandbox still there: %v", err)
	}
	if err := o.Kill(context.Background(), victim.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second kill: %v, want ErrNotFound", err)
	}
	waitFor(t, "the runtime to destroy the killed sandbox", func() bool {
		list, _ := w.rt.List(context.Background())
		for _, s := range list {
			if s.ID == victim.ID {
				return false
			}
		}
		return true
	})
}

func TestTimeoutsPauseResumeAndRestart(t *testing.T) {
	w := newWorld(t, "100.89.1.0/24")
	o := w.orchestrator(t, 0)

	expiring, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	napping, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Second, AutoPause: true})
	if err != nil {
		t.Fatal(err)
	}
	keeper, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "expiry", func() bool {
		_, gone := o.Get(expiring.ID)
		sb, err := o.Get(napping.ID)
		return gone != nil && err == nil && sb.Info().State == StatePaused
	})
	if err := o.Pause(context.Background(), napping.ID, PauseOptions{}); !errors.Is(err, ErrAlreadyPaused) {
		t.Fatalf("pausing a paused sandbox: %v", err)
	}
	if _, err := o.Resume(context.Background(), keeper.ID, time.Minute); !errors.Is(err, ErrNotPaused) {
		t.Fatalf("resuming a running sandbox: %v", err)
	}
	if err := o.SetTimeout(context.Background(), keeper.ID, 2*time.Hour); !errors.Is(err, ErrInvalid) {
		t.Fatalf("timeout past the maximum: %v", err)
	}

	// A restart: the orchestrator goes away, a new one over the same store
	// and a new runtime instance finds the sandboxes again.
	if err := o.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.rt = w.runtime(t, "100.89.1.0/24")
	o = w.orchestrator(t, 0)
	defer o.Close(context.Background())
	sb, err := o.Get(napping.ID)
	if err != nil || sb.Info().State != StatePaused {
		t.Fatalf("paused sandbox after restart: %v %+v", err, sb)
	}
	if _, err := o.Get(expiring.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired sandbox came back: %v", err)
	}
	info, resumed, err := o.Connect(context.Background(), napping.ID, time.Minute)
	if err != nil || !resumed {
		t.Fatalf("connect to the paused sandbox: resumed=%v, %v", resumed, err)
	}
	if err := health(t, info); err != nil {
		t.Fatal(err)
	}
	kept, err := o.Get(keeper.ID)
	if err != nil {
		t.Fatal(err)
	}
	if err := health(t, kept.Info()); err != nil {
		t.Fatal(err)
	}
	ms, err := o.Metrics(context.Background(), keeper.ID, time.Time{}, time.Time{})
	if err != nil || len(ms) == 0 || ms[0].MemTotal == 0 {
		t.Fatalf("metrics: %+v, %v", ms, err)
	}
}

func TestCreateRejects(t *testing.T) {
	w := newWorld(t, "100.89.2.0/24")
	o := w.orchestrator(t, 0)
	defer o.Close(context.Background())
	for _, tc := range []struct {
		req  CreateRequest
		want error
	}{
		{CreateRequest{Template: "nope", Timeout: time.Minute}, ErrTemplateNotFound},
		{CreateRequest{Template: "tiny", Timeout: 0}, ErrInvalid},
		{CreateRequest{Template: "tiny", Timeout: 2 * time.Hour}, ErrInvalid},
	} {
		if _, err := o.Create(context.Background(), tc.req); !errors.Is(err, tc.want) {
			t.Errorf("Create(%+v) = %v, want %v", tc.req, err, tc.want)
		}
	}
	if got := NewID(); len(got) != 20 {
		t.Fatalf("NewID() = %q", got)
	}
	var _ runtime.Runtime = w.rt
}

// TestTimeoutCountsFromHandOut creates a sandbox cold (no pool: the runtime
// boots it on the request path, which takes a while) and checks that its
// timeout runs from when it was handed out, not from the request.
func TestTimeoutCountsFromHandOut(t *testing.T) {
	w := newWorld(t, "100.89.3.0/24")
	o := w.orchestrator(t, 0)
	defer o.Close(context.Background())
	const timeout = 30 * time.Second
	called := time.Now()
	info, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: timeout})
	returned := time.Now()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cold create took %s", returned.Sub(called))
	if left := info.EndAt.Sub(returned); left < timeout-time.Second {
		t.Fatalf("the sandbox was handed out with %s left of its %s timeout", left, timeout)
	}
	if got := info.EndAt.Sub(info.StartedAt); got != timeout {
		t.Fatalf("endAt - startedAt = %s, want %s", got, timeout)
	}
	// startedAt is the hand-out: nearer the answer than the request, since
	// booting the sandbox takes far longer than recording it.
	if info.StartedAt.Sub(called) <= returned.Sub(info.StartedAt) {
		t.Fatalf("startedAt %s is the request's time (%s), not the hand-out's (%s)",
			info.StartedAt.Format(time.StampMicro), called.Format(time.StampMicro), returned.Format(time.StampMicro))
	}
}

// TestAdmission runs a host configured to hold 768 MiB of sandboxes:
// creates past that are refused with ErrHostFull before anything is made,
// pooled sandboxes yield to user ones, and a kill makes room again.
func TestAdmission(t *testing.T) {
	w := newWorld(t, "100.89.3.0/24")
	big := w.tmpls["tiny"]
	big.ID, big.Alias, big.MemoryMB = "big", "big", 512
	w.tmpls["big"] = big
	ledger, err := capacity.New(capacity.Options{HostMemoryMB: 1024, ReserveMemoryMB: 256, HostCPUs: 64, DiskPath: w.dataDir})
	if err != nil {
		t.Fatal(err)
	}
	o := w.orchestratorWith(t, 1, ledger)
	defer o.Close(context.Background())
	ctx := context.Background()
	tiny, _ := o.poolFor("tiny")
	waitFor(t, "the tiny pool to fill", func() bool { return len(tiny.ready) == 1 })
	used := func() float64 { return ledger.Usage().MemoryMB }
	runtimeCount := func() int {
		list, err := w.rt.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return len(list)
	}

	// 256 pooled + 512 big: the host is full, big's own pool cannot fill.
	// (big's pool starts filling with the create; whichever gets in, the
	// user's create wins, and tiny's pool refills after.)
	b1, err := o.Create(ctx, CreateRequest{Template: "big", Timeout: time.Minute})
	if err != nil {
		t.Fatalf("big create on an empty host: %v", err)
	}
	waitFor(t, "the tiny pool to refill", func() bool { return len(tiny.ready) == 1 && used() == 768 })
	// The pooled tiny one is handed out: no new promise.
	t1, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Minute})
	if err != nil {
		t.Fatalf("tiny create from the pool: %v", err)
	}
	n := runtimeCount()
	_, err = o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Minute})
	if !errors.Is(err, ErrHostFull) {
		t.Fatalf("create on a full host: %v, want ErrHostFull", err)
	}
	t.Logf("refused: %v", err)
	if !strings.Contains(err.Error(), "host is full: 0.8 of 0.8 GiB memory promised to sandboxes") || !strings.Contains(err.Error(), "refused 256 MiB") {
		t.Errorf("refusal %q does not say what was exhausted", err)
	}
	if got := runtimeCount(); got != n {
		t.Fatalf("the refused create left %d runtime sandboxes, had %d", got, n)
	}
	for _, in := range []Info{b1, t1} {
		if err := health(t, in); err != nil {
			t.Fatalf("sandbox %s after a refusal: %v", in.ID, err)
		}
	}

	// A kill makes room: either big's pool or tiny's refills (whichever
	// admission lets in first); a big create then succeeds, from its pool
	// or by destroying the pooled tiny one.
	if err := o.Kill(ctx, b1.ID); err != nil {
		t.Fatal(err)
	}
	bigPool, _ := o.poolFor("big")
	waitFor(t, "a pool to refill", func() bool {
		return (len(tiny.ready) == 1 && used() == 512) || (len(bigPool.ready) == 1 && used() == 768)
	})
	t.Logf("after the kill: %d tiny and %d big pooled", len(tiny.ready), len(bigPool.ready))
	b2, err := o.Create(ctx, CreateRequest{Template: "big", Timeout: time.Minute})
	if err != nil {
		t.Fatalf("big create after a kill: %v", err)
	}
	if err := health(t, b2); err != nil {
		t.Fatal(err)
	}
	if u := used(); u != 768 {
		t.Fatalf("%g MiB promised with tiny and big running, want 768", u)
	}
	if len(tiny.ready) != 0 {
		t.Fatal("a pooled sandbox survived a user create that needed its room")
	}
	for _, id := range []string{t1.ID, b2.ID} {
		if err := o.Kill(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the pools to refill", func() bool { return len(tiny.ready) == 1 })
}

// smallFS mounts a fresh ext4 filesystem of sizeMB for the test.
func smallFS(t *testing.T, sizeMB int) string {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "mount", "losetup"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: %v", tool, err)
		}
	}
	img := filepath.Join(t.TempDir(), "host.img")
	if out, err := exec.Command("truncate", "-s", fmt.Sprintf("%dM", sizeMB), img).CombinedOutput(); err != nil {
		t.Fatalf("truncate: %v: %s", err, out)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		t.Skipf("cannot loop-mount a filesystem here: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}

// TestAdmissionDisk runs the data directory on a filesystem that holds
// three 100 MiB sandbox disks: a create that needs the disk a pooled
// sandbox holds gets it (the pooled one is destroyed and its image freed
// first), and one past that is refused for disk.
func TestAdmissionDisk(t *testing.T) {
	mnt := smallFS(t, 380)
	w := newWorldAt(t, "100.89.4.0/24", mnt)
	tiny := w.tmpls["tiny"]
	tiny.DiskSizeMB = 100
	w.tmpls["tiny"] = tiny
	other := tiny
	other.ID, other.Alias = "other", "other"
	w.tmpls["other"] = other
	ledger, err := capacity.New(capacity.Options{HostMemoryMB: 1 << 20, HostCPUs: 64, DiskPath: filepath.Join(mnt, "gvisor")})
	if err != nil {
		t.Fatal(err)
	}
	o := w.orchestratorWith(t, 1, ledger)
	defer o.Close(context.Background())
	ctx := context.Background()
	tp, _ := o.poolFor("tiny")
	waitFor(t, "the tiny pool to fill", func() bool { return len(tp.ready) == 1 })
	u1, err := o.Create(ctx, CreateRequest{Template: "other", Timeout: time.Minute})
	if err != nil {
		t.Fatalf("first create: %v", err)
	}
	op, _ := o.poolFor("other")
	waitFor(t, "the other pool to fill", func() bool { return len(op.ready) == 1 })
	u2, err := o.Create(ctx, CreateRequest{Template: "other", Timeout: time.Minute})
	if err != nil {
		t.Fatalf("second create (pooled): %v", err)
	}
	// Three disks are taken (tiny's pooled one, u1, u2): the third user
	// sandbox needs the pooled one's.
	u3, err := o.Create(ctx, CreateRequest{Template: "other", Timeout: time.Minute})
	if err != nil {
		t.Fatalf("create that needs a pooled sandbox's disk: %v", err)
	}
	if len(tp.ready) != 0 {
		t.Fatal("the pooled sandbox survived a create that needed its disk")
	}
	for _, in := range []Info{u1, u2, u3} {
		if err := health(t, in); err != nil {
			t.Fatalf("sandbox %s: %v", in.ID, err)
		}
	}
	_, err = o.Create(ctx, CreateRequest{Template: "other", Timeout: time.Minute})
	var full *capacity.FullError
	if !errors.As(err, &full) || full.Resource != "disk" {
		t.Fatalf("a fourth disk on a filesystem for three: %v, want a disk refusal", err)
	}
	t.Logf("refused: %v", err)
}
