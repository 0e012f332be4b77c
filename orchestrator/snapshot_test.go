package orchestrator

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/cubicle-dev/cubicle/guest/envd/gen/process"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
	"github.com/cubicle-dev/cubicle/store"
)

// startTagged starts /faults alloc 1 (which then sleeps) in the sandbox,
// tagged tag, and leaves it running.
func startTagged(t *testing.T, in Info, tag string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pc := processconnect.NewProcessClient(http.DefaultClient, envdURL(in.Address, ""))
	req := connect.NewRequest(&process.StartRequest{Process: &process.ProcessConfig{Cmd: "/faults", Args: []string{"alloc", "1"}}, Tag: &tag})
	req.Header().Set("X-Access-Token", in.EnvdAccessToken)
	req.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte("user:")))
	stream, err := pc.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	for stream.Receive() {
		if d := stream.Msg().GetEvent().GetData(); d != nil && len(d.GetStdout()) > 0 {
			return // allocated: it sleeps now
		}
	}
	t.Fatalf("starting %s: %v", tag, stream.Err())
}

// tags lists the tags of the processes envd runs, asking with token.
func tags(t *testing.T, in Info, token string) ([]string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pc := processconnect.NewProcessClient(http.DefaultClient, envdURL(in.Address, ""))
	req := connect.NewRequest(&process.ListRequest{})
	req.Header().Set("X-Access-Token", token)
	resp, err := pc.List(ctx, req)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, p := range resp.Msg.GetProcesses() {
		out = append(out, p.GetTag())
	}
	return out, nil
}

// envs is envd's GET /envs, asked with in's token.
func envs(t *testing.T, in Info) map[string]string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, envdURL(in.Address, "/envs"), nil)
	req.Header.Set("X-Access-Token", in.EnvdAccessToken)
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var m map[string]string
	if err := json.NewDecoder(resp.Body).Decode(&m); err != nil {
		t.Fatalf("/envs: %s: %v", resp.Status, err)
	}
	return m
}

func hasKeeper(t *testing.T, in Info) bool {
	t.Helper()
	ts, err := tags(t, in, in.EnvdAccessToken)
	if err != nil {
		t.Fatalf("listing processes of %s: %v", in.ID, err)
	}
	return slices.Contains(ts, "keeper")
}

func TestSnapshotsForksAndPauseToDisk(t *testing.T) {
	w := newWorld(t, "100.89.8.0/24")
	o := w.orchestrator(t, 0)
	ctx := context.Background()
	snapDir := filepath.Join(w.dataDir, "snapshots")
	// The restart below makes a runtime and an orchestrator that outlive
	// its subtest: their cleanups are the test's.
	outer := t

	src, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour, Owner: "alice",
		EnvVars: map[string]string{"FOO": "bar"}, Metadata: map[string]string{"k": "v"}})
	if err != nil {
		t.Fatal(err)
	}
	startTagged(t, src, "keeper")

	sn, err := o.Snapshot(ctx, src.ID, "mysnap")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		want error
	}{{"mysnap", store.ErrNameTaken}, {"tiny", ErrInvalid}, {"bad name!", ErrInvalid}} {
		if _, err := o.Snapshot(ctx, src.ID, c.name); !errors.Is(err, c.want) {
			t.Errorf("snapshot named %q: %v, want %v", c.name, err, c.want)
		}
	}
	if _, err := o.Snapshot(ctx, "nosuchsandbox", ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("snapshot of an unknown sandbox: %v", err)
	}

	t.Run("create from the snapshot continues its processes with a new identity", func(t *testing.T) {
		for _, ref := range []string{"mysnap", "mysnap:default", sn.ID + ":default"} {
			c, err := o.Create(ctx, CreateRequest{Template: ref, Timeout: time.Minute, Owner: "alice"})
			if err != nil {
				t.Fatalf("%s: %v", ref, err)
			}
			if c.ID == src.ID || c.EnvdAccessToken == src.EnvdAccessToken || c.Address == src.Address {
				t.Fatalf("%s: the copy shares the source's identity: %+v", ref, c)
			}
			if c.TemplateID != sn.ID || c.CPUCount != src.CPUCount {
				t.Errorf("%s: template %s, cpus %d", ref, c.TemplateID, c.CPUCount)
			}
			if !hasKeeper(t, c) {
				t.Errorf("%s: the snapshot's process is not running", ref)
			}
			if _, err := tags(t, c, src.EnvdAccessToken); err == nil {
				t.Errorf("%s: envd still takes the source's token", ref)
			}
			if e := envs(t, c); e["E2B_SANDBOX_ID"] != c.ID {
				t.Errorf("%s: E2B_SANDBOX_ID %q", ref, e["E2B_SANDBOX_ID"])
			}
			if err := o.Kill(ctx, c.ID); err != nil {
				t.Fatal(err)
			}
		}
		for _, c := range []struct{ ref, owner string }{{"mysnap", "bob"}, {sn.ID, "bob"}, {"mysnap:v2", "alice"}} {
			if _, err := o.Create(ctx, CreateRequest{Template: c.ref, Timeout: time.Minute, Owner: c.owner}); !errors.Is(err, ErrTemplateNotFound) {
				t.Errorf("%s as %s: %v, want ErrTemplateNotFound", c.ref, c.owner, err)
			}
		}
	})

	t.Run("fork", func(t *testing.T) {
		for _, n := range []int{0, MaxForks + 1} {
			if _, err := o.Fork(ctx, src.ID, n, time.Minute); !errors.Is(err, ErrInvalid) {
				t.Errorf("fork count %d: %v", n, err)
			}
		}
		res, err := o.Fork(ctx, src.ID, 3, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{src.ID: true}
		for i, r := range res {
			if r.Err != nil {
				t.Fatalf("fork %d: %v", i, r.Err)
			}
			f := r.Info
			if seen[f.ID] || f.Metadata["k"] != "v" || f.TemplateID != src.TemplateID || f.Owner != "alice" {
				t.Fatalf("fork %d: %+v", i, f)
			}
			seen[f.ID] = true
			if !hasKeeper(t, f) || envs(t, f)["FOO"] != "bar" {
				t.Errorf("fork %d lacks the source's process or envVars", i)
			}
			if err := o.Kill(ctx, f.ID); err != nil {
				t.Fatal(err)
			}
		}
		if ents, _ := os.ReadDir(filepath.Join(snapDir, forksDir)); len(ents) != 0 {
			t.Errorf("a fork left its snapshot: %v", ents)
		}
	})

	t.Run("pause to disk, restart, resume", func(t *testing.T) {
		if err := o.Pause(ctx, src.ID, PauseOptions{}); err != nil {
			t.Fatal(err)
		}
		list, _ := w.rt.List(ctx)
		for _, s := range list {
			if s.ID == src.ID {
				t.Fatalf("a sandbox paused to disk still runs: %+v", s)
			}
		}
		if _, ok := w.net.Lookup(src.ID); ok {
			t.Fatal("a sandbox paused to disk holds its network devices")
		}
		// A paused sandbox can still be snapshotted and forked.
		if _, err := o.Snapshot(ctx, src.ID, ""); err != nil {
			t.Fatalf("snapshot of a sandbox paused to disk: %v", err)
		}
		if err := o.Close(ctx); err != nil {
			t.Fatal(err)
		}
		w.rt = w.runtime(outer, "100.89.8.0/24")
		o = w.orchestrator(outer, 0)
		sb, err := o.Get(src.ID)
		if err != nil || sb.Info().State != StatePaused {
			t.Fatalf("after a restart: %v", err)
		}
		info, resumed, err := o.Connect(ctx, src.ID, time.Minute)
		if err != nil || !resumed {
			t.Fatalf("connect: %v %v", resumed, err)
		}
		if err := health(t, info); err != nil {
			t.Fatal(err)
		}
		if !hasKeeper(t, info) || envs(t, info)["E2B_SANDBOX_ID"] != src.ID {
			t.Fatal("resumed without its process or identity")
		}
		if _, err := os.Stat(o.pausedPath(src.ID)); err == nil {
			t.Error("the pause is still on disk after the resume")
		}

		// Files only: the processes start afresh; envd knows the sandbox.
		if err := o.Pause(ctx, src.ID, PauseOptions{FilesystemOnly: true}); err != nil {
			t.Fatal(err)
		}
		if _, err := o.Fork(ctx, src.ID, 1, time.Minute); !errors.Is(err, ErrInvalid) {
			t.Errorf("fork of a sandbox paused without memory: %v", err)
		}
		if o.ResumeForTraffic(ctx, src.ID) {
			t.Error("traffic woke a sandbox paused without memory")
		}
		info, err = o.Resume(ctx, src.ID, time.Minute)
		if err != nil {
			t.Fatal(err)
		}

		if hasKeeper(t, info) {
			t.Error("a process survived a pause without memory")
		}
		if e := envs(t, info); e["FOO"] != "bar" || e["E2B_SANDBOX_ID"] != src.ID {
			t.Errorf("envVars after a fresh boot: %v", e)
		}
	})

	if err := o.DeleteSnapshot(ctx, "bob", "mysnap"); !errors.Is(err, ErrTemplateNotFound) {
		t.Errorf("bob deleted alice's snapshot: %v", err)
	}
	if err := o.DeleteSnapshot(ctx, "alice", "mysnap"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(o.snapshotPath(sn.ID)); err == nil {
		t.Error("the deleted snapshot's files are still there")
	}
	if _, err := o.Create(ctx, CreateRequest{Template: "mysnap", Timeout: time.Minute, Owner: "alice"}); !errors.Is(err, ErrTemplateNotFound) {
		t.Errorf("create from a deleted snapshot: %v", err)
	}
	if err := o.Kill(ctx, src.ID); err != nil {
		t.Fatal(err)
	}
	o.Close(ctx)
}
