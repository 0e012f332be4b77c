//go:build linux && amd64

package microvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/client"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
	"github.com/cubicle-dev/cubicle/internal/sparse"
	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/linux"
)

// The microVM suite boots real Linux guests: it needs /dev/kvm with
// hardware virtualization (vmm/linux.CanBoot; here, inside
// scripts/nested-kvm.sh), the guest kernel, and a template image with
// `cubicle init`. Where no go or mkfs is (nested KVM's L1), the hooks
// point at files made beforehand:
//
//	CUBICLE_VMLINUX        the guest kernel (default: vmm/linux's cache)
//	CUBICLE_MICROVM_IMAGE  a template ext4 image (template.Ext4Image's
//	                       layout: the rootfs, /.cubicle/cubicle); required
//	CUBICLE_MICROVM_DISK   an empty ext4 image of testDiskMB, copied for
//	                       the template's first boot instead of mkfs.ext4
//
// The test binary is its own VMM: run as `<test> vmm --control-fd=3` it
// is `cubicle vmm`.

const (
	testDiskMB   = 64
	testMemoryMB = 256
	testPrefix   = "100.88.236.0/27"
)

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "vmm" {
		log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		fd := 0
		for _, a := range os.Args[2:] {
			if v, ok := strings.CutPrefix(a, "--control-fd="); ok {
				fd, _ = strconv.Atoi(v)
			}
		}
		if err := control.Main(context.Background(), control.MainConfig{ControlFD: fd, Logger: log}); err != nil {
			fmt.Fprintln(os.Stderr, "vmm:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// testOptions are a runtime's options for this host, or a reason to skip.
func testOptions(t *testing.T) Options {
	t.Helper()
	testenv.RequireRoot(t, "makes network namespaces and taps")
	if ok, why := linux.CanBoot(); !ok {
		t.Skip("cannot boot Linux guests here (run it inside scripts/nested-kvm.sh): " + why)
	}
	kernel := os.Getenv("CUBICLE_VMLINUX")
	if kernel == "" {
		var ok bool
		if kernel, ok = linux.Cached(linux.DefaultCacheDir()); !ok {
			t.Skip("no guest kernel: build it with vmm/linux/build.sh or set CUBICLE_VMLINUX")
		}
	}
	img := os.Getenv("CUBICLE_MICROVM_IMAGE")
	if img == "" {
		t.Skip("no template image with cubicle init: set CUBICLE_MICROVM_IMAGE")
	}
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	pool, err := network.NewPool(network.Options{Prefix: netip.MustParsePrefix(testPrefix), LinkPrefix: "cmvt", Mode: network.ModeTap,
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	opts := Options{
		StateDir:    filepath.Join(t.TempDir(), "state"),
		CacheDir:    t.TempDir(),
		Kernel:      kernel,
		KernelKey:   linux.Key(),
		VMM:         os.Args[0],
		Network:     pool,
		PoolSize:    1,
		BootTimeout: 5 * time.Minute, // emulated hardware is slow
		Image: func(context.Context, runtime.Config) (Image, error) {
			return Image{Path: img, Key: fmt.Sprintf("test-%d-%d", fi.Size(), fi.ModTime().UnixNano())}, nil
		},
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	// Jailed, as serve runs them, where the host can (nested KVM's L1
	// mounts the jailer's cgroups); the jail subtests say so otherwise.
	if err := CheckJail(); err == nil {
		opts.Jail = &Jail{}
	} else {
		t.Logf("VMMs unjailed: %v", err)
	}
	if testing.Verbose() {
		followConsoles(t, opts)
	}
	if disk := os.Getenv("CUBICLE_MICROVM_DISK"); disk != "" {
		opts.FormatDisk = func(path string, sizeMB int) error {
			if fi, err := os.Stat(disk); err != nil || fi.Size() != int64(sizeMB)<<20 {
				return fmt.Errorf("CUBICLE_MICROVM_DISK %s is not %d MiB: %v", disk, sizeMB, err)
			}
			return sparse.Copy(disk, path)
		}
	} else {
		testenv.RequireCommand(t, "mkfs.ext4")
	}
	return opts
}

// testConfig claims sandbox id's network from the runtime's pool, as the
// orchestrator does, and releases it at the end of the test (after the
// test's own Kill: the runtime never releases it).
func testConfig(t *testing.T, opts Options, id string) runtime.Config {
	t.Helper()
	att, err := opts.Network.Setup(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := opts.Network.Teardown(context.Background(), id); err != nil {
			t.Errorf("releasing %s's network: %v", id, err)
		}
	})
	return runtime.Config{ID: id, TemplateID: "base", CPUCount: 1, MemoryMB: testMemoryMB, DiskSizeMB: testDiskMB, Network: att}
}

// envdRun runs cmd in the sandbox at addr through its envd, directly.
func envdRun(t *testing.T, addr netip.Addr, cmd string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pc := processconnect.NewProcessClient(http.DefaultClient, fmt.Sprintf("http://%s:%d", addr, runtime.EnvdPort))
	var out, errb bytes.Buffer
	code, err := client.RunWith(ctx, pc, cmd, &out, &errb)
	if err != nil || code != 0 {
		t.Fatalf("%q: exit %d, %v; stderr: %s", cmd, code, err, errb.String())
	}
	return strings.TrimSpace(out.String())
}

// waitHealth waits for envd's /health through the sandbox's address.
func waitHealth(t *testing.T, addr netip.Addr) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	c := &http.Client{Timeout: 5 * time.Second}
	for {
		resp, err := c.Get(fmt.Sprintf("http://%s:%d/health", addr, runtime.EnvdPort))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode < 300 {
				return
			}
			err = fmt.Errorf("status %s", resp.Status)
		}
		if time.Now().After(deadline) {
			t.Fatalf("envd /health at %s: %v", addr, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestMicroVM is the runtime's suite on real guests: one template
// snapshot, built on the first create, serves every subtest.
func TestMicroVM(t *testing.T) {
	opts := testOptions(t)
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ctx := context.Background()
	create := func(t *testing.T, id string) runtime.Sandbox {
		t.Helper()
		cfg := testConfig(t, opts, id)
		sb, err := r.Create(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Kill(context.Background(), id) })
		return sb
	}

	t.Run("create answers and kill leaves nothing", func(t *testing.T) {
		sb := create(t, "mvone")
		if sb.State != runtime.StateRunning || !sb.Addr.IsValid() {
			t.Fatalf("created %+v", sb)
		}
		waitHealth(t, sb.Addr)
		if got := envdRun(t, sb.Addr, "echo hi from $(uname -s)"); got != "hi from Linux" {
			t.Errorf("command: %q", got)
		}
		rec, err := r.readRecord(sb.ID)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Kill(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
		if alive(rec) {
			t.Errorf("VMM process %d still runs after Kill", rec.Pid)
		}
		if _, err := os.Stat(r.sandboxDir(sb.ID)); !os.IsNotExist(err) {
			t.Errorf("sandbox directory left: %v", err)
		}
		if _, ok := opts.Network.Lookup(sb.ID); !ok {
			t.Error("Kill released the network, which is the caller's")
		}
		if err := r.Kill(ctx, sb.ID); err != nil {
			t.Errorf("killing it again: %v", err)
		}
		if _, err := r.Stats(ctx, sb.ID); !errors.Is(err, runtime.ErrNotFound) {
			t.Errorf("stats of a killed sandbox: %v", err)
		}
	})

	t.Run("the VMM is jailed in its cgroups and Kill removes the jail", func(t *testing.T) {
		if opts.Jail == nil {
			t.Skipf("this host cannot jail VMMs: %v", CheckJail())
		}
		sb := create(t, "mvjail")
		rec, err := r.readRecord(sb.ID)
		if err != nil {
			t.Fatal(err)
		}
		h := rec.Jail
		if h == nil || h.Memory == "" || h.Pids == "" {
			t.Fatalf("record's jail: %+v", h)
		}
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", rec.Pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"Uid:\t65534\t65534\t65534\t65534", "CapEff:\t0000000000000000", "Seccomp:\t2"} {
			if !strings.Contains(string(status), want) {
				t.Errorf("VMM status lacks %q:\n%s", want, status)
			}
		}
		if in, err := h.InCgroup(rec.Pid); err != nil || !in {
			t.Errorf("VMM %d in its jail's cgroups: %v, %v", rec.Pid, in, err)
		}
		limit, err := os.ReadFile(filepath.Join(h.Memory, "memory.limit_in_bytes"))
		if want := fmt.Sprint((testMemoryMB + DefaultOverheadMB) << 20); err != nil || strings.TrimSpace(string(limit)) != want {
			t.Errorf("memory limit %q, %v; want %s (the sandbox's memory plus the VMM's overhead)", limit, err, want)
		}
		waitHealth(t, sb.Addr)
		s, err := r.Stats(ctx, sb.ID)
		if usage, uerr := h.MemoryUsage(); err != nil || uerr != nil || s.MemUsed == 0 || s.MemUsed > usage+(64<<20) {
			t.Errorf("stats %+v, %v; the cgroup's usage %d, %v", s, err, usage, uerr)
		}
		if err := r.Kill(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{h.Root, h.Memory, h.Pids, h.Unified} {
			if _, err := os.Stat(p); p != "" && !os.IsNotExist(err) {
				t.Errorf("%s left after Kill: %v", p, err)
			}
		}
	})

	t.Run("a jailed VMM over its memory limit ends with ExitOOM", func(t *testing.T) {
		if opts.Jail == nil {
			t.Skipf("this host cannot jail VMMs: %v", CheckJail())
		}
		sb := create(t, "mvoom")
		waitHealth(t, sb.Addr)
		rec, err := r.readRecord(sb.ID)
		if err != nil {
			t.Fatal(err)
		}
		usage, err := rec.Jail.MemoryUsage()
		if err != nil {
			t.Fatal(err)
		}
		// The guest may use all its memory; the VMM may not use much more
		// than it does now: a guest touching 160 MiB fresh pushes it over.
		if err := os.WriteFile(filepath.Join(rec.Jail.Memory, "memory.limit_in_bytes"), []byte(fmt.Sprint(usage+(16<<20))), 0); err != nil {
			t.Fatal(err)
		}
		done := make(chan runtime.Exit, 1)
		go func() {
			e, err := r.Wait(ctx, sb.ID)
			if err != nil {
				t.Error(err)
			}
			done <- e
		}()
		go func() { // it gets no answer: its VM goes
			pc := processconnect.NewProcessClient(http.DefaultClient, fmt.Sprintf("http://%s:%d", sb.Addr, runtime.EnvdPort))
			rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			client.RunWith(rctx, pc, "dd if=/dev/zero of=/dev/null bs=160M count=1", io.Discard, io.Discard)
		}()
		select {
		case e := <-done:
			if e.Reason != runtime.ExitOOM {
				t.Errorf("exit %+v, want %s", e, runtime.ExitOOM)
			}
			t.Logf("exit: %+v", e)
		case <-time.After(3 * time.Minute):
			t.Fatal("the VMM was not OOM-killed")
		}
	})

	t.Run("clones of one snapshot get their own identity", func(t *testing.T) {
		a, b := create(t, "mvclonea"), create(t, "mvcloneb")
		waitHealth(t, a.Addr)
		waitHealth(t, b.Addr)
		const rng = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
		ra, rb := envdRun(t, a.Addr, rng), envdRun(t, b.Addr, rng)
		if len(ra) != 32 || ra == rb {
			t.Errorf("the clones' RNGs agree (or failed): %q, %q", ra, rb)
		}
		for _, sb := range []runtime.Sandbox{a, b} {
			sec, err := strconv.ParseInt(envdRun(t, sb.Addr, "date +%s"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			// The template's clock stopped when it was snapshotted: a
			// clone that kept it would be behind by the build's age.
			if d := time.Since(time.Unix(sec, 0)); d < -time.Minute || d > time.Minute {
				t.Errorf("%s's clock is %v off the host's", sb.ID, d)
			}
		}
	})

	t.Run("pause and resume keep a process", func(t *testing.T) {
		sb := create(t, "mvpause")
		waitHealth(t, sb.Addr)
		pid := envdRun(t, sb.Addr, "setsid sleep 3600 </dev/null >/dev/null 2>&1 & echo $!")
		if err := r.Pause(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
		if got := state(t, r, sb.ID); got != runtime.StatePaused {
			t.Errorf("listed as %s while paused", got)
		}
		if err := r.Resume(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
		if got := state(t, r, sb.ID); got != runtime.StateRunning {
			t.Errorf("listed as %s after resume", got)
		}
		if got := envdRun(t, sb.Addr, "kill -0 "+pid+" && echo alive"); got != "alive" {
			t.Errorf("process %s after resume: %q", pid, got)
		}
	})

	t.Run("wait reports a VMM killed from outside", func(t *testing.T) {
		sb := create(t, "mvwait")
		rec, err := r.readRecord(sb.ID)
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan runtime.Exit, 1)
		go func() {
			e, err := r.Wait(ctx, sb.ID)
			if err != nil {
				t.Error(err)
			}
			done <- e
		}()
		time.Sleep(100 * time.Millisecond)
		if err := killPid(rec.Pid); err != nil {
			t.Fatal(err)
		}
		select {
		case e := <-done:
			if e.ID != sb.ID || e.Reason != runtime.ExitExited {
				t.Errorf("exit %+v", e)
			}
		case <-time.After(time.Minute):
			t.Fatal("Wait did not return after the VMM was killed")
		}
		if got := state(t, r, sb.ID); got != runtime.StateStopped {
			t.Errorf("listed as %s after its VMM died", got)
		}
	})

	t.Run("snapshots, forks and filesystem-only snapshots", func(t *testing.T) { testSnapshots(t, r, opts, create) })

	t.Run("a new runtime adopts running sandboxes", func(t *testing.T) {
		sb := create(t, "mvadopt")
		waitHealth(t, sb.Addr)
		pid := envdRun(t, sb.Addr, "setsid sleep 3600 </dev/null >/dev/null 2>&1 & echo $!")
		r2, err := New(opts)
		if err != nil {
			t.Fatal(err)
		}
		defer r2.Close()
		if got := state(t, r2, sb.ID); got != runtime.StateRunning {
			t.Fatalf("the new runtime lists it as %s", got)
		}
		if s, err := r2.Stats(ctx, sb.ID); err != nil || s.MemUsed == 0 || s.DiskTotal != testDiskMB<<20 {
			t.Errorf("stats through the new runtime: %+v, %v", s, err)
		}
		if err := r2.Pause(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
		if err := r2.Resume(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
		if got := envdRun(t, sb.Addr, "kill -0 "+pid+" && echo alive"); got != "alive" {
			t.Errorf("process %s after adoption: %q", pid, got)
		}
		rec, err := r2.readRecord(sb.ID)
		if err != nil {
			t.Fatal(err)
		}
		if err := r2.Kill(ctx, sb.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(r.sandboxDir(sb.ID)); !os.IsNotExist(err) {
			t.Errorf("sandbox directory left: %v", err)
		}
		if rec.Jail != nil {
			for _, p := range []string{rec.Jail.Root, rec.Jail.Memory, rec.Jail.Pids} {
				if _, err := os.Stat(p); !os.IsNotExist(err) {
					t.Errorf("%s left after the new runtime's Kill: %v", p, err)
				}
			}
		}
	})
}

// TestGuestNeverAnswers: a template whose guest never brings up envd
// (here: an image without init, so the kernel panics and the VM ends)
// fails the create with an error that says so and shows the console,
// leaving no VMM, network or half-made snapshot behind.
func TestGuestNeverAnswers(t *testing.T) {
	opts := testOptions(t)
	empty := filepath.Join(t.TempDir(), "empty.img")
	if err := opts.formatDisk()(empty, 64); err != nil {
		t.Skipf("no empty ext4 image to boot: %v", err)
	}
	opts.Image = func(context.Context, runtime.Config) (Image, error) { return Image{Path: empty, Key: "no-init"}, nil }
	opts.BootTimeout = 3 * time.Minute
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, err = r.Create(context.Background(), testConfig(t, opts, "mvnoinit"))
	if !errors.Is(err, ErrGuest) || !strings.Contains(err.Error(), "console:") {
		t.Fatalf("create with a guest that never answers: %v", err)
	}
	t.Logf("error: %.600s", err)
	if _, err := os.Stat(r.sandboxDir("mvnoinit")); !os.IsNotExist(err) {
		t.Errorf("sandbox directory left: %v", err)
	}
	if left := opts.Network.List(); len(left) != 1 || left[0].ID != "mvnoinit" {
		t.Errorf("networks: %+v, want only the one the test claimed (the template boot's released)", left)
	}
	if m, _ := filepath.Glob(filepath.Join(r.snapshotRoot(), "*")); len(m) > 1 { // the lock file only
		t.Errorf("snapshot cache holds %v", m)
	}
}

// formatDisk is the options' way to make an empty ext4 image.
func (o Options) formatDisk() func(string, int) error {
	if o.FormatDisk != nil {
		return func(path string, sizeMB int) error {
			if err := o.FormatDisk(path, testDiskMB); err != nil {
				return err
			}
			return nil
		}
	}
	return makeDisk
}

func state(t *testing.T, r *Runtime, id string) runtime.State {
	t.Helper()
	l, err := r.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range l {
		if sb.ID == id {
			return sb.State
		}
	}
	t.Fatalf("%s not listed", id)
	return ""
}

func killPid(pid int) error {
	p, err := os.FindProcess(pid)
	if err != nil {
		return err
	}
	return p.Kill()
}

// followConsoles copies what the guests print on their consoles (the
// template build's and each sandbox's) to the test's output as it comes:
// inside nested KVM that output is all there is to see of a guest that
// hangs.
func followConsoles(t *testing.T, opts Options) {
	stop := make(chan struct{})
	done := make(chan struct{})
	t.Cleanup(func() { close(stop); <-done })
	go func() {
		defer close(done)
		seen := map[string]int64{}
		for {
			var files []string
			for _, pat := range []string{filepath.Join(opts.CacheDir, "microvm", ".build-*", "console.log"), filepath.Join(opts.StateDir, "*", "console.log"),
				filepath.Join(opts.CacheDir, "microvm", ".build-*", "jail", "console.log"),
				filepath.Join(opts.StateDir, jailDir, "*", "*", "console.log")} {
				m, _ := filepath.Glob(pat)
				files = append(files, m...)
			}
			for _, f := range files {
				b, err := os.ReadFile(f)
				if err != nil || int64(len(b)) <= seen[f] {
					continue
				}
				name := filepath.Base(filepath.Dir(f))
				for _, line := range strings.SplitAfter(string(b[seen[f]:]), "\n") {
					if line != "" {
						fmt.Fprintf(os.Stderr, "[%s] %s", name, line)
					}
				}
				seen[f] = int64(len(b))
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Second):
			}
		}
	}()
}
