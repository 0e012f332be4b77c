package gvisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/pidfd"
	"github.com/cubicle-dev/cubicle/runtime"
)

// Watching a sandbox: everything of a gVisor sandbox runs in one host
// process, the sentry (`runsc boot`), with its gofer beside it. When the
// sentry ends, the sandbox has ended, whatever the cause:
//
//   - its first process (envd) exits or is killed: the sentry stops the
//     container and exits;
//   - the host's memory cgroup OOM-kills it: the sentry holds all of the
//     sandbox's memory (application memory is one memfd it maps), so it
//     is always the OOM killer's victim;
//   - someone kills it from outside.
//
// The sentry runs in a session of its own and outlives the server, so it is
// not this process's child and cannot be waited for; a pidfd
// (pidfd_open(2)) can, and becomes readable when the process ends. The
// pidfd goes to Go's netpoller, so a thousand watched sandboxes cost a
// thousand parked goroutines, not a thousand threads blocked in poll(2).
// The reason is read afterwards from the memory cgroup's OOM-kill count,
// which lives until Kill removes the cgroup.

// runscState is the part of `runsc state` output used.
type runscState struct {
	Status string `json:"status"`
	// Pid is the sandbox (sentry) process on the host.
	Pid int `json:"pid"`
}

// Wait implements runtime.Runtime.
func (r *Runtime) Wait(ctx context.Context, id string) (runtime.Exit, error) {
	if _, err := r.readRecord(id); err != nil {
		return runtime.Exit{}, err
	}
	pid, err := r.sandboxPid(ctx, id)
	if err != nil {
		return runtime.Exit{}, err
	}
	if pid > 0 {
		if err := waitPid(ctx, pid, r.cgroupPath(id)); err != nil {
			return runtime.Exit{}, err
		}
	}
	return r.exitOf(id), nil
}

// sandboxPid finds the sentry's host PID; 0 when the sandbox no longer
// runs (runsc knows it as stopped, or not at all).
func (r *Runtime) sandboxPid(ctx context.Context, id string) (int, error) {
	out, err := r.runscCmd(ctx, "state", id)
	var re *RunscError
	if errors.As(err, &re) && strings.Contains(re.Output, "does not exist") {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	var st runscState
	if err := json.Unmarshal(out, &st); err != nil {
		return 0, fmt.Errorf("gvisor: parse runsc state of %s: %w", id, err)
	}
	if st.Status != "running" && st.Status != "paused" || st.Pid <= 0 {
		return 0, nil
	}
	return st.Pid, nil
}

// waitPid waits until process pid ends or ctx is done. cgroup is the
// sandbox's cgroup path: the process must be in it, which tells the
// sentry from an unrelated process that reused its PID after it ended.
func waitPid(ctx context.Context, pid int, cgroup string) error {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return nil // gone already
	}
	if err != nil {
		return fmt.Errorf("gvisor: pidfd_open %d: %w", pid, err)
	}
	// With the pidfd held, the PID cannot be reused: if the process is in
	// the sandbox's cgroup now, it is the sentry.
	cg, err := hostCgroups()
	if err != nil {
		unix.Close(fd)
		return err
	}
	pids, err := cg.procs(cgroup)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("gvisor: processes of %s: %w", cgroup, err)
	}
	if !slices.Contains(pids, pid) {
		unix.Close(fd)
		return nil // the sentry ended before pidfd_open
	}
	// A non-blocking descriptor given to os.NewFile is registered with the
	// netpoller, which wakes the reader when the pidfd turns readable.
	f := os.NewFile(uintptr(fd), fmt.Sprintf("pidfd:%d", pid))
	defer f.Close()
	if err := pidfd.Wait(ctx, f); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("gvisor: sentry %d: %w", pid, err)
	}
	return nil
}

// exitOf says why sandbox id stopped: an OOM kill if its memory cgroup
// counted one, else it exited.
func (r *Runtime) exitOf(id string) runtime.Exit {
	ex := runtime.Exit{ID: id, Reason: runtime.ExitExited}
	cg, err := hostCgroups()
	if err != nil {
		ex.Detail = err.Error()
		return ex
	}
	n, err := cg.oomKills(r.cgroupPath(id))
	switch {
	case err != nil:
		ex.Detail = "OOM kills unknown: " + err.Error()
	case n > 0:
		ex.Reason = runtime.ExitOOM
		ex.Detail = fmt.Sprintf("%d OOM kill(s) in its memory cgroup", n)
	}
	return ex
}

// oomKills reads how many processes the kernel OOM-killed in cgroup path:
// "oom_kill" in memory.oom_control (v1, Linux 4.13 and later) or in
// memory.events (v2).
func (l cgroupLayout) oomKills(path string) (uint64, error) {
	dir, err := l.dir("memory", path)
	if err != nil {
		return 0, err
	}
	file := "memory.oom_control"
	if l.v2() {
		file = "memory.events"
	}
	return readKeyed(filepath.Join(dir, file), "oom_kill")
}
