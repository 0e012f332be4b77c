package pidfd

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func open(t *testing.T, pid int) *os.File {
	t.Helper()
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		t.Skipf("pidfd_open: %v", err)
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	t.Cleanup(func() { f.Close() })
	return f
}

// TestWait: Wait returns when the process ends, and with ctx's error
// while it runs on.
func TestWait(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	f := open(t, cmd.Process.Pid)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := Wait(ctx, f); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait on a running process: %v, want the deadline", err)
	}

	done := make(chan error, 1)
	go func() { done <- Wait(context.Background(), f) }()
	cmd.Process.Kill()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Wait after the process ended: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Wait did not return after the process was killed")
	}
	cmd.Wait()
}
