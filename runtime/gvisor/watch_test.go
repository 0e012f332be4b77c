package gvisor

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/runtime"
)

// waitBound is how long Wait may take to see a sandbox stop: generous, as
// the host is loaded; the pidfd wakes it at once.
const waitBound = 20 * time.Second

// TestWait stops sandboxes the ways they stop without being asked and
// checks that Wait sees each, with the reason, including for a sandbox a
// restarted server adopted (not its child).
func TestWait(t *testing.T) {
	e := newEnv(t, "100.88.248.0/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)

	if _, err := e.rt.Wait(ctx, "nosuchsandbox"); !errors.Is(err, runtime.ErrNotFound) {
		t.Fatalf("Wait on no sandbox: %v, want ErrNotFound", err)
	}

	for _, tc := range []struct {
		name    string
		restart bool // a new Runtime waits, as after a server restart
		fault   func(t *testing.T, sb runtime.Sandbox)
		reason  string
	}{
		{"sandbox process killed", false, func(t *testing.T, sb runtime.Sandbox) {
			if err := unix.Kill(sentry(t, e.rt, sb.ID), unix.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}, runtime.ExitExited},
		{"adopted sandbox process killed", true, func(t *testing.T, sb runtime.Sandbox) {
			if err := unix.Kill(sentry(t, e.rt, sb.ID), unix.SIGKILL); err != nil {
				t.Fatal(err)
			}
		}, runtime.ExitExited},
		{"first process exits", false, func(t *testing.T, sb runtime.Sandbox) {
			c := &http.Client{Timeout: 5 * time.Second}
			if resp, err := c.Get(url(sb, "/exit")); err == nil {
				resp.Body.Close()
			}
		}, runtime.ExitExited},
		{"first process killed", false, func(t *testing.T, sb runtime.Sandbox) {
			if _, err := e.rt.runscCmd(ctx, "kill", sb.ID, "KILL"); err != nil {
				t.Fatal(err)
			}
		}, runtime.ExitExited},
		{"out of memory", false, func(t *testing.T, sb runtime.Sandbox) {
			// 128 MiB sandbox: the request never gets an answer.
			go func() {
				c := &http.Client{Timeout: waitBound}
				if resp, err := c.Get(url(sb, "/alloc?mb=512")); err == nil {
					resp.Body.Close()
				}
			}()
		}, runtime.ExitOOM},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config(testID("w"), tmpl)
			cfg.MemoryMB = 128
			sb, err := e.create(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer e.kill(ctx, sb.ID)
			waitHealthy(t, sb, 10*time.Second)
			rt := e.rt
			if tc.restart {
				e.pool, e.rt = e.restart()
				rt = e.rt
			}
			type result struct {
				ex  runtime.Exit
				err error
			}
			done := make(chan result, 1)
			go func() {
				ex, err := rt.Wait(ctx, sb.ID)
				done <- result{ex, err}
			}()
			select {
			case r := <-done:
				t.Fatalf("Wait returned before the fault: %+v %v", r.ex, r.err)
			case <-time.After(500 * time.Millisecond):
			}
			tc.fault(t, sb)
			select {
			case r := <-done:
				if r.err != nil || r.ex.ID != sb.ID || r.ex.Reason != tc.reason {
					t.Fatalf("Wait = %+v, %v; want reason %s", r.ex, r.err, tc.reason)
				}
				t.Logf("Wait: %+v", r.ex)
			case <-time.After(waitBound):
				t.Fatal("Wait did not return after the sandbox stopped")
			}
			// A stopped sandbox answers at once.
			if ex, err := rt.Wait(ctx, sb.ID); err != nil || ex.Reason != tc.reason {
				t.Fatalf("second Wait = %+v, %v", ex, err)
			}
			if err := e.kill(ctx, sb.ID); err != nil {
				t.Fatal(err)
			}
		})
	}
	e.checkNoLeaks()
}

// TestWaitPausedAndCancelled: a paused sandbox has not stopped, a cancelled
// Wait returns the context's error, and Kill ends a Wait.
func TestWaitPausedAndCancelled(t *testing.T) {
	e := newEnv(t, "100.88.248.16/28")
	ctx := context.Background()
	sb, err := e.create(ctx, config(testID("p"), makeTemplate(t)))
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, sb, 10*time.Second)
	if err := e.rt.Pause(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if ex, err := e.rt.Wait(short, sb.ID); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait on a paused sandbox = %+v, %v; want it to wait", ex, err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := e.rt.Wait(ctx, sb.ID)
		done <- err
	}()
	time.Sleep(200 * time.Millisecond)
	if err := e.kill(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		// Killed and removed: it stopped, or is not there any more.
		if err != nil && !errors.Is(err, runtime.ErrNotFound) {
			t.Fatalf("Wait after Kill: %v", err)
		}
	case <-time.After(waitBound):
		t.Fatal("Kill did not end Wait")
	}
}

// TestShmSize: /dev/shm is half the sandbox's memory, not the host's, and
// filling it fails a write instead of killing the sandbox.
func TestShmSize(t *testing.T) {
	e := newEnv(t, "100.88.248.32/28")
	ctx := context.Background()
	cfg := config(testID("shm"), makeTemplate(t))
	cfg.MemoryMB = 256
	sb, err := e.create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, sb, 10*time.Second)
	code, body := get(t, sb, "/statfs?path=/dev/shm")
	if size, err := strconv.ParseUint(body, 10, 64); code != 200 || err != nil || size != 128<<20 {
		t.Fatalf("/dev/shm size = %d %q, want %d (half of 256 MiB)", code, body, 128<<20)
	}
	// More than /dev/shm holds but less than the sandbox's memory: the
	// write fails with ENOSPC, the sandbox lives on.
	c := &http.Client{Timeout: waitBound}
	resp, err := c.Get(url(sb, "/dd?path=/dev/shm/fill&mb=200"))
	if err != nil {
		t.Fatalf("filling /dev/shm: %v (the sandbox died?)", err)
	}
	b := make([]byte, 512)
	n, _ := resp.Body.Read(b)
	resp.Body.Close()
	if resp.StatusCode != http.StatusInsufficientStorage || !strings.Contains(string(b[:n]), "no space left") {
		t.Fatalf("writing 200 MiB into /dev/shm: %d %q, want ENOSPC", resp.StatusCode, b[:n])
	}
	waitHealthy(t, sb, 5*time.Second)
	if code, body := get(t, sb, "/remove?path=/dev/shm/fill"); code != 200 {
		t.Fatalf("remove: %d %s", code, body)
	}
	checkState(t, e.rt, sb.ID, runtime.StateRunning)
}

// sentry finds the host PID of sandbox id's sentry (`runsc boot`).
func sentry(t *testing.T, rt *Runtime, id string) int {
	t.Helper()
	pid, err := rt.sandboxPid(context.Background(), id)
	if err != nil || pid == 0 {
		t.Fatalf("sentry of %s: %d %v", id, pid, err)
	}
	return pid
}
