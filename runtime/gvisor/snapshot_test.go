package gvisor

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/runtime"
)

// restoreAs claims id's network devices and restores snapDir into them.
func (e *env) restoreAs(ctx context.Context, cfg runtime.Config, snapDir string) (runtime.Sandbox, error) {
	att, err := e.pool.Setup(ctx, cfg.ID)
	if err != nil {
		return runtime.Sandbox{}, err
	}
	cfg.Network = att
	sb, err := e.rt.Restore(ctx, cfg, snapDir)
	if err != nil {
		if terr := e.pool.Teardown(ctx, cfg.ID); terr != nil {
			e.tb.Errorf("releasing the network of a failed restore: %v", terr)
		}
		return runtime.Sandbox{}, err
	}
	return sb, nil
}

func read(t *testing.T, sb runtime.Sandbox, path string) string {
	t.Helper()
	code, body := get(t, sb, "/read?path="+path)
	if code != 200 {
		return "<" + strings.TrimSpace(body) + ">"
	}
	return body
}

func write(t *testing.T, sb runtime.Sandbox, path, data string) {
	t.Helper()
	if code, body := get(t, sb, "/write?path="+path+"&data="+data); code != 200 {
		t.Fatalf("write %s: %d %s", path, code, body)
	}
}

func TestSnapshotRestore(t *testing.T) {
	e := newEnv(t, "100.88.253.0/27")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	before := treeDigest(t, tmpl)
	snaps := t.TempDir()

	a, err := e.create(ctx, config(testID("snapa"), tmpl))
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, a, 10*time.Second)
	write(t, a, "/home/state", "before")
	get(t, a, "/memo?set=in-memory")
	for counter(t, a) < 5 {
		time.Sleep(20 * time.Millisecond)
	}

	mem := filepath.Join(snaps, "mem")
	if err := e.rt.Snapshot(ctx, a.ID, mem, runtime.SnapshotOptions{Memory: true}); err != nil {
		t.Fatal(err)
	}
	atSnapshot := counter(t, a)
	// The source runs on, and what it does next is not in the snapshot.
	if st := listState(t, e.rt, a.ID); st != runtime.StateRunning {
		t.Fatalf("source after the snapshot is %s", st)
	}
	write(t, a, "/home/state", "after")
	write(t, a, "/home/later", "x")

	t.Run("memory: forks continue the processes and diverge", func(t *testing.T) {
		var forks [3]runtime.Sandbox
		var errs [3]error
		var wg sync.WaitGroup
		for i := range forks {
			wg.Add(1)
			go func() {
				defer wg.Done()
				forks[i], errs[i] = e.restoreAs(ctx, config(testID("fork"), tmpl), mem)
			}()
		}
		wg.Wait()
		if err := errors.Join(errs[:]...); err != nil {
			t.Fatal(err)
		}
		for i, f := range forks {
			// Reachable at its own address: runsc gave the restored
			// network stack the new namespace's address.
			waitHealthy(t, f, 10*time.Second)
			if f.Addr == a.Addr {
				t.Fatalf("fork %d has the source's address", i)
			}
			// The same process, not a fresh one: what it held in
			// memory is there, and its tick counter went on.
			if _, m := get(t, f, "/memo"); m != "in-memory" {
				t.Errorf("fork %d: memo %q, want the source's", i, m)
			}
			if n := counter(t, f); n < atSnapshot-1 {
				t.Errorf("fork %d: counter %d, the source had %d at the snapshot", i, n, atSnapshot)
			}
			if got := read(t, f, "/home/state"); got != "before" {
				t.Errorf("fork %d reads %q, want the snapshot's \"before\"", i, got)
			}
			if got := read(t, f, "/home/later"); !strings.HasPrefix(got, "<") {
				t.Errorf("fork %d has a file written after the snapshot: %q", i, got)
			}
			if _, info := get(t, f, "/info"); !strings.Contains(info, `"hostname":"`+f.ID+`"`) {
				t.Errorf("fork %d: /info %s, want its own hostname", i, info)
			}
			write(t, f, "/home/state", f.ID)
		}
		for i, f := range forks {
			if got := read(t, f, "/home/state"); got != f.ID {
				t.Errorf("fork %d reads %q, want its own write", i, got)
			}
			if err := e.kill(ctx, f.ID); err != nil {
				t.Fatal(err)
			}
		}
		if got := read(t, a, "/home/state"); got != "after" {
			t.Errorf("source reads %q after the forks wrote theirs", got)
		}
	})

	t.Run("filesystem only: a fresh boot on the snapshot's files", func(t *testing.T) {
		fsOnly := filepath.Join(snaps, "fs")
		if err := e.rt.Snapshot(ctx, a.ID, fsOnly, runtime.SnapshotOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(fsOnly, snapshotCkptDir)); err == nil {
			t.Fatal("a filesystem snapshot has a checkpoint")
		}
		b, err := e.restoreAs(ctx, config(testID("fresh"), tmpl), fsOnly)
		if err != nil {
			t.Fatal(err)
		}
		waitHealthy(t, b, 10*time.Second)
		if got := read(t, b, "/home/state"); got != "after" {
			t.Errorf("reads %q, want \"after\"", got)
		}
		if _, m := get(t, b, "/memo"); m != "" {
			t.Errorf("memo %q: the probe did not start afresh", m)
		}
		if err := e.kill(ctx, b.ID); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a paused sandbox stays paused", func(t *testing.T) {
		if err := e.rt.Pause(ctx, a.ID); err != nil {
			t.Fatal(err)
		}
		if err := e.rt.Snapshot(ctx, a.ID, filepath.Join(snaps, "paused"), runtime.SnapshotOptions{Memory: true}); err != nil {
			t.Fatal(err)
		}
		if st := listState(t, e.rt, a.ID); st != runtime.StatePaused {
			t.Fatalf("after the snapshot the sandbox is %s", st)
		}
		if err := e.rt.Resume(ctx, a.ID); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("refusals leave nothing behind", func(t *testing.T) {
		if err := e.rt.Snapshot(ctx, a.ID, mem, runtime.SnapshotOptions{}); err == nil {
			t.Error("a snapshot over an existing directory was made")
		}
		if err := e.rt.Snapshot(ctx, "nosuchsandbox", filepath.Join(snaps, "x"), runtime.SnapshotOptions{}); !errors.Is(err, runtime.ErrNotFound) {
			t.Errorf("snapshot of an unknown sandbox: %v", err)
		}
		bad := filepath.Join(snaps, "bad")
		os.MkdirAll(bad, 0o700)
		other := makeTemplate(t)
		small := config(testID("small"), tmpl)
		small.MemoryMB = 64
		bigger := config(testID("bigger"), tmpl)
		bigger.DiskSizeMB = 2048
		cases := []struct {
			name string
			cfg  runtime.Config
			dir  string
			meta string // written as bad/snapshot.json
			want string
		}{
			{"not a snapshot", config(testID("r"), tmpl), bad, "", "is not a snapshot"},
			{"garbage", config(testID("r"), tmpl), bad, "{", "snapshot"},
			{"other version", config(testID("r"), tmpl), bad, `{"version":99,"runtime":"gvisor"}`, "version 99"},
			{"other backend", config(testID("r"), tmpl), bad, `{"version":1,"runtime":"microvm"}`, `"microvm" backend`},
			{"other template", config(testID("r"), other), mem, "", "was made on template"},
			{"less memory", small, mem, "", "too little"},
			{"other disk size", bigger, mem, "", "disk is 1024 MiB"},
		}
		for _, c := range cases {
			os.Remove(filepath.Join(bad, snapshotMetaFile))
			if c.meta != "" {
				os.WriteFile(filepath.Join(bad, snapshotMetaFile), []byte(c.meta), 0o600)
			}
			_, err := e.restoreAs(ctx, c.cfg, c.dir)
			if err == nil || !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("%s: %v, want ErrInvalidConfig with %q", c.name, err, c.want)
			}
			if _, err := os.Stat(e.rt.sandboxDir(c.cfg.ID)); err == nil {
				t.Errorf("%s: left a sandbox directory", c.name)
			}
		}
	})

	if err := e.kill(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if treeDigest(t, tmpl) != before {
		t.Fatal("the template changed")
	}
}

// TestSnapshotWithoutDisk: a sandbox whose upper layer is a directory
// (DiskSizeMB 0) snapshots and restores it as a directory.
func TestSnapshotWithoutDisk(t *testing.T) {
	e := newEnv(t, "100.88.253.32/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	cfg := config(testID("nodisk"), tmpl)
	cfg.DiskSizeMB = 0
	a, err := e.create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, a, 10*time.Second)
	write(t, a, "/home/state", "kept")
	get(t, a, "/memo?set=kept")
	snap := filepath.Join(t.TempDir(), "snap")
	if err := e.rt.Snapshot(ctx, a.ID, snap, runtime.SnapshotOptions{Memory: true}); err != nil {
		t.Fatal(err)
	}
	cfgB := config(testID("nodiskb"), tmpl)
	cfgB.DiskSizeMB = 0
	b, err := e.restoreAs(ctx, cfgB, snap)
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, b, 10*time.Second)
	if got := read(t, b, "/home/state"); got != "kept" {
		t.Errorf("reads %q", got)
	}
	if _, m := get(t, b, "/memo"); m != "kept" {
		t.Errorf("memo %q", m)
	}
	for _, id := range []string{a.ID, b.ID} {
		if err := e.kill(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSnapshotKeepsVolumes: a restored sandbox mounts its snapshot's
// volumes (its processes may hold their files open), shared with the
// source; one whose volume is gone is refused.
func TestSnapshotKeepsVolumes(t *testing.T) {
	e := newEnv(t, "100.88.253.48/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	vol := filepath.Join(t.TempDir(), "vol")
	if err := os.Mkdir(vol, 0o777); err != nil {
		t.Fatal(err)
	}
	cfg := config(testID("vsrc"), tmpl)
	cfg.Volumes = []runtime.VolumeMount{{HostDir: vol, Path: "/mnt/data"}}
	a, err := e.create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, a, 10*time.Second)
	write(t, a, "/mnt/data/x", "before")
	snap := filepath.Join(t.TempDir(), "snap")
	if err := e.rt.Snapshot(ctx, a.ID, snap, runtime.SnapshotOptions{Memory: true}); err != nil {
		t.Fatal(err)
	}
	b, err := e.restoreAs(ctx, config(testID("vcopy"), tmpl), snap)
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, b, 10*time.Second)
	write(t, b, "/mnt/data/y", "from-b")
	if got := read(t, a, "/mnt/data/y"); got != "from-b" {
		t.Errorf("the source reads %q of the copy's write to the shared volume", got)
	}
	if got := read(t, b, "/mnt/data/x"); got != "before" {
		t.Errorf("the copy reads %q", got)
	}
	for _, id := range []string{a.ID, b.ID} {
		if err := e.kill(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.RemoveAll(vol); err != nil {
		t.Fatal(err)
	}
	if _, err := e.restoreAs(ctx, config(testID("vgone"), tmpl), snap); !errors.Is(err, ErrInvalidConfig) || !strings.Contains(err.Error(), "volume") {
		t.Errorf("restore without the snapshot's volume: %v", err)
	}
}
