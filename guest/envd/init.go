package envd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// initStopGrace is how long init waits for the server child to exit after passing
// on a stop (its context ended) before killing it.
const initStopGrace = 10 * time.Second

// RunInit makes the calling process (the sandbox's PID 1) a minimal init. It
// re-executes the running program (/proc/self/exe, same argv[0] and environment)
// with args as a child that serves, then until that child exits it reaps every
// process orphaned to PID 1 and forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1
// and SIGUSR2 to the child. It returns the child's exit status (128+n when signal
// n killed it).
//
// The split exists because PID 1 must reap with wait4(-1), which would steal the
// exit status of processes the server waits for itself; in the child, os/exec owns
// its children's statuses and orphans go to init instead.
//
// When ctx ends, the child gets SIGTERM and, after 10 seconds, SIGKILL.
func RunInit(ctx context.Context, args []string) (int, error) {
	sigs := make(chan os.Signal, 32)
	// Subscribe before the child exists, so that its exit cannot be missed. All
	// but SIGCHLD are passed on to the child.
	signal.Notify(sigs, unix.SIGCHLD, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2)
	defer signal.Stop(sigs)

	argv0 := "envd"
	if len(os.Args) > 0 {
		argv0 = os.Args[0]
	}
	child, err := os.StartProcess("/proc/self/exe", append([]string{argv0}, args...), &os.ProcAttr{
		Env:   os.Environ(),
		Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
	})
	if err != nil {
		return 0, fmt.Errorf("envd init: start server: %w", err)
	}
	pid := child.Pid
	// The child is reaped by wait4 below, not through os.Process.
	_ = child.Release()

	var kill <-chan time.Time
	done := ctx.Done()
	for {
		select {
		case sig := <-sigs:
			if sig == unix.SIGCHLD {
				if status, exited := reap(pid); exited {
					return status, nil
				}
				continue
			}
			if s, ok := sig.(syscall.Signal); ok {
				_ = unix.Kill(pid, s)
			}
		case <-done:
			done = nil
			_ = unix.Kill(pid, unix.SIGTERM)
			kill = time.After(initStopGrace)
		case <-kill:
			_ = unix.Kill(pid, unix.SIGKILL)
		}
	}
}

// reap collects every exited child without blocking. It reports the exit status of
// the server child when that is among them.
func reap(server int) (status int, exited bool) {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return status, exited
		}
		if pid == server {
			status, exited = exitStatus(ws), true
		}
	}
}

// exitStatus converts a wait status to a shell-style exit code.
func exitStatus(ws unix.WaitStatus) int {
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	}
	return 1
}
