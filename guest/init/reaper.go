package guestinit

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Reaper is PID 1's wait loop: it reaps every child that exits, orphans
// included, and hands the exits of the processes it started (Start) to
// whoever waits for them. It must be the only caller of wait in the
// process: os/exec's Wait would race it for the children.
type Reaper struct {
	mu      sync.Mutex
	waiting map[int]chan unix.WaitStatus
	// Reaped counts every child reaped, for tests and the console.
	reaped int
}

// NewReaper returns a Reaper; Run makes it reap.
func NewReaper() *Reaper {
	return &Reaper{waiting: map[int]chan unix.WaitStatus{}}
}

// Run reaps children until ctx ends. It reaps on every SIGCHLD and, since
// signals coalesce and one may arrive before Notify, once a second too.
func (r *Reaper) Run(ctx context.Context) {
	sig := make(chan os.Signal, 8)
	signal.Notify(sig, syscall.SIGCHLD)
	defer signal.Stop(sig)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		r.reap()
		select {
		case <-ctx.Done():
			return
		case <-sig:
		case <-tick.C:
		}
	}
}

// reap collects every child that has exited.
func (r *Reaper) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		r.mu.Lock()
		r.reaped++
		ch := r.waiting[pid]
		delete(r.waiting, pid)
		r.mu.Unlock()
		if ch != nil {
			ch <- ws
		}
	}
}

// Reaped returns how many children have been reaped.
func (r *Reaper) Reaped() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reaped
}

// Command is a process Start runs.
type Command struct {
	Path string
	Args []string // argv, Args[0] included
	Env  []string
	Dir  string
	// Stdout and Stderr receive the process's output; nil is /dev/null.
	Stdout, Stderr *os.File
}

// Start starts c and returns its PID and a channel that gets its wait
// status once the Reaper has reaped it. The process gets a session of its
// own, so a signal to init's process group never reaches it by accident.
func (r *Reaper) Start(c Command) (int, <-chan unix.WaitStatus, error) {
	null, err := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	if err != nil {
		return 0, nil, err
	}
	defer null.Close()
	out, errOut := c.Stdout, c.Stderr
	if out == nil {
		out = null
	}
	if errOut == nil {
		errOut = null
	}
	ch := make(chan unix.WaitStatus, 1)
	// The lock is held across the fork: a child that exits at once is
	// reaped only after its channel is registered.
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := syscall.ForkExec(c.Path, c.Args, &syscall.ProcAttr{
		Dir:   c.Dir,
		Env:   c.Env,
		Files: []uintptr{null.Fd(), out.Fd(), errOut.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true},
	})
	if err != nil {
		return 0, nil, fmt.Errorf("start %s: %w", c.Path, err)
	}
	r.waiting[pid] = ch
	return pid, ch, nil
}

// Backoff of Supervise: the first restart waits minRestart, each next one
// twice as long up to maxRestart; a process that ran healthyRun resets it.
type Backoff struct {
	Min, Max, Healthy time.Duration
}

// DefaultBackoff is envd's, as the package doc says.
var DefaultBackoff = Backoff{Min: 100 * time.Millisecond, Max: 10 * time.Second, Healthy: 30 * time.Second}

// Supervise runs c until ctx ends, starting it again whenever it exits,
// after a delay that b bounds; log gets a line for each start failure and
// exit. When ctx ends the process is left running (power-off kills it
// with everything else). started, when not nil, gets each new PID.
func (r *Reaper) Supervise(ctx context.Context, c Command, b Backoff, log io.Writer, started func(pid int)) {
	delay := b.Min
	for {
		begin := time.Now()
		pid, done, err := r.Start(c)
		if err != nil {
			fmt.Fprintf(log, "cubicle-init: %v; retrying in %v\n", err, delay)
		} else {
			if started != nil {
				started(pid)
			}
			select {
			case ws := <-done:
				fmt.Fprintf(log, "cubicle-init: %s (pid %d) %s; restarting in %v\n", c.Path, pid, describeExit(ws), delay)
			case <-ctx.Done():
				return
			}
		}
		if time.Since(begin) >= b.Healthy {
			delay = b.Min
		}
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return
		}
		delay = min(delay*2, b.Max)
	}
}

func describeExit(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "killed by " + ws.Signal().String()
	}
	return fmt.Sprintf("exited with status %d", ws.ExitStatus())
}
