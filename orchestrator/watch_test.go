package orchestrator

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/guest/envd/gen/process"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/store"
)

// deathBound is how long a dead sandbox may take to be found and ended:
// generous, as the host is loaded; the watch is immediate and the envd
// probe takes up to about 20 s.
const deathBound = 40 * time.Second

// TestDeadSandboxesEnd kills sandboxes the ways they die in use and checks
// that each is ended as a kill would (gone from the API, its connections
// cut, everything of it released) with an event saying why.
func TestDeadSandboxesEnd(t *testing.T) {
	w := newWorld(t, "100.89.3.0/24")
	o := w.orchestrator(t, 0)
	defer o.Close(context.Background())

	for _, tc := range []struct {
		name   string
		fault  func(t *testing.T, in Info)
		reason string
	}{
		{"sandbox process killed from outside", func(t *testing.T, in Info) {
			if err := unix.Kill(sentryPID(t, in.ID), unix.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}, runtime.ExitExited},
		{"PID 1 killed inside", func(t *testing.T, in Info) {
			// The call may fail or not: the envd that serves it dies.
			out, err := runFault(in, "root", "kill", "1", strconv.Itoa(int(unix.SIGKILL)))
			t.Logf("kill -9 1 in the sandbox: %q %v", out, err)
		}, runtime.ExitExited},
		{"out of memory", func(t *testing.T, in Info) {
			// 256 MiB sandbox; the allocation never finishes.
			go runFault(in, "user", "alloc", "1024")
		}, runtime.ExitOOM},
		{"envd hangs", func(t *testing.T, in Info) {
			// A wedged sandbox: its processes run (so no watch fires) but
			// nothing answers.
			if err := unix.Kill(sentryPID(t, in.ID), unix.SIGSTOP); err != nil {
				t.Fatal(err)
			}
		}, ReasonUnresponsive},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Hour, APIKeyID: "k1", Owner: "k1"})
			if err != nil {
				t.Fatal(err)
			}
			if err := health(t, in); err != nil {
				t.Fatal(err)
			}
			drain(w.evicted)
			tc.fault(t, in)
			start := time.Now()
			waitForWithin(t, deathBound, "the dead sandbox to be ended", func() bool {
				_, err := o.Get(in.ID)
				return err != nil
			})
			t.Logf("ended %v after the fault", time.Since(start).Round(time.Millisecond))
			for _, sb := range o.All() {
				if sb.Info().ID == in.ID {
					t.Fatal("All still lists the dead sandbox")
				}
			}
			select {
			case id := <-w.evicted:
				if id != in.ID {
					t.Fatalf("evicted %s, want %s", id, in.ID)
				}
			default:
				t.Fatal("the dead sandbox's connections were not cut (no OnEvict)")
			}
			evs, err := w.st.ListEvents(context.Background(), in.ID, 0, 0)
			if err != nil {
				t.Fatal(err)
			}
			if len(evs) != 1 || evs[0].Type != store.EventDied || evs[0].Reason != tc.reason || evs[0].Owner != "k1" || evs[0].TemplateID != "tiny" {
				t.Fatalf("events = %+v, want one %s event with reason %s", evs, store.EventDied, tc.reason)
			}
			if recs, _ := w.st.ListSandboxes(context.Background()); len(recs) != 0 {
				t.Fatalf("records left: %+v", recs)
			}
			w.waitReleased(t, in.ID)
		})
	}
}

// TestDeadPoolSlotsAreNotHandedOut kills every pooled sandbox behind the
// pool's back: the next Create must still answer, at once, with a live
// sandbox.
func TestDeadPoolSlotsAreNotHandedOut(t *testing.T) {
	w := newWorld(t, "100.89.4.0/24")
	o := w.orchestrator(t, 2)
	defer o.Close(context.Background())
	p, err := o.poolFor("tiny")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the pool to fill", func() bool { return len(p.ready) == 2 })
	var dead []string
	for _, sb := range pooled(t, w, o) {
		dead = append(dead, sb)
		if err := unix.Kill(sentryPID(t, sb), unix.SIGKILL); err != nil {
			t.Fatal(err)
		}
	}
	if len(dead) != 2 {
		t.Fatalf("found %d pooled sandboxes, want 2", len(dead))
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), deathBound)
	defer cancel()
	in, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Minute})
	if err != nil {
		t.Fatalf("create after the pool's sandboxes died: %v", err)
	}
	t.Logf("create took %v", time.Since(start).Round(time.Millisecond))
	for _, id := range dead {
		if in.ID == id {
			t.Fatalf("handed out dead sandbox %s", id)
		}
	}
	if err := health(t, in); err != nil {
		t.Fatal(err)
	}
	// The dead slots are released, and are no one's event.
	for _, id := range dead {
		w.waitReleased(t, id)
		if evs, _ := w.st.ListEvents(context.Background(), id, 0, 0); len(evs) != 0 {
			t.Fatalf("events of a pool slot: %+v", evs)
		}
	}
	if err := o.Kill(context.Background(), in.ID); err != nil {
		t.Fatal(err)
	}
}

// TestAdoptedSandboxesAreWatched: a sandbox started by an earlier server
// is not this one's child; its death is seen all the same. One that died
// while no server ran is not adopted, and its death is an event too.
func TestAdoptedSandboxesAreWatched(t *testing.T) {
	w := newWorld(t, "100.89.5.0/24")
	o := w.orchestrator(t, 0)
	in, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	downtime, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := unix.Kill(sentryPID(t, downtime.ID), unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	w.rt = w.runtime(t, "100.89.5.0/24")
	o = w.orchestrator(t, 0)
	defer o.Close(context.Background())
	if _, err := o.Get(in.ID); err != nil {
		t.Fatalf("not adopted: %v", err)
	}
	// runsc may still list it as running: then it is adopted and its
	// watch ends it at once.
	waitForWithin(t, deathBound, "the sandbox that died while the server was down to be ended", func() bool {
		_, err := o.Get(downtime.ID)
		return err != nil
	})
	if evs, _ := w.st.ListEvents(context.Background(), downtime.ID, 0, 0); len(evs) != 1 || evs[0].Type != store.EventDied || evs[0].Reason != runtime.ExitExited {
		t.Fatalf("events of the sandbox that died while the server was down = %+v", evs)
	}
	w.waitReleased(t, downtime.ID)
	if err := unix.Kill(sentryPID(t, in.ID), unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitForWithin(t, deathBound, "the adopted dead sandbox to be ended", func() bool {
		_, err := o.Get(in.ID)
		return err != nil
	})
	evs, _ := w.st.ListEvents(context.Background(), in.ID, 0, 0)
	if len(evs) != 1 || evs[0].Type != store.EventDied {
		t.Fatalf("events = %+v", evs)
	}
	w.waitReleased(t, in.ID)
}

// TestKillAndExpiryEvents: ends asked for are events too.
func TestKillAndExpiryEvents(t *testing.T) {
	w := newWorld(t, "100.89.6.0/24")
	o := w.orchestrator(t, 0)
	defer o.Close(context.Background())
	killed, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	expired, err := o.Create(context.Background(), CreateRequest{Template: "tiny", Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := o.Kill(context.Background(), killed.ID); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "expiry", func() bool { _, err := o.Get(expired.ID); return err != nil })
	for id, want := range map[string]string{killed.ID: store.EventReasonRequest, expired.ID: store.EventReasonTimeout} {
		evs, err := w.st.ListEvents(context.Background(), id, 0, 0)
		if err != nil || len(evs) != 1 || evs[0].Type != store.EventKilled || evs[0].Reason != want {
			t.Errorf("events of %s = %+v, %v; want one killed event, reason %s", id, evs, err, want)
		}
	}
	// Its own kill is not taken for a death when the watch sees the
	// sandbox stop.
	time.Sleep(2 * probeInterval)
	if evs, _ := w.st.ListEvents(context.Background(), "", 0, 0); len(evs) != 2 {
		t.Fatalf("events = %+v, want the two above only", evs)
	}
}

func drain(c chan string) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

func waitForWithin(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(limit); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out after %v waiting for %s", limit, what)
}

// cgroupParent is the runtime's cgroup parent in these tests (world.runtime).
const cgroupParent = "cubicle-orchestrator-test"

// sentryPID finds the host process of sandbox id's sentry (`runsc boot`)
// in its cgroup.
func sentryPID(t *testing.T, id string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/pids", cgroupParent, id, "cgroup.procs"))
	if err != nil {
		b, err = os.ReadFile(filepath.Join("/sys/fs/cgroup", cgroupParent, id, "cgroup.procs"))
	}
	if err != nil {
		t.Fatalf("processes of %s: %v", id, err)
	}
	for _, f := range strings.Fields(string(b)) {
		pid, _ := strconv.Atoi(f)
		cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if bytes.Contains(cmd, []byte("\x00boot\x00")) {
			return pid
		}
	}
	t.Fatalf("no runsc boot process among %s's %q", id, b)
	return 0
}

// pooled lists the runtime sandboxes that are not handed out.
func pooled(t *testing.T, w *world, o *Orchestrator) []string {
	t.Helper()
	list, err := w.rt.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, s := range list {
		if _, err := o.Get(s.ID); err != nil {
			ids = append(ids, s.ID)
		}
	}
	return ids
}

// waitReleased waits until the runtime no longer holds sandbox id and checks
// that nothing of it is left on the host: directory, mounts, loop device,
// cgroups, network attachment.
func (w *world) waitReleased(t *testing.T, id string) {
	t.Helper()
	dir := filepath.Join(w.dataDir, "gvisor", id)
	// Kill removes the directory last; the network goes after Kill.
	waitForWithin(t, deathBound, "the runtime to release "+id, func() bool {
		list, _ := w.rt.List(context.Background())
		for _, s := range list {
			if s.ID == id {
				return false
			}
		}
		_, err := os.Stat(dir)
		_, attached := w.net.Lookup(id)
		return os.IsNotExist(err) && !attached
	})
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), dir) {
		t.Errorf("mounts under %s left", dir)
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range loops {
		if b, _ := os.ReadFile(f); strings.HasPrefix(string(b), dir+"/") {
			t.Errorf("loop device %s on %s left", f, b)
		}
	}
	if left, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cgroupParent, id)); len(left) > 0 {
		t.Errorf("cgroups left: %v", left)
	}
}

// runFault runs /faults with args in the sandbox as user, through envd's
// process API as the SDK does, and returns its output.
func runFault(in Info, user string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	pc := processconnect.NewProcessClient(http.DefaultClient, envdURL(in.Address, ""))
	req := connect.NewRequest(&process.StartRequest{Process: &process.ProcessConfig{Cmd: "/faults", Args: args}})
	req.Header().Set("X-Access-Token", in.EnvdAccessToken)
	req.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":")))
	stream, err := pc.Start(ctx, req)
	if err != nil {
		return "", err
	}
	defer stream.Close()
	var out strings.Builder
	for stream.Receive() {
		ev := stream.Msg().GetEvent()
		if d := ev.GetData(); d != nil {
			out.Write(d.GetStdout())
			out.Write(d.GetStderr())
		}
		if end := ev.GetEnd(); end != nil {
			return out.String(), fmt.Errorf("exit %d", end.GetExitCode())
		}
	}
	return out.String(), stream.Err()
}
