//go:build linux && amd64

package control

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/jailer"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
)

// StopTimeout is how long Close waits for a stopped VMM to exit before it
// kills it.
const StopTimeout = 5 * time.Second

// ControlFD is the descriptor on which a spawned VMM process finds its
// control socket (the first of exec.Cmd.ExtraFiles).
const ControlFD = 3

// SpawnConfig describes a VMM process to start.
type SpawnConfig struct {
	// Path is the binary; empty means this executable (cubicle).
	Path string
	// Args come before "--control-fd=3"; for cubicle, {"vmm"}.
	Args []string
	// Env is the environment; nil inherits this process's.
	Env []string
	// Jail confines the process; nil runs it unconfined.
	Jail *jailer.Config
	// Stdout (the guest's console unless a request names a file) and
	// Stderr (the VMM's log); nil discards.
	Stdout, Stderr io.Writer
	// Detach starts the process in a session of its own and without a
	// parent-death signal (jailed or not), so that once a listen request
	// detached it (Client.Listen) it outlives this process. Until then it
	// still ends when this process does: its control connection closes.
	// A jailed detached process is found again, killed and cleaned up
	// through its jail's Handle (Process.Jail).
	Detach bool
}

// Process is a running VMM process and the client connected to it.
type Process struct {
	*Client
	cmd  *exec.Cmd
	jail *jailer.Jail
	done chan struct{}
	err  error // Wait's result, valid once done is closed
}

// Spawn starts a VMM process with a connected control socket.
func Spawn(cfg SpawnConfig) (_ *Process, err error) {
	path := cfg.Path
	if path == "" {
		if path, err = os.Executable(); err != nil {
			return nil, fmt.Errorf("control: %w", err)
		}
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("control: socketpair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "control"), os.NewFile(uintptr(fds[1]), "control")
	defer theirs.Close()
	fc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	conn := fc.(*net.UnixConn)
	defer func() {
		if err != nil {
			conn.Close()
		}
	}()
	cmd := exec.Command(path, append(append([]string(nil), cfg.Args...), fmt.Sprintf("--control-fd=%d", ControlFD))...)
	cmd.Env = slices.Clip(cfg.Env)
	cmd.Stdout, cmd.Stderr = cfg.Stdout, cfg.Stderr
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if cfg.Detach {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	var j *jailer.Jail
	if cfg.Jail != nil {
		jc := *cfg.Jail
		// A detached VMM's lifetime is its VM's, not this process's.
		jc.Detach = cfg.Detach
		if j, err = jc.Apply(cmd); err != nil {
			return nil, err
		}
	}
	if err := cmd.Start(); err != nil {
		if j != nil {
			j.Abort()
		}
		return nil, fmt.Errorf("control: start VMM: %w", err)
	}
	p := &Process{Client: NewClient(conn), cmd: cmd, jail: j, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	if j != nil {
		if err := j.Started(cmd.Process.Pid); err != nil {
			p.Kill()
			return nil, err
		}
	}
	return p, nil
}

// SetNice sets the scheduling niceness of every thread of the process
// (Linux keeps niceness per thread; threads started later inherit it from
// their creator). The pool warms processes up at IdleNice so that refills
// yield the CPU to restores, and hands them out at 0.
func (p *Process) SetNice(nice int) error {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", p.Pid()))
	if err != nil {
		return fmt.Errorf("control: %w", err)
	}
	var errs []error
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := unix.Setpriority(unix.PRIO_PROCESS, tid, nice); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("control: setpriority %d: %w", tid, err))
		}
	}
	return errors.Join(errs...)
}

// Pid returns the process id (in this process's PID namespace).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Jail returns the process's jail, nil if it is not jailed.
func (p *Process) Jail() *jailer.Jail { return p.jail }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Wait waits for the process to exit and returns how it ended.
func (p *Process) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return p.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Kill kills the process (and everything in its jail), waits for it and
// removes the jail's cgroups.
func (p *Process) Kill() error {
	if p.jail != nil {
		_ = p.jail.Kill()
	}
	_ = p.cmd.Process.Kill()
	<-p.done
	p.Client.Close()
	if p.jail != nil {
		return p.jail.Cleanup()
	}
	return nil
}

// Close asks the VMM to stop, waits up to StopTimeout for it to exit and
// kills it otherwise.
func (p *Process) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), StopTimeout)
	defer cancel()
	t0 := time.Now()
	stopErr := p.Stop(ctx)
	if err := p.Wait(ctx); err != nil {
		stopErr = errors.Join(stopErr, fmt.Errorf("control: VMM did not exit %v after stop: %w", time.Since(t0), err))
	}
	return errors.Join(stopErr, p.Kill())
}

// MainConfig configures Main.
type MainConfig struct {
	// ControlFD, if positive, is a connected control socket; otherwise
	// SocketPath is listened on.
	ControlFD  int
	SocketPath string
	Logger     *slog.Logger
	// Console is the default guest console; nil means standard output.
	Console io.Writer
}

// Main is the VMM process: it opens /dev/kvm, enters its jail when the
// parent set one up (jailer.EnvVar), and serves the control socket until a
// stop request, the peer's hang-up or ctx's end.
func Main(ctx context.Context, cfg MainConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	console := cfg.Console
	if console == nil {
		console = os.Stdout
	}
	// Before the jail: afterwards /sys (for PVM detection) is out of
	// sight. The descriptor stays valid inside.
	sys, err := kvm.Open()
	if err != nil {
		return err
	}
	defer sys.Close()
	sys.PVM()
	if _, err := jailer.EnterFromEnv(); err != nil {
		return err
	}
	s := NewServer(ServerConfig{KVM: sys, Console: console, Logger: log})
	defer s.Close()
	if cfg.ControlFD > 0 {
		f := os.NewFile(uintptr(cfg.ControlFD), "control")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			return fmt.Errorf("control: fd %d: %w", cfg.ControlFD, err)
		}
		uc, ok := c.(*net.UnixConn)
		if !ok {
			c.Close()
			return fmt.Errorf("control: fd %d is not a Unix socket", cfg.ControlFD)
		}
		defer uc.Close()
		if err := s.ServeConn(ctx, uc); err != nil || !s.Detached() {
			return err
		}
		// Detached: the VM lives on until stopped or ended.
		select {
		case <-s.Finished():
		case <-ctx.Done():
		}
		return nil
	}
	if cfg.SocketPath == "" {
		return fmt.Errorf("%w: a control socket path or descriptor is needed", ErrBadRequest)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.SocketPath, Net: "unix"})
	if err != nil {
		return fmt.Errorf("control: %w", err)
	}
	defer ln.Close()
	return s.Serve(ctx, ln)
}
