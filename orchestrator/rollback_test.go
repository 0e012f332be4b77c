package orchestrator

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem/filesystemconnect"
	"github.com/cubicle-dev/cubicle/store"
)

// fsCall runs one envd filesystem call in sandbox in as the default user.
func fsCall[Req, Resp any](t *testing.T, in Info, call func(filesystemconnect.FilesystemClient, context.Context, *connect.Request[Req]) (*connect.Response[Resp], error), msg *Req) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	fc := filesystemconnect.NewFilesystemClient(http.DefaultClient, envdURL(in.Address, ""))
	req := connect.NewRequest(msg)
	req.Header().Set("X-Access-Token", in.EnvdAccessToken)
	req.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte("user:")))
	_, err := call(fc, ctx, req)
	return err
}

func mkdir(t *testing.T, in Info, path string) {
	t.Helper()
	if err := fsCall(t, in, filesystemconnect.FilesystemClient.MakeDir, &filesystem.MakeDirRequest{Path: path}); err != nil {
		t.Fatalf("mkdir %s: %v", path, err)
	}
}

// rmrf removes path and everything under it, as rm -rf does.
func rmrf(t *testing.T, in Info, path string) {
	t.Helper()
	if err := fsCall(t, in, filesystemconnect.FilesystemClient.Remove, &filesystem.RemoveRequest{Path: path}); err != nil {
		t.Fatalf("rm -rf %s: %v", path, err)
	}
}

func exists(t *testing.T, in Info, path string) bool {
	t.Helper()
	err := fsCall(t, in, filesystemconnect.FilesystemClient.Stat, &filesystem.StatRequest{Path: path})
	if connect.CodeOf(err) == connect.CodeNotFound {
		return false
	}
	if err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return true
}

func hasTag(t *testing.T, in Info, tag string) bool {
	t.Helper()
	ts, err := tags(t, in, in.EnvdAccessToken)
	if err != nil {
		t.Fatalf("listing processes of %s: %v", in.ID, err)
	}
	return slices.Contains(ts, tag)
}

// sameIdentity fails unless got is the sandbox want was, in place.
func sameIdentity(t *testing.T, got, want Info) {
	t.Helper()
	if got.ID != want.ID || got.EnvdAccessToken != want.EnvdAccessToken || got.TrafficToken != want.TrafficToken ||
		got.Metadata["k"] != want.Metadata["k"] || !got.EndAt.Equal(want.EndAt) || got.Owner != want.Owner {
		t.Fatalf("the sandbox changed identity:\n got %+v\nwant %+v", got.Sandbox, want.Sandbox)
	}
}

func TestRollback(t *testing.T) {
	w := newWorld(t, "100.89.10.0/24")
	o := w.orchestrator(t, 0)
	ctx := context.Background()
	const project = "/home/user/project"

	a, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour, Owner: "alice", Metadata: map[string]string{"k": "v"}})
	if err != nil {
		t.Fatal(err)
	}
	mkdir(t, a, project+"/src")
	startTagged(t, a, "keeper")
	sn, err := o.Snapshot(ctx, a.ID, "before")
	if err != nil {
		t.Fatal(err)
	}

	t.Run("undoes an rm -rf in place", func(t *testing.T) {
		rmrf(t, a, project)
		startTagged(t, a, "after")
		if exists(t, a, project) {
			t.Fatal("rm -rf left the directory")
		}
		got, err := o.Rollback(ctx, a.ID, "before:default")
		if err != nil {
			t.Fatal(err)
		}
		sameIdentity(t, got, a)
		if got.State != StateRunning {
			t.Fatalf("state %s after a rollback", got.State)
		}
		if !exists(t, got, project+"/src") {
			t.Error("the directory is not back")
		}
		if !hasTag(t, got, "keeper") || hasTag(t, got, "after") {
			t.Error("the processes are not the snapshot's")
		}
		if e := envs(t, got); e["E2B_SANDBOX_ID"] != a.ID {
			t.Errorf("E2B_SANDBOX_ID %q", e["E2B_SANDBOX_ID"])
		}
		if _, err := os.Stat(o.pausedPath(a.ID)); err == nil {
			t.Error("the saved state is left on disk")
		}
		// The snapshot stays: a rollback can be undone again, by bare ID.
		rmrf(t, got, project)
		if got, err = o.Rollback(ctx, a.ID, sn.ID); err != nil || !exists(t, got, project+"/src") {
			t.Fatalf("second rollback: %v", err)
		}
		a = got
	})

	t.Run("only to the sandbox's own snapshots", func(t *testing.T) {
		b, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour, Owner: "alice"})
		if err != nil {
			t.Fatal(err)
		}
		other, err := o.Snapshot(ctx, b.ID, "others")
		if err != nil {
			t.Fatal(err)
		}
		if err := o.Kill(ctx, b.ID); err != nil {
			t.Fatal(err)
		}
		for _, ref := range []string{other.ID, "others", "others:default", "nosuch", "before:v2", ""} {
			if _, err := o.Rollback(ctx, a.ID, ref); !errors.Is(err, ErrTemplateNotFound) {
				t.Errorf("rollback to %q: %v, want ErrTemplateNotFound", ref, err)
			}
		}
		if _, err := o.Rollback(ctx, "nosuchsandbox", sn.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("rollback of an unknown sandbox: %v", err)
		}
		if !hasTag(t, a, "keeper") {
			t.Error("a refused rollback touched the sandbox")
		}
	})

	t.Run("a failed restore leaves the sandbox as it was", func(t *testing.T) {
		broken, err := o.Snapshot(ctx, a.ID, "broken")
		if err != nil {
			t.Fatal(err)
		}
		// A snapshot the runtime refuses to restore.
		if err := os.Remove(filepath.Join(o.snapshotPath(broken.ID), "snapshot.json")); err != nil {
			t.Fatal(err)
		}
		rmrf(t, a, project)
		_, err = o.Rollback(ctx, a.ID, "broken")
		if err == nil || errors.Is(err, ErrTemplateNotFound) {
			t.Fatalf("rollback to a broken snapshot: %v", err)
		}
		t.Logf("rollback to a broken snapshot: %v", err)
		sb, err := o.Get(a.ID)
		if err != nil {
			t.Fatal(err)
		}
		got := sb.Info()
		sameIdentity(t, got, a)
		if got.State != StateRunning {
			t.Fatalf("state %s after a failed rollback", got.State)
		}
		if err := health(t, got); err != nil {
			t.Fatal(err)
		}
		if exists(t, got, project) || !hasTag(t, got, "keeper") {
			t.Error("the sandbox is not as it was before the rollback")
		}
		a = got
	})

	t.Run("a paused sandbox stays paused, with the snapshot's state", func(t *testing.T) {
		startTagged(t, a, "after")
		if err := o.Pause(ctx, a.ID, PauseOptions{FilesystemOnly: true}); err != nil {
			t.Fatal(err)
		}
		got, err := o.Rollback(ctx, a.ID, "before")
		if err != nil {
			t.Fatal(err)
		}
		if got.State != StatePaused || got.PausedOnDisk != store.PausedMemory || got.ID != a.ID {
			t.Fatalf("after a rollback of a paused sandbox: %+v", got.Sandbox)
		}
		if ents, _ := os.ReadDir(filepath.Dir(o.pausedPath(a.ID))); len(ents) != 1 {
			t.Errorf("paused/ holds %d entries, want the one pause", len(ents))
		}
		got, err = o.Resume(ctx, a.ID, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if got.EnvdAccessToken != a.EnvdAccessToken {
			t.Fatal("the token changed")
		}
		if !exists(t, got, project+"/src") || !hasTag(t, got, "keeper") || hasTag(t, got, "after") {
			t.Error("resumed without the snapshot's files and processes")
		}
	})

	if err := o.Kill(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	// A sandbox's named snapshots outlive it.
	if _, err := o.opts.Store.GetSnapshot(ctx, sn.ID); err != nil {
		t.Errorf("the kill removed a named snapshot: %v", err)
	}
	o.Close(ctx)
}

func TestCommandCheckpoints(t *testing.T) {
	w := newWorld(t, "100.89.11.0/24")
	o := w.orchestrator(t, 0)
	ctx := context.Background()
	perCmd := map[string]string{CheckpointKey: CheckpointPerCommand}

	if _, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Minute, Owner: "alice",
		Metadata: map[string]string{CheckpointKey: "always"}}); !errors.Is(err, ErrInvalid) {
		t.Errorf("create with an unknown %s: %v", CheckpointKey, err)
	}
	c, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour, Owner: "alice", Metadata: perCmd})
	if err != nil {
		t.Fatal(err)
	}
	if !c.CheckpointsPerCommand() {
		t.Fatal("Info does not say per-command")
	}
	plain, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour, Owner: "alice"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := o.CheckpointCommand(ctx, plain.ID); !errors.Is(err, ErrInvalid) {
		t.Errorf("checkpoint of a sandbox that asked for none: %v", err)
	}
	if _, err := o.Snapshot(ctx, plain.ID, "cmd-1."+plain.ID); !errors.Is(err, ErrInvalid) {
		t.Errorf("a user took a checkpoint's name: %v", err)
	}

	list := func() []string {
		sns, err := o.ListSnapshots(ctx, store.SnapshotFilter{Owner: "alice", SandboxID: c.ID})
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, sn := range sns {
			names = append(names, sn.Name)
		}
		slices.Sort(names)
		return names
	}
	// N commands, N checkpoints.
	const n = 3
	for i := 1; i <= n; i++ {
		// As the proxy does: the checkpoint, then the command.
		sn, err := o.CheckpointCommand(ctx, c.ID)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("cmd-%d.%s", i, c.ID); sn.Name != want || sn.SandboxID != c.ID {
			t.Fatalf("checkpoint %d: %+v, want %s", i, sn, want)
		}
		startTagged(t, c, fmt.Sprintf("cmd%d", i))
	}
	if got := list(); len(got) != n {
		t.Fatalf("%d commands, checkpoints %v", n, got)
	}
	// Undo commands 2 and 3: back to the checkpoint taken before command 2.
	got, err := o.Rollback(ctx, c.ID, fmt.Sprintf("cmd-2.%s:default", c.ID))
	if err != nil {
		t.Fatal(err)
	}
	if !hasTag(t, got, "cmd1") || hasTag(t, got, "cmd2") || hasTag(t, got, "cmd3") {
		ts, _ := tags(t, got, got.EnvdAccessToken)
		t.Fatalf("after the rollback to checkpoint 2 the processes are %v", ts)
	}
	c = got

	// Bounded: the oldest go.
	if _, err := o.Snapshot(ctx, c.ID, "mine"); err != nil {
		t.Fatal(err)
	}
	for i := n + 1; i <= MaxCommandCheckpoints+2; i++ {
		if _, err := o.CheckpointCommand(ctx, c.ID); err != nil {
			t.Fatalf("checkpoint %d: %v", i, err)
		}
	}
	names := list()
	if len(names) != MaxCommandCheckpoints+1 || !slices.Contains(names, "mine") ||
		slices.Contains(names, "cmd-2."+c.ID) || !slices.Contains(names, "cmd-3."+c.ID) ||
		!slices.Contains(names, fmt.Sprintf("cmd-%d.%s", MaxCommandCheckpoints+2, c.ID)) {
		t.Fatalf("after %d checkpoints: %v", MaxCommandCheckpoints+2, names)
	}
	// snapshotDirs counts the snapshots' directories.
	snapshotDirs := func() int {
		ents, _ := os.ReadDir(o.opts.SnapshotDir)
		n := 0
		for _, e := range ents {
			if e.Name() != pausedDir && e.Name() != forksDir {
				n++
			}
		}
		return n
	}
	if n := snapshotDirs(); n != MaxCommandCheckpoints+1 {
		t.Errorf("%d snapshot directories for %d snapshots", n, MaxCommandCheckpoints+1)
	}

	// Removed at kill; the user's own snapshot is not.
	if err := o.Kill(ctx, c.ID); err != nil {
		t.Fatal(err)
	}
	if got := list(); !slices.Equal(got, []string{"mine"}) {
		t.Fatalf("after the kill: %v", got)
	}
	waitFor(t, "the checkpoints' files to go", func() bool { return snapshotDirs() == 1 })
	o.Kill(ctx, plain.ID)

	// A crash between a sandbox's end and the removal of its checkpoints:
	// the next start removes them.
	d, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour, Owner: "alice", Metadata: perCmd})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := o.CheckpointCommand(ctx, d.ID); err != nil {
			t.Fatal(err)
		}
	}
	if err := o.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.st.DeleteSandbox(ctx, d.ID); err != nil {
		t.Fatal(err)
	}
	w.rt = w.runtime(t, "100.89.11.0/24")
	o = w.orchestrator(t, 0)
	if sns, _ := o.ListSnapshots(ctx, store.SnapshotFilter{SandboxID: d.ID}); len(sns) != 0 {
		t.Errorf("after a restart, an ended sandbox's checkpoints are left: %d", len(sns))
	}
	if n := snapshotDirs(); n != 1 {
		t.Errorf("after a restart, %d snapshot directories, want the one named snapshot's", n)
	}
	o.Close(ctx)
}
