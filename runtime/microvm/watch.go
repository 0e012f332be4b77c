//go:build linux && amd64

package microvm

import (
	"context"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/pidfd"
	"github.com/cubicle-dev/cubicle/runtime"
)

// Watching a sandbox: its whole VM is one host process, the detached
// VMM, which exits when the VM ends (a guest power-off or crash), when
// Kill stops it, or when someone kills it. It is not this process's child
// after a restart of the server, so it is watched through a pidfd, which
// turns readable when the process ends; the pidfd goes to Go's netpoller
// (as in runtime/gvisor's watch.go).

// Wait implements runtime.Runtime.
func (r *Runtime) Wait(ctx context.Context, id string) (runtime.Exit, error) {
	rec, err := r.readRecord(id)
	if err != nil {
		return runtime.Exit{}, err
	}
	if rec.Pid <= 0 {
		return exitOf(rec, id), nil // never started, or a crashed create
	}
	fd, err := unix.PidfdOpen(rec.Pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return exitOf(rec, id), nil
	}
	if err != nil {
		return runtime.Exit{}, fmt.Errorf("microvm: pidfd_open %d: %w", rec.Pid, err)
	}
	// With the pidfd held the pid cannot be reused: if the start time
	// still matches, it is the sandbox's VMM.
	f := os.NewFile(uintptr(fd), fmt.Sprintf("pidfd:%d", rec.Pid))
	defer f.Close()
	if !alive(rec) {
		return exitOf(rec, id), nil
	}
	if err := pidfd.Wait(ctx, f); err != nil {
		if ctx.Err() != nil {
			return runtime.Exit{}, ctx.Err()
		}
		return runtime.Exit{}, fmt.Errorf("microvm: VMM %d: %w", rec.Pid, err)
	}
	return exitOf(rec, id), nil
}

// exitOf says why sandbox id's VMM ended: an OOM kill if its jail's
// memory cgroup counted one (the VMM is the only process there, so the
// kill was its), exited otherwise. The cgroup outlives the process until
// Kill removes it.
func exitOf(rec record, id string) runtime.Exit {
	ex := runtime.Exit{ID: id, Reason: runtime.ExitExited, Detail: "the VMM process ended"}
	if rec.Jail == nil || rec.Jail.Memory == "" {
		return ex
	}
	n, err := rec.Jail.OOMKills()
	switch {
	case err != nil:
		ex.Detail += "; OOM kills unknown: " + err.Error()
	case n > 0:
		ex.Reason = runtime.ExitOOM
		ex.Detail = fmt.Sprintf("the VMM process was OOM-killed: %d OOM kill(s) in its memory cgroup (limit: the sandbox's memory plus the VMM's)", n)
	}
	return ex
}
