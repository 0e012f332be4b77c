package gvisor

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
)

// TestLifecycle drives two sandboxes through everything the orchestrator
// does with them, and a server restart in the middle.
func TestLifecycle(t *testing.T) {
	e := newEnv(t, "100.88.252.0/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	before := treeDigest(t, tmpl)

	cfgA, cfgB := config(testID("a"), tmpl), config(testID("b"), tmpl)
	cfgB.CPUCount = 2
	var a, b runtime.Sandbox
	var errA, errB error
	var wg sync.WaitGroup
	wg.Add(2) // concurrent Creates: the pool and runtime must cope
	go func() { defer wg.Done(); a, errA = e.create(ctx, cfgA) }()
	go func() { defer wg.Done(); b, errB = e.create(ctx, cfgB) }()
	wg.Wait()
	if err := errors.Join(errA, errB); err != nil {
		t.Fatal(err)
	}
	if a.State != runtime.StateRunning || a.Addr == b.Addr || !a.Addr.IsValid() {
		t.Fatalf("Create returned %+v and %+v", a, b)
	}
	waitHealthy(t, a, 10*time.Second)
	waitHealthy(t, b, 10*time.Second)

	t.Run("envd process", func(t *testing.T) {
		_, info := get(t, a, "/info")
		want := fmt.Sprintf(`"args":["%s","-port","49983"],"cwd":"/","hostname":"%s","pid":1,"pids":[1],"uid":0`, EnvdPath, a.ID)
		if !strings.Contains(info, want) {
			t.Fatalf("/info = %s, want it to contain %s", info, want)
		}
	})

	t.Run("pty", func(t *testing.T) {
		if code, body := get(t, a, "/pty"); code != 200 || !strings.HasPrefix(body, "/dev/pts/") {
			t.Fatalf("pty: %d %s", code, body)
		}
	})

	t.Run("detached from the server", func(t *testing.T) {
		// The sandbox's processes must neither share the server's session
		// (a Ctrl-C in its terminal would reach them) nor be its children
		// (they would die or turn zombie with it).
		own, _ := unix.Getsid(0)
		for _, pid := range sandboxPIDs(t, e.rt, a.ID) {
			sid, err := unix.Getsid(pid)
			if err != nil {
				t.Fatal(err)
			}
			if sid == own {
				t.Errorf("sandbox process %d is in the test's session %d", pid, sid)
			}
			if ppid := parentPID(t, pid); ppid == os.Getpid() {
				t.Errorf("sandbox process %d is a child of the test process", pid)
			}
		}
	})

	t.Run("cgroup limits", func(t *testing.T) {
		for _, tc := range []struct {
			sb         runtime.Sandbox
			ctrl, file string
			want       int64
		}{
			{a, "memory", "memory.limit_in_bytes", 256 << 20},
			{a, "cpu", "cpu.cfs_quota_us", 100_000},
			{b, "cpu", "cpu.cfs_quota_us", 200_000},
			{a, "cpu", "cpu.cfs_period_us", 100_000},
			{a, "pids", "pids.max", pidsLimit},
		} {
			if got := readCgroupFile(t, e.rt, tc.sb.ID, tc.ctrl, tc.file); got != tc.want {
				t.Errorf("%s of %s = %d, want %d", tc.file, tc.sb.ID, got, tc.want)
			}
		}
	})

	t.Run("filesystem", func(t *testing.T) {
		// A file with a user xattr, written in a; b cannot see it.
		if code, body := post(t, a, "/write?path=/home/user/notes.txt&data=secret&xattr=user.e2b.owner&value=alice"); code != 200 {
			t.Fatalf("write with xattr in a: %d %s", code, body)
		}
		if _, v := get(t, a, "/getxattr?path=/home/user/notes.txt&name=user.e2b.owner"); v != "alice" {
			t.Fatalf("xattr read back in a = %q", v)
		}
		if code, body := get(t, a, "/read?path=/home/user/notes.txt"); code != 200 || body != "secret" {
			t.Fatalf("read in a: %d %q", code, body)
		}
		if code, _ := get(t, b, "/read?path=/home/user/notes.txt"); code != http.StatusNotFound {
			t.Fatalf("b sees a's file: status %d", code)
		}
		// It landed, with its xattr, in a's upper layer, on a's own disk.
		upper := filepath.Join(e.rt.sandboxDir(a.ID), diskMount, "upper", "home/user/notes.txt")
		buf := make([]byte, 64)
		if n, err := unix.Getxattr(upper, "user.e2b.owner", buf); err != nil || string(buf[:n]) != "alice" {
			t.Fatalf("xattr on the host's upper layer: %q %v", buf[:n], err)
		}
		// a overwrites a template file; b and the template keep theirs.
		if code, body := post(t, a, "/write?path=/etc/template&data=changed"); code != 200 {
			t.Fatalf("overwrite in a: %d %s", code, body)
		}
		if _, body := get(t, a, "/read?path=/etc/template"); body != "changed" {
			t.Fatalf("a reads %q after overwriting", body)
		}
		if _, body := get(t, b, "/read?path=/etc/template"); body != "from the template\n" {
			t.Fatalf("b reads %q, a's write leaked", body)
		}
		// 50 MB in one file.
		if code, body := post(t, a, "/write?path=/root/big&size=52428800"); code != 200 {
			t.Fatalf("50 MB write: %d %s", code, body)
		}
	})

	t.Run("stats", func(t *testing.T) {
		get(t, a, "/alloc?mb=32") // memory that must show as used, not cache
		s, err := e.rt.Stats(ctx, a.ID)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("stats of a: %+v", s)
		if s.CPUUsage <= 0 || s.CPUUsage > time.Minute {
			t.Errorf("CPUUsage %v", s.CPUUsage)
		}
		if s.MemUsed < 32<<20 || s.MemUsed > 256<<20 {
			t.Errorf("MemUsed %d, want at least the 32 MiB allocated", s.MemUsed)
		}
		if s.MemLimit != 256<<20 {
			t.Errorf("MemLimit %d", s.MemLimit)
		}
		if s.DiskUsed < 50<<20 || s.DiskUsed > 60<<20 {
			t.Errorf("DiskUsed %d, want about the 50 MB written", s.DiskUsed)
		}
		if s.DiskTotal != 1024<<20 {
			t.Errorf("DiskTotal %d", s.DiskTotal)
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		before := counter(t, a)
		if err := e.rt.Pause(ctx, a.ID); err != nil {
			t.Fatal(err)
		}
		checkState(t, e.rt, a.ID, runtime.StatePaused)
		paused := time.Now()
		// A frozen sandbox does not answer.
		c := &http.Client{Timeout: 300 * time.Millisecond}
		if resp, err := c.Get(url(a, "/counter")); err == nil {
			resp.Body.Close()
			t.Fatal("paused sandbox answered")
		}
		time.Sleep(500 * time.Millisecond)
		if err := e.rt.Resume(ctx, a.ID); err != nil {
			t.Fatal(err)
		}
		frozen := time.Since(paused)
		after := counter(t, a)
		checkState(t, e.rt, a.ID, runtime.StateRunning)
		// The counter ticks every 10 ms while the sandbox runs; had it
		// run through the pause it would have advanced by ~frozen/10ms.
		if after < before {
			t.Fatalf("counter went back from %d to %d: state lost", before, after)
		}
		if ticks := after - before; ticks > int(frozen/(10*time.Millisecond))/2 {
			t.Fatalf("counter advanced %d ticks over a %v pause", ticks, frozen)
		}
		if _, body := get(t, a, "/read?path=/home/user/notes.txt"); body != "secret" {
			t.Fatalf("file lost over pause: %q", body)
		}
	})

	t.Run("envd output kept", func(t *testing.T) {
		for i := 0; i < 50; i++ {
			post(t, a, fmt.Sprintf("/print?msg=line%d", i))
		}
		out, err := os.ReadFile(filepath.Join(e.rt.sandboxDir(a.ID), "envd.log"))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 50; i++ {
			for _, s := range []string{"stdout", "stderr"} {
				if !strings.Contains(string(out), fmt.Sprintf("%s: line%d\n", s, i)) {
					t.Fatalf("envd.log lost %s line %d:\n%s", s, i, out)
				}
			}
		}
	})

	t.Run("restart", func(t *testing.T) {
		// A new pool and runtime over the same state: a server restart.
		e.pool, e.rt = e.restart()
		sbs, err := e.rt.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		want := []runtime.Sandbox{a, b}
		if a.ID > b.ID {
			want = []runtime.Sandbox{b, a}
		}
		if fmt.Sprint(sbs) != fmt.Sprint(want) {
			t.Fatalf("List after restart = %+v, want %+v", sbs, want)
		}
		if _, err := e.rt.Stats(ctx, a.ID); err != nil {
			t.Fatalf("Stats after restart: %v", err)
		}
		if err := e.kill(ctx, a.ID); err != nil {
			t.Fatalf("Kill after restart: %v", err)
		}
		if err := pollHealth(a.Addr, 200*time.Millisecond); err == nil {
			t.Fatal("killed sandbox still answers")
		}
		if sbs, _ := e.rt.List(ctx); len(sbs) != 1 || sbs[0].ID != b.ID {
			t.Fatalf("List after Kill = %+v", sbs)
		}
		waitHealthy(t, b, time.Second) // b is unharmed
	})

	// Kill works on a paused sandbox, and a second Kill is a no-op.
	if err := e.rt.Pause(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	if err := e.kill(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	if err := e.kill(ctx, b.ID); err != nil {
		t.Fatalf("second Kill: %v", err)
	}
	e.checkNoLeaks()
	if after := treeDigest(t, tmpl); after != before {
		t.Fatalf("template changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestMemoryLimit checks that the host enforces MemoryMB: allocating past
// it gets the sandbox OOM-killed.
func TestMemoryLimit(t *testing.T) {
	e := newEnv(t, "100.88.252.16/28")
	ctx := context.Background()
	cfg := config(testID("mem"), makeTemplate(t))
	cfg.MemoryMB = 128
	sb, err := e.create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, sb, 10*time.Second)
	if code, _ := get(t, sb, "/alloc?mb=48"); code != 200 {
		t.Fatalf("allocating under the limit failed: %d", code)
	}
	// The request never gets an answer when the sandbox dies: wait for
	// the kill instead.
	allocated := make(chan int, 1)
	go func() {
		c := &http.Client{Timeout: 20 * time.Second}
		resp, err := c.Get(url(sb, "/alloc?mb=256"))
		if err != nil {
			allocated <- 0
			return
		}
		resp.Body.Close()
		allocated <- resp.StatusCode
	}()
	deadline := time.Now().Add(15 * time.Second)
	for readOOMKills(t, e.rt, sb.ID) < 1 {
		select {
		case code := <-allocated:
			if code == 200 {
				t.Fatal("allocated 256 MiB under a 128 MiB limit")
			}
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("no OOM kill recorded in the sandbox's memory cgroup")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The OOM kill takes the sentry, i.e. the whole sandbox.
	for time.Now().Before(deadline) && listState(t, e.rt, sb.ID) != runtime.StateStopped {
		time.Sleep(20 * time.Millisecond)
	}
	checkState(t, e.rt, sb.ID, runtime.StateStopped)
	if err := e.kill(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
}

func TestCreateErrors(t *testing.T) {
	e := newEnv(t, "100.88.252.32/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	// Devices for the configs below; the runtime must refuse each before
	// it uses them.
	att, err := e.pool.Setup(ctx, testID("badnet"))
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		mod  func(*runtime.Config)
	}{
		{"bad id", func(c *runtime.Config) { c.ID = "../x" }},
		{"reserved id", func(c *runtime.Config) { c.ID = runscDir }},
		{"no rootfs", func(c *runtime.Config) { c.RootFS = "/nonexistent" }},
		{"rootfs not a dir", func(c *runtime.Config) { c.RootFS = file }},
		{"rootfs with comma", func(c *runtime.Config) { c.RootFS = tmpl + ",x" }},
		{"no cpu", func(c *runtime.Config) { c.CPUCount = 0 }},
		{"no memory", func(c *runtime.Config) { c.MemoryMB = 0 }},
		{"envd missing", func(c *runtime.Config) { c.Envd = "/nonexistent" }},
		{"envd not executable", func(c *runtime.Config) { c.Envd = file }},
		{"no network", func(c *runtime.Config) { c.Network = network.Attachment{} }},
		{"relative netns", func(c *runtime.Config) { c.Network.Netns = "netns" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config(testID("bad"), tmpl)
			cfg.Network = att
			tc.mod(&cfg)
			if _, err := e.rt.Create(ctx, cfg); !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("err %v, want ErrInvalidConfig", err)
			}
		})
	}

	sb, err := e.create(ctx, config(testID("dup"), tmpl))
	if err != nil {
		t.Fatal(err)
	}
	dup := config(sb.ID, tmpl)
	dup.Network = att
	if _, err := e.rt.Create(ctx, dup); !errors.Is(err, ErrExists) {
		t.Fatalf("second Create of %s: err %v, want ErrExists", sb.ID, err)
	}
	waitHealthy(t, sb, 10*time.Second) // the failed Create did not harm it

	for name, op := range map[string]func(string) error{
		"Pause":  func(id string) error { return e.rt.Pause(ctx, id) },
		"Resume": func(id string) error { return e.rt.Resume(ctx, id) },
		"Stats":  func(id string) error { _, err := e.rt.Stats(ctx, id); return err },
	} {
		if err := op("nosuchsandbox"); !errors.Is(err, runtime.ErrNotFound) {
			t.Errorf("%s of an unknown sandbox: err %v, want ErrNotFound", name, err)
		}
	}
	if err := e.kill(ctx, "nosuchsandbox"); err != nil {
		t.Errorf("Kill of an unknown sandbox: %v", err)
	}
}

// TestCreateFailureCleansUp makes runsc fail and checks that Create leaves
// nothing behind.
func TestCreateFailureCleansUp(t *testing.T) {
	e := newEnv(t, "100.88.252.48/28")
	e.rt.flags = append(e.rt.flags, "--platform=nosuchplatform")
	_, err := e.create(context.Background(), config(testID("fail"), makeTemplate(t)))
	var re *RunscError
	if !errors.As(err, &re) || !strings.Contains(err.Error(), "nosuchplatform") {
		t.Fatalf("err %v, want a RunscError that names the bad platform", err)
	}
	e.checkNoLeaks()
}

func TestFindRunsc(t *testing.T) {
	t.Setenv("CUBICLE_RUNSC", "/nonexistent/runsc")
	if _, err := FindRunsc("", ""); !errors.Is(err, ErrRunscNotFound) || !strings.Contains(err.Error(), "/nonexistent/runsc") {
		t.Fatalf("bad $CUBICLE_RUNSC: err %v, want ErrRunscNotFound naming it", err)
	}
	exe := filepath.Join(t.TempDir(), "runsc")
	os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755)
	t.Setenv("CUBICLE_RUNSC", exe)
	if got, err := FindRunsc("", ""); err != nil || got != exe {
		t.Fatalf("findRunsc via env = %q, %v", got, err)
	}
	if _, err := FindRunsc("/nonexistent/explicit", ""); !errors.Is(err, ErrRunscNotFound) {
		t.Fatalf("explicit bad path: err %v", err)
	}
	// Without a path or $CUBICLE_RUNSC: the pinned build scripts/deps.sh
	// makes under the cache directory.
	t.Setenv("CUBICLE_RUNSC", "")
	cache := t.TempDir()
	pinned := RunscPath(cache)
	if !strings.Contains(pinned, RunscVersion) || RunscVersion == "" {
		t.Fatalf("RunscPath(%q) = %q, want it keyed by version %q", cache, pinned, RunscVersion)
	}
	os.MkdirAll(filepath.Dir(pinned), 0o755)
	os.WriteFile(pinned, []byte("#!/bin/sh\n"), 0o755)
	if got, err := FindRunsc("", cache); err != nil || got != pinned {
		t.Fatalf("FindRunsc with a pinned build = %q, %v; want %q", got, err, pinned)
	}
}

// counter reads the probe's tick counter.
func counter(t *testing.T, sb runtime.Sandbox) int {
	t.Helper()
	_, body := get(t, sb, "/counter")
	n, err := strconv.Atoi(body)
	if err != nil {
		t.Fatalf("counter %q: %v", body, err)
	}
	return n
}

func checkState(t *testing.T, rt *Runtime, id string, want runtime.State) {
	t.Helper()
	if got := listState(t, rt, id); got != want {
		t.Fatalf("%s is %s, want %s", id, got, want)
	}
}

// listState is the state List reports for id.
func listState(t *testing.T, rt *Runtime, id string) runtime.State {
	t.Helper()
	sbs, err := rt.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, sb := range sbs {
		if sb.ID == id {
			return sb.State
		}
	}
	t.Fatalf("%s not listed: %+v", id, sbs)
	return ""
}

func parentPID(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// "pid (comm) state ppid ...": comm may hold spaces, so cut at ')'.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		t.Fatal(err)
	}
	return ppid
}

func readCgroupFile(t *testing.T, rt *Runtime, id, ctrl, file string) int64 {
	t.Helper()
	l, err := hostCgroups()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := l.dir(ctrl, rt.cgroupPath(id))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func readOOMKills(t *testing.T, rt *Runtime, id string) uint64 {
	t.Helper()
	l, err := hostCgroups()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := l.dir("memory", rt.cgroupPath(id))
	if err != nil {
		t.Fatal(err)
	}
	file, key := "memory.oom_control", "oom_kill" // v1
	if l.v2() {
		file = "memory.events"
	}
	n, err := readKeyed(filepath.Join(dir, file), key)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func sandboxPIDs(t *testing.T, rt *Runtime, id string) []int {
	t.Helper()
	l, err := hostCgroups()
	if err != nil {
		t.Fatal(err)
	}
	pids, err := l.procs(rt.cgroupPath(id))
	if err != nil || len(pids) == 0 {
		t.Fatalf("no processes in the sandbox's cgroup: %v", err)
	}
	return pids
}
