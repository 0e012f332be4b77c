//go:build linux && amd64

package microvm

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
)

// fakeSandboxSnap writes a well-formed sandbox snapshot directory (state
// and memory of a 1 MiB, 2-vCPU VM as fakeSnapshot makes them, a 4 MiB
// disk) with no VM behind it: what loadSandboxSnap and Restore check
// before they make anything needs no KVM.
func fakeSandboxSnap(t *testing.T, dir string, memory bool) sandboxSnapMeta {
	t.Helper()
	fakeSnapshot(t, dir, snapMetaData{VCPUs: 2, MemoryMiB: 1, DiskMB: 4})
	os.Remove(filepath.Join(dir, snapMeta))
	if !memory {
		os.Remove(filepath.Join(dir, snapState))
		os.Remove(filepath.Join(dir, snapMemory))
	}
	m := sandboxSnapMeta{Version: sbSnapVersion, Runtime: Name, Memory: memory,
		Config: runtime.Config{ID: "src", RootFS: "/tmpl", CPUCount: 2, MemoryMB: 1, DiskSizeMB: 4},
		Origin: origin{TemplateSnapshot: "k", ImageKey: "image-a", KernelKey: "kernel-a", VMMHash: "", VCPUs: 2, MemoryMiB: 1},
		VCPUs:  2, MemoryMiB: 1, DiskMB: 4}
	writeSnapMeta(t, dir, m)
	return m
}

func writeSnapMeta(t *testing.T, dir string, m sandboxSnapMeta) {
	t.Helper()
	b, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(dir, sbSnapMeta), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestLoadSandboxSnapBad: a sandbox snapshot that is not one, is
// another backend's or version, or whose files are missing, truncated or
// disagree with its meta is refused with ErrInvalidConfig saying which;
// a whole one loads, with and without memory.
func TestLoadSandboxSnapBad(t *testing.T) {
	edit := func(f func(*sandboxSnapMeta)) func(*testing.T, string, sandboxSnapMeta) {
		return func(t *testing.T, dir string, m sandboxSnapMeta) { f(&m); writeSnapMeta(t, dir, m) }
	}
	for _, tc := range []struct {
		name   string
		memory bool
		spoil  func(t *testing.T, dir string, m sandboxSnapMeta)
		msg    string
	}{
		{"whole", true, func(*testing.T, string, sandboxSnapMeta) {}, ""},
		{"whole without memory", false, func(*testing.T, string, sandboxSnapMeta) {}, ""},
		{"no meta", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Remove(filepath.Join(dir, sbSnapMeta)) }, "is not a snapshot"},
		{"garbage meta", true, func(t *testing.T, dir string, _ sandboxSnapMeta) {
			os.WriteFile(filepath.Join(dir, sbSnapMeta), []byte("{"), 0o600)
		}, "unexpected end of JSON"},
		{"gVisor's", true, edit(func(m *sandboxSnapMeta) { m.Runtime = "gvisor" }), `of the "gvisor" backend`},
		{"another version", true, edit(func(m *sandboxSnapMeta) { m.Version = 99 }), "version 99"},
		{"bad sandbox id", true, edit(func(m *sandboxSnapMeta) { m.Config.ID = "../x" }), "sandbox id"},
		{"disk size disagrees", true, edit(func(m *sandboxSnapMeta) { m.Config.DiskSizeMB = 8 }), "does not match"},
		{"no VM", true, edit(func(m *sandboxSnapMeta) { m.VCPUs = 0 }), "not a VM"},
		{"no image key", true, edit(func(m *sandboxSnapMeta) { m.Origin.ImageKey = "" }), "must name its template image"},
		{"vCPUs disagree", true, edit(func(m *sandboxSnapMeta) { m.VCPUs, m.Config.CPUCount = 3, 3 }), "does not match its meta"},
		{"memory size disagrees", true, edit(func(m *sandboxSnapMeta) { m.MemoryMiB = 2 }), "does not match its meta"},
		{"truncated disk", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Truncate(filepath.Join(dir, snapDisk), 1<<20) }, "not 4 MiB"},
		{"no disk", false, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Remove(filepath.Join(dir, snapDisk)) }, "not 4 MiB"},
		{"truncated memory", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Truncate(filepath.Join(dir, snapMemory), 4096) }, "truncated?"},
		{"no memory file", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Remove(filepath.Join(dir, snapMemory)) }, "memory file is missing"},
		{"no state", true, func(t *testing.T, dir string, _ sandboxSnapMeta) { os.Remove(filepath.Join(dir, snapState)) }, "no such file"},
		{"corrupt state", true, func(t *testing.T, dir string, _ sandboxSnapMeta) {
			p := filepath.Join(dir, snapState)
			b, _ := os.ReadFile(p)
			b[len(b)/2] ^= 0xff
			os.WriteFile(p, b, 0o600)
		}, "snapshot:"},
		{"memory claimed, none there", false, edit(func(m *sandboxSnapMeta) { m.Memory, m.Origin.VMMHash = true, "v" }), "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "snap")
			m := fakeSandboxSnap(t, dir, tc.memory)
			if tc.memory {
				m.Origin.VMMHash = "vmm-a"
				writeSnapMeta(t, dir, m)
			}
			tc.spoil(t, dir, m)
			s, err := loadSandboxSnap(dir)
			if tc.msg == "" {
				if err != nil || s.meta.Config.ID != "src" || s.meta.Memory != tc.memory {
					t.Fatalf("whole snapshot: %+v, %v", s, err)
				}
				return
			}
			if !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want ErrInvalidConfig saying %q", err, tc.msg)
			}
		})
	}
}

// TestRestoreRefuses: Restore refuses a snapshot it cannot honour (made
// on another template, another disk size, too little memory or too few
// vCPUs for its VM, a template image or VMM other than the ones its
// guest had) before it makes anything: no sandbox directory is left.
func TestRestoreRefuses(t *testing.T) {
	vmmBin := filepath.Join(t.TempDir(), "cubicle")
	os.WriteFile(vmmBin, []byte("a VMM binary"), 0o700)
	sum, err := hashFile(vmmBin)
	if err != nil {
		t.Fatal(err)
	}
	state := t.TempDir()
	r := &Runtime{
		opts: Options{StateDir: state, CacheDir: t.TempDir(), KernelKey: "kernel-a", VMM: vmmBin,
			Image: func(_ context.Context, cfg runtime.Config) (Image, error) {
				if cfg.RootFS == "/other-image" {
					return Image{Path: "/img", Key: "image-b"}, nil
				}
				return Image{Path: "/img", Key: "image-a"}, nil
			}},
		log:   slog.New(slog.DiscardHandler),
		snaps: map[string]*snapshotEntry{},
	}
	mem, fsOnly := filepath.Join(t.TempDir(), "mem"), filepath.Join(t.TempDir(), "fs")
	m := fakeSandboxSnap(t, mem, true)
	m.Origin.VMMHash = sum
	writeSnapMeta(t, mem, m)
	fakeSandboxSnap(t, fsOnly, false)
	att := network.Attachment{ID: "dst", Netns: "/run/netns/none", Tap: "tap0", Addr: netip.MustParseAddr("100.88.0.2")}
	cfg := runtime.Config{ID: "dst", RootFS: "/tmpl", CPUCount: 2, MemoryMB: 1, DiskSizeMB: 4, Network: att}
	for _, tc := range []struct {
		name string
		dir  string
		edit func(*runtime.Config)
		msg  string
	}{
		{"another template", mem, func(c *runtime.Config) { c.RootFS = "/other" }, "made on template /tmpl, not /other"},
		{"another disk size", mem, func(c *runtime.Config) { c.DiskSizeMB = 8 }, "disk is 4 MiB, not 8"},
		{"another disk size, filesystem only", fsOnly, func(c *runtime.Config) { c.DiskSizeMB = 8 }, "disk is 4 MiB, not 8"},
		{"no memory", mem, func(c *runtime.Config) { c.MemoryMB = 0 }, "must be positive"},
		{"too few vCPUs", mem, func(c *runtime.Config) { c.CPUCount = 1 }, "2 vCPUs; 1 is too few"},
		{"volumes", mem, func(c *runtime.Config) { c.Volumes = []runtime.VolumeMount{{Path: "/v", HostDir: "/tmp"}} }, "volumes are not supported"},
		{"no network", mem, func(c *runtime.Config) { c.Network = network.Attachment{} }, "tap-mode attachment"},
		{"not a snapshot", filepath.Dir(mem), func(*runtime.Config) {}, "is not a snapshot"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := cfg
			tc.edit(&c)
			_, err := r.Restore(context.Background(), c, tc.dir)
			if err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("got %v, want an error saying %q", err, tc.msg)
			}
			if !errors.Is(err, ErrInvalidConfig) && !errors.Is(err, runtime.ErrUnsupported) {
				t.Errorf("%v wraps neither ErrInvalidConfig nor ErrUnsupported", err)
			}
			if left, _ := os.ReadDir(state); len(left) != 0 {
				t.Errorf("left in the state dir: %v", left)
			}
		})
	}
	t.Run("another image or VMM", func(t *testing.T) {
		c := cfg
		c.RootFS = "/other-image"
		m2 := m
		m2.Config.RootFS = "/other-image"
		writeSnapMeta(t, mem, m2)
		defer writeSnapMeta(t, mem, m)
		if _, err := r.Restore(context.Background(), c, mem); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "template image image-a mounted") {
			t.Errorf("another image: %v", err)
		}
		m3 := m
		m3.Origin.VMMHash = "another"
		writeSnapMeta(t, mem, m3)
		if _, err := r.Restore(context.Background(), cfg, mem); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "another VMM binary") {
			t.Errorf("another VMM: %v", err)
		}
		if left, _ := os.ReadDir(state); len(left) != 0 {
			t.Errorf("left in the state dir: %v", left)
		}
	})
}

// FuzzSandboxSnapMeta: snapshot.json is a file on disk; whatever it
// holds, the parser answers without panicking, and what it accepts is a
// backend-, version- and size-consistent meta with a valid sandbox ID.
func FuzzSandboxSnapMeta(f *testing.F) {
	good, _ := json.Marshal(sandboxSnapMeta{Version: sbSnapVersion, Runtime: Name, Memory: true,
		Config: runtime.Config{ID: "abc", DiskSizeMB: 4}, Origin: origin{ImageKey: "i", VMMHash: "v"}, VCPUs: 1, MemoryMiB: 1, DiskMB: 4})
	f.Add(good)
	f.Add([]byte(`{"version":1,"runtime":"microvm","config":{"ID":"a","DiskSizeMB":1},"vcpus":1,"memoryMiB":1,"diskMB":1}`))
	f.Add([]byte(`{"version":1,"runtime":"gvisor"}`))
	f.Add([]byte(`{`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseSandboxSnapMeta(b)
		if err != nil {
			return
		}
		if m.Runtime != Name || m.Version != sbSnapVersion || m.DiskMB < 1 || m.DiskMB != m.Config.DiskSizeMB ||
			m.VCPUs < 1 || m.MemoryMiB < 1 || checkID(m.Config.ID) != nil || (m.Memory && (m.Origin.ImageKey == "" || m.Origin.VMMHash == "")) {
			t.Fatalf("accepted %+v", m)
		}
	})
}

// testSnapshots is TestMicroVM's part for runtime.Snapshotter on real
// guests, as runtime/gvisor's TestSnapshotRestore: a value held only in a
// guest process's memory survives a memory snapshot into two forks,
// which continue the process, get their own hostname, RNG and clock, see
// the files of the snapshot's instant and then diverge; the source runs
// on; a filesystem-only snapshot of a paused sandbox leaves it paused
// and boots afresh with its files; and what cannot be restored is
// refused with nothing left behind.
func testSnapshots(t *testing.T, r *Runtime, opts Options, create func(*testing.T, string) runtime.Sandbox) {
	ctx := context.Background()
	snaps := t.TempDir()
	t.Cleanup(func() {
		// The VMMs' own log says why a VM stopped (inside nested KVM it
		// is gone with L1 otherwise).
		if t.Failed() {
			t.Logf("vmm.log:\n%s", tail(filepath.Join(opts.StateDir, "vmm.log"), 8192))
		}
	})
	src := create(t, "mvsnapsrc")
	waitHealth(t, src.Addr)
	envdRun(t, src.Addr, "echo before > /tmp/state && sync")
	// The memo is in the loop's shell variable only; /dev/shm (tmpfs, in
	// guest memory too) shows it, with a counter that says the loop runs.
	pid := envdRun(t, src.Addr, `setsid bash -c 'memo=m$RANDOM$RANDOM; n=0; while :; do n=$((n+1)); echo "$memo $n" > /dev/shm/memo.tmp; mv /dev/shm/memo.tmp /dev/shm/memo; sleep 0.2; done' </dev/null >/dev/null 2>&1 & echo $!`)
	var memo string
	for i := 0; memo == "" && i < 100; i++ {
		memo, _, _ = strings.Cut(envdRun(t, src.Addr, "cat /dev/shm/memo 2>/dev/null || true"), " ")
	}
	if memo == "" {
		t.Fatal("the memo loop never wrote its memo")
	}
	counter := func(sb runtime.Sandbox) (string, int) {
		t.Helper()
		m, n, _ := strings.Cut(envdRun(t, sb.Addr, "cat /dev/shm/memo"), " ")
		c, err := strconv.Atoi(n)
		if err != nil {
			t.Fatalf("%s: memo %q %q", sb.ID, m, n)
		}
		return m, c
	}

	limit := func() string {
		rec, err := r.readRecord(src.ID)
		if err != nil || rec.Jail == nil || rec.Jail.Memory == "" {
			return "(no jail)"
		}
		b, _ := os.ReadFile(filepath.Join(rec.Jail.Memory, "memory.limit_in_bytes"))
		return strings.TrimSpace(string(b))
	}
	limitBefore := limit()
	mem := filepath.Join(snaps, "mem")
	if err := r.Snapshot(ctx, src.ID, mem, runtime.SnapshotOptions{Memory: true}); err != nil {
		t.Fatal(err)
	}
	if got := limit(); got != limitBefore {
		t.Errorf("the jail's memory limit is %s after the snapshot, %s before", got, limitBefore)
	}
	if err := r.Snapshot(ctx, src.ID, mem, runtime.SnapshotOptions{Memory: true}); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("a snapshot into an existing directory: %v", err)
	}
	if _, err := os.Stat(mem + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary directory left: %v", err)
	}
	if st := state(t, r, src.ID); st != runtime.StateRunning {
		t.Fatalf("source after the snapshot is %s", st)
	}
	_, atSnapshot := counter(src)
	envdRun(t, src.Addr, "echo after > /tmp/state && echo x > /tmp/later && sync")

	t.Run("memory: forks continue the process and diverge", func(t *testing.T) {
		var forks []runtime.Sandbox
		for _, id := range []string{"mvforka", "mvforkb"} {
			cfg := testConfig(t, opts, id)
			sb, err := r.Restore(ctx, cfg, mem)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Kill(context.Background(), id) })
			if sb.ID != id || sb.Addr != cfg.Network.Addr || sb.State != runtime.StateRunning {
				t.Fatalf("restored %+v into %+v", sb, cfg.Network)
			}
			forks = append(forks, sb)
		}
		const rng = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
		var rngs []string
		for _, f := range forks {
			waitHealth(t, f.Addr)
			if got := envdRun(t, f.Addr, "hostname"); got != f.ID {
				t.Errorf("%s's hostname is %q", f.ID, got)
			}
			if got := envdRun(t, f.Addr, "kill -0 "+pid+" && echo alive"); got != "alive" {
				t.Errorf("%s: the snapshot's process %s: %q", f.ID, pid, got)
			}
			m, n := counter(f)
			if m != memo || n < atSnapshot-20 {
				t.Errorf("%s: memo %q at %d; the source had %q at %d when snapshotted", f.ID, m, n, memo, atSnapshot)
			}
			time.Sleep(2 * time.Second)
			if _, n2 := counter(f); n2 <= n {
				t.Errorf("%s: the memo loop does not run on: %d, then %d", f.ID, n, n2)
			}
			if got := envdRun(t, f.Addr, "cat /tmp/state; ls /tmp/later 2>/dev/null || true"); got != "before" {
				t.Errorf("%s's files are not the snapshot's: %q", f.ID, got)
			}
			envdRun(t, f.Addr, "echo "+f.ID+" > /tmp/mine")
			rngs = append(rngs, envdRun(t, f.Addr, rng))
			sec, err := strconv.ParseInt(envdRun(t, f.Addr, "date +%s"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			if d := time.Since(time.Unix(sec, 0)); d < -time.Minute || d > time.Minute {
				t.Errorf("%s's clock is %v off the host's", f.ID, d)
			}
		}
		for _, f := range forks {
			if got := envdRun(t, f.Addr, "cat /tmp/mine"); got != f.ID {
				t.Errorf("%s sees /tmp/mine = %q: the forks share a disk", f.ID, got)
			}
		}
		if len(rngs[0]) != 32 || rngs[0] == rngs[1] {
			t.Errorf("the forks' RNGs agree (or failed): %q", rngs)
		}
		if got := envdRun(t, src.Addr, "cat /tmp/state; cat /tmp/mine 2>/dev/null || true"); got != "after" {
			t.Errorf("the source sees %q", got)
		}
		// A fork can be snapshotted and restored in turn, and killing it
		// leaves nothing.
		again := filepath.Join(snaps, "again")
		if err := r.Snapshot(ctx, forks[0].ID, again, runtime.SnapshotOptions{Memory: true}); err != nil {
			t.Errorf("snapshot of a fork: %v", err)
		}
		cfg := testConfig(t, opts, "mvforkc")
		c, err := r.Restore(ctx, cfg, again)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Kill(context.Background(), c.ID) })
		waitHealth(t, c.Addr)
		if got := envdRun(t, c.Addr, "hostname; cat /tmp/mine"); got != c.ID+"\n"+forks[0].ID {
			t.Errorf("the fork of a fork: %q", got)
		}
		if m, _ := counter(c); m != memo {
			t.Errorf("the fork of a fork has memo %q, not %q", m, memo)
		}
		rec, err := r.readRecord(forks[0].ID)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Kill(ctx, forks[0].ID); err != nil {
			t.Fatal(err)
		}
		if alive(rec) {
			t.Errorf("fork's VMM %d runs after Kill", rec.Pid)
		}
		if rec.Jail != nil {
			if _, err := os.Stat(rec.Jail.Root); !os.IsNotExist(err) {
				t.Errorf("fork's jail left: %v", err)
			}
		}
	})

	t.Run("filesystem only: a paused source stays paused; the restore boots afresh", func(t *testing.T) {
		if err := r.Pause(ctx, src.ID); err != nil {
			t.Fatal(err)
		}
		fsOnly := filepath.Join(snaps, "fs")
		if err := r.Snapshot(ctx, src.ID, fsOnly, runtime.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if st := state(t, r, src.ID); st != runtime.StatePaused {
			t.Errorf("paused source after the snapshot is %s", st)
		}
		if err := r.Resume(ctx, src.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(fsOnly, snapMemory)); !os.IsNotExist(err) {
			t.Errorf("a filesystem-only snapshot has memory: %v", err)
		}
		cfg := testConfig(t, opts, "mvfsonly")
		sb, err := r.Restore(ctx, cfg, fsOnly)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { r.Kill(context.Background(), sb.ID) })
		waitHealth(t, sb.Addr)
		if got := envdRun(t, sb.Addr, "hostname; cat /tmp/state /tmp/later; ls /dev/shm"); got != "mvfsonly\nafter\nx" {
			t.Errorf("booted afresh: %q (want its hostname, the files, an empty /dev/shm)", got)
		}
		// ("mem[o]=" matches the loop's command line, not grep's own.)
		if got := envdRun(t, sb.Addr, "grep -l 'mem[o]=' /proc/[0-9]*/cmdline 2>/dev/null | wc -l"); got != "0" {
			t.Errorf("the snapshot's memo loop runs in a fresh boot: %q", got)
		}
	})

	t.Run("refusals leave nothing behind", func(t *testing.T) {
		cfg := testConfig(t, opts, "mvrefused")
		small := cfg
		small.MemoryMB = testMemoryMB / 2
		other := cfg
		other.DiskSizeMB = testDiskMB * 2
		for _, c := range []runtime.Config{small, other} {
			if _, err := r.Restore(ctx, c, mem); !errors.Is(err, ErrInvalidConfig) {
				t.Errorf("restore with %d MiB, %d MiB disk: %v", c.MemoryMB, c.DiskSizeMB, err)
			}
		}
		if _, err := os.Stat(r.sandboxDir(cfg.ID)); !os.IsNotExist(err) {
			t.Errorf("sandbox directory left: %v", err)
		}
		if err := r.Snapshot(ctx, "mvnosuch", filepath.Join(snaps, "none"), runtime.SnapshotOptions{Memory: true}); !errors.Is(err, runtime.ErrNotFound) {
			t.Errorf("snapshot of no sandbox: %v", err)
		}
	})
}

// TestOriginOfOldRecord: a sandbox whose record predates Origin (made by
// an earlier server) is snapshotted with its template snapshot's inputs,
// read from that snapshot's meta.json; without one it is an error, not
// a snapshot that names nothing.
func TestOriginOfOldRecord(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tmpl")
	fakeSnapshot(t, dir, snapMetaData{Key: "k", KernelKey: "kernel-a", ImageKey: "image-a", VMMHash: "vmm-a", VCPUs: 2, MemoryMiB: 1, DiskMB: 4})
	r := &Runtime{log: slog.New(slog.DiscardHandler)}
	got, err := r.originOf(record{Snapshot: dir})
	want := origin{TemplateSnapshot: "k", ImageKey: "image-a", KernelKey: "kernel-a", VMMHash: "vmm-a", VCPUs: 2, MemoryMiB: 1}
	if err != nil || got != want {
		t.Fatalf("origin %+v, %v; want %+v", got, err, want)
	}
	if _, err := r.originOf(record{Snapshot: t.TempDir()}); err == nil {
		t.Error("a record whose template snapshot is gone has an origin")
	}
	own := origin{ImageKey: "x"}
	if got, err := r.originOf(record{Snapshot: dir, Origin: &own}); err != nil || got != own {
		t.Errorf("a record's own origin: %+v, %v", got, err)
	}
}
