package guestinit

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// asSubreaper makes the test process the reaper of its orphaned
// descendants, as PID 1 is of every orphan, for the test's duration.
func asSubreaper(t *testing.T) {
	t.Helper()
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Skipf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	t.Cleanup(func() { unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) })
}

// zombies lists this process's children that are zombies.
func zombies(t *testing.T) []int {
	t.Helper()
	self := os.Getpid()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var z []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold anything, so split after the last ')'.
		rest := string(b[bytes.LastIndexByte(b, ')')+1:])
		f := strings.Fields(rest)
		if len(f) >= 2 && f[0] == "Z" && f[1] == strconv.Itoa(self) {
			z = append(z, pid)
		}
	}
	return z
}

func sh(script string) Command {
	return Command{Path: "/bin/sh", Args: []string{"sh", "-c", script}, Env: []string{"PATH=/usr/bin:/bin"}, Dir: "/"}
}

// TestReaperReapsOrphans: processes orphaned to init (here, to the test
// process made a subreaper) are reaped, none is left a zombie, and the
// exit of a process Start ran reaches its waiter with its status.
func TestReaperReapsOrphans(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	asSubreaper(t)
	r := NewReaper()
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { r.Run(ctx); close(stopped) }()
	defer func() { cancel(); <-stopped }()

	// The shell starts five background sleeps and exits with 7: the
	// sleeps are orphaned to us and exit later.
	pid, done, err := r.Start(sh("for i in 1 2 3 4 5; do sleep 0.2 & done; exit 7"))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case ws := <-done:
		if !ws.Exited() || ws.ExitStatus() != 7 {
			t.Fatalf("pid %d: status %v, want exit 7", pid, ws)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the shell's exit never reached its waiter")
	}
	deadline := time.Now().Add(30 * time.Second)
	for r.Reaped() < 6 || len(zombies(t)) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("reaped %d of 6, zombies left: %v", r.Reaped(), zombies(t))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestReaperImmediateExit: a process that exits before Start returns still
// reaches its waiter (the reaper cannot take it before it is registered).
func TestReaperImmediateExit(t *testing.T) {
	r := NewReaper()
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { r.Run(ctx); close(stopped) }()
	defer func() { cancel(); <-stopped }()
	for i := range 20 {
		_, done, err := r.Start(Command{Path: "/bin/true", Args: []string{"true"}})
		if err != nil {
			t.Skipf("no /bin/true: %v", err)
		}
		select {
		case ws := <-done:
			if ws.ExitStatus() != 0 {
				t.Fatalf("run %d: %v", i, ws)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("run %d: exit lost", i)
		}
	}
}

// TestSupervise: a process that keeps dying is started again, with the
// backoff between starts, and each exit is logged; ending the context
// stops the restarts.
func TestSupervise(t *testing.T) {
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no /bin/sh")
	}
	r := NewReaper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go r.Run(ctx)
	runs := filepath.Join(t.TempDir(), "runs")
	var log syncBuffer
	pids := make(chan int, 100)
	supCtx, stopSup := context.WithCancel(ctx)
	supDone := make(chan struct{})
	go func() {
		r.Supervise(supCtx, sh("echo run >> "+runs+"; exit 3"), Backoff{Min: 10 * time.Millisecond, Max: 40 * time.Millisecond, Healthy: time.Hour}, &log, func(pid int) { pids <- pid })
		close(supDone)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, _ := os.ReadFile(runs)
		if strings.Count(string(b), "run") >= 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("restarted %d times in 30 s; log:\n%s", strings.Count(string(b), "run"), log.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	stopSup()
	select {
	case <-supDone:
	case <-time.After(30 * time.Second):
		t.Fatal("Supervise did not return when its context ended")
	}
	if got := log.String(); !strings.Contains(got, "exited with status 3; restarting in 10ms") || !strings.Contains(got, "restarting in 40ms") {
		t.Fatalf("log does not show the exits and the backoff:\n%s", got)
	}
	if len(pids) < 4 {
		t.Fatalf("started reported %d times", len(pids))
	}
}

// TestSuperviseStartFailure: a binary that cannot be started is retried
// and the failure logged, never a crash.
func TestSuperviseStartFailure(t *testing.T) {
	r := NewReaper()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	var log syncBuffer
	r.Supervise(ctx, Command{Path: "/nonexistent/envd", Args: []string{"envd"}}, Backoff{Min: 10 * time.Millisecond, Max: 20 * time.Millisecond, Healthy: time.Hour}, &log, nil)
	if got := log.String(); strings.Count(got, "start /nonexistent/envd") < 2 {
		t.Fatalf("log:\n%s", got)
	}
}
