package processes

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/process"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/identity"
)

const (
	// Read sizes for process output: one read becomes one data event. PTY output is
	// interactive, so smaller chunks keep latency low.
	pipeChunkSize = 32 << 10
	ptyChunkSize  = 16 << 10

	// exitGrace is how long output readers keep waiting for end-of-file after the
	// process has exited. Normally EOF is immediate; it never comes when a background
	// child still holds the pipe (`sleep 100 &`), and for a PTY the kernel may still
	// be moving the last bytes from the slave to the master side.
	exitGrace = 200 * time.Millisecond

	// maxDrain bounds what is read after exitGrace without waiting, so an orphan
	// that keeps writing cannot hold the end event back forever.
	maxDrain = 1 << 20
)

var (
	errStdinClosed = errors.New("stdin is not enabled or already closed")
	errNoPTY       = errors.New("process has no PTY")
	errHasPTY      = errors.New("process has a PTY: send input as pty input")
	errExited      = errors.New("process has already exited")
)

// spec is everything needed to start a process, already validated and resolved.
type spec struct {
	config *pb.ProcessConfig // as the client sent it, reported back by List
	tag    *string
	path   string   // resolved executable
	argv   []string // argv[0] is the command as given
	env    []string
	dir    string
	user   *identity.User
	setUID bool // switch to user's credentials (envd runs as root)
	pty    *pb.PTY
	stdin  bool
}

// proc is one process started by envd.
type proc struct {
	pid    uint32
	config *pb.ProcessConfig
	tag    *string
	cmd    *exec.Cmd
	out    *fanout
	ptmx   *os.File // PTY master, nil without a PTY; closed by run
	// readers are the output sources, the PTY master or stdout then stderr; run
	// closes them once the process has exited and they are drained.
	readers []*os.File
	exited  chan struct{} // closed once the process has been reaped

	stdinMu sync.Mutex // guards stdin
	stdin   *os.File   // write end of the stdin pipe; nil when disabled or closed

	// ptyMu serializes input to ptmx: each write sets the file's write deadline
	// from its own request, which must not cut off another request's write.
	ptyMu sync.Mutex

	timer *time.Timer // kills the process at the Start stream's deadline; may be nil
}

// startProc starts the process described by sp. Output goes to p.out; the caller
// should subscribe before calling run so that no output is missed.
func startProc(sp *spec) (p *proc, err error) {
	p = &proc{config: sp.config, tag: sp.tag, out: newFanout(), exited: make(chan struct{})}
	cmd := &exec.Cmd{
		Path:        sp.path,
		Args:        sp.argv,
		Env:         sp.env,
		Dir:         sp.dir,
		SysProcAttr: &syscall.SysProcAttr{},
	}
	if sp.setUID {
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: sp.user.UID, Gid: sp.user.GID, Groups: sp.user.Groups}
	}

	// childEnds are the descriptors only the child needs; the parent closes its copies
	// after start so that end-of-file arrives when the child side is done.
	var childEnds, parentEnds []*os.File
	defer func() {
		for _, f := range childEnds {
			f.Close()
		}
		if err != nil {
			for _, f := range parentEnds {
				f.Close()
			}
		}
	}()

	var readers []*os.File
	if sp.pty != nil {
		master, slave, err := openPTY(sp.pty.GetSize())
		if err != nil {
			return nil, fmt.Errorf("open pty: %w", err)
		}
		parentEnds = append(parentEnds, master)
		childEnds = append(childEnds, slave)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		// A new session with the PTY as controlling terminal, as a login shell
		// expects; the session leader also leads a new process group.
		cmd.SysProcAttr.Setsid = true
		cmd.SysProcAttr.Setctty = true
		cmd.SysProcAttr.Ctty = 0
		p.ptmx = master
		readers = append(readers, master)
	} else {
		outR, outW, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		parentEnds, childEnds = append(parentEnds, outR), append(childEnds, outW)
		errR, errW, err := os.Pipe()
		if err != nil {
			return nil, err
		}
		parentEnds, childEnds = append(parentEnds, errR), append(childEnds, errW)
		cmd.Stdout, cmd.Stderr = outW, errW
		readers = append(readers, outR, errR)
		if sp.stdin {
			inR, inW, err := os.Pipe()
			if err != nil {
				return nil, err
			}
			parentEnds, childEnds = append(parentEnds, inW), append(childEnds, inR)
			cmd.Stdin = inR
			p.stdin = inW
		}
		// cmd.Stdin left nil when stdin is disabled: os/exec opens /dev/null.

		// Its own process group, so that a kill reaches everything it spawned.
		cmd.SysProcAttr.Setpgid = true
	}

	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p.cmd = cmd
	p.pid = uint32(cmd.Process.Pid)
	p.readers = readers
	return p, nil
}

// run pumps output to subscribers, waits for the process and publishes its end.
// onDone runs once the end has been published.
func (p *proc) run(onDone func()) {
	var wg sync.WaitGroup
	for i, r := range p.readers {
		wrap := stdoutEvent
		chunk := pipeChunkSize
		switch {
		case p.ptmx != nil:
			wrap, chunk = ptyEvent, ptyChunkSize
		case i == 1:
			wrap = stderrEvent
		}
		wg.Go(func() { p.pump(r, chunk, wrap) })
	}
	go func() {
		waitErr := p.cmd.Wait()
		close(p.exited)
		if p.timer != nil {
			p.timer.Stop()
		}
		deadline := time.Now().Add(exitGrace)
		for _, r := range p.readers {
			_ = r.SetReadDeadline(deadline)
		}
		wg.Wait()
		for _, r := range p.readers {
			r.Close()
		}
		p.closeStdin()
		p.out.finish(endEvent(p.cmd.ProcessState, waitErr))
		onDone()
	}()
}

// pump reads one output stream until end-of-file (or the exit grace runs out) and
// publishes each read as a data event. publish blocks while subscribers are behind,
// and then so does the process's write: that is the backpressure.
func (p *proc) pump(r *os.File, chunk int, wrap func([]byte) *pb.ProcessEvent) {
	buf := make([]byte, chunk)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			p.out.publish(wrap(clone(buf[:n])))
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				p.drain(r, buf, wrap)
			}
			// io.EOF for a pipe, EIO for a PTY whose slave side is fully closed.
			return
		}
	}
}

// drain publishes what is buffered in r right now without waiting for more: the
// process has exited and whoever still holds the write side is not its output.
func (p *proc) drain(r *os.File, buf []byte, wrap func([]byte) *pb.ProcessEvent) {
	if err := r.SetReadDeadline(time.Time{}); err != nil {
		return
	}
	rc, err := r.SyscallConn()
	if err != nil {
		return
	}
	for total := 0; total < maxDrain; {
		var n int
		var rerr error
		// Returning true makes RawConn.Read do one non-blocking attempt instead of
		// waiting for readability.
		if err := rc.Read(func(fd uintptr) bool {
			for {
				n, rerr = unix.Read(int(fd), buf)
				if rerr != unix.EINTR {
					return true
				}
			}
		}); err != nil || rerr != nil || n <= 0 {
			return
		}
		p.out.publish(wrap(clone(buf[:n])))
		total += n
	}
}

// signal delivers sig. SIGKILL goes to the whole process group, so that nothing the
// process spawned outlives it; other signals go to the process itself, which may
// handle them and clean up its children.
func (p *proc) signal(sig unix.Signal) error {
	pid := int(p.pid)
	if sig == unix.SIGKILL {
		err := unix.Kill(-pid, sig)
		if errors.Is(err, unix.ESRCH) {
			select {
			case <-p.exited:
				return nil // the group is already gone: nothing left to kill
			default:
				err = unix.Kill(pid, sig)
			}
		}
		return err
	}
	select {
	case <-p.exited:
		return errExited
	default:
	}
	return unix.Kill(pid, sig)
}

// writeStdin writes data to the process's stdin, giving up when ctx ends.
func (p *proc) writeStdin(ctx context.Context, data []byte) error {
	if p.ptmx != nil {
		return errHasPTY
	}
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin == nil {
		return errStdinClosed
	}
	return writeCtx(ctx, p.stdin, data)
}

// writePTY writes data to the PTY master, as if typed at the terminal.
func (p *proc) writePTY(ctx context.Context, data []byte) error {
	if p.ptmx == nil {
		return errNoPTY
	}
	select {
	case <-p.exited:
		return errExited
	default:
	}
	p.ptyMu.Lock()
	defer p.ptyMu.Unlock()
	return writeCtx(ctx, p.ptmx, data)
}

// closeStdin closes the stdin pipe so the process reads end-of-file. Closing twice
// is not an error: the SDK may close after the process already did.
func (p *proc) closeStdin() error {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin == nil {
		return nil
	}
	err := p.stdin.Close()
	p.stdin = nil
	return err
}

// resize sets the PTY window size.
func (p *proc) resize(size *pb.PTY_Size) error {
	if p.ptmx == nil {
		return errNoPTY
	}
	select {
	case <-p.exited:
		return errExited
	default:
	}
	return setWinsize(p.ptmx, size)
}

// writeCtx writes to a pollable file, interrupting the write when ctx ends (the file
// is a pipe or PTY whose reader may never read).
func writeCtx(ctx context.Context, f *os.File, data []byte) error {
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		_ = f.SetWriteDeadline(time.Now())
		close(fired)
	})
	defer func() {
		if !stop() {
			// The deadline was set (or is being set): wait for it, then clear
			// it so the next writer is not cut off.
			<-fired
			_ = f.SetWriteDeadline(time.Time{})
		}
	}()
	if len(data) == 0 {
		return nil
	}
	_, err := f.Write(data)
	if errors.Is(err, os.ErrDeadlineExceeded) && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// openPTY opens a PTY pair sized to size. The master comes back pollable, so reads
// honour deadlines; creack/pty leaves it in blocking mode.
func openPTY(size *pb.PTY_Size) (master, slave *os.File, err error) {
	m, s, err := pty.Open()
	if err != nil {
		return nil, nil, err
	}
	defer m.Close()
	fd, err := unix.FcntlInt(m.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		s.Close()
		return nil, nil, err
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		s.Close()
		return nil, nil, err
	}
	master = os.NewFile(uintptr(fd), "/dev/ptmx")
	if size != nil {
		if err := setWinsize(master, size); err != nil {
			master.Close()
			s.Close()
			return nil, nil, err
		}
	}
	return master, s, nil
}

// setWinsize issues TIOCSWINSZ through the runtime poller's descriptor (pty.Setsize
// would call Fd(), which puts the file back into blocking mode).
func setWinsize(f *os.File, size *pb.PTY_Size) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	ws := &unix.Winsize{Row: uint16(size.GetRows()), Col: uint16(size.GetCols())}
	var ioctlErr error
	if err := rc.Control(func(fd uintptr) { ioctlErr = unix.IoctlSetWinsize(int(fd), unix.TIOCSWINSZ, ws) }); err != nil {
		return err
	}
	return ioctlErr
}

// lookPath finds an executable the way a shell would, using the PATH the process
// itself will get (the request may override it) rather than envd's own.
func lookPath(name, pathEnv, dir string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	if name == "" {
		return "", exec.ErrNotFound
	}
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		cand := filepath.Join(d, name)
		if !filepath.IsAbs(cand) {
			cand = filepath.Join(dir, cand)
		}
		fi, err := os.Stat(cand)
		if err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return cand, nil
		}
	}
	return "", &exec.Error{Name: name, Err: exec.ErrNotFound}
}

// isUserError reports whether a start failure is the caller's fault (no such
// executable, not executable) rather than envd's.
func isUserError(err error) bool {
	return errors.Is(err, exec.ErrNotFound) || errors.Is(err, fs.ErrNotExist) ||
		errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.ENOEXEC) || errors.Is(err, unix.ENOTDIR)
}

func endEvent(st *os.ProcessState, waitErr error) *pb.ProcessEvent_EndEvent {
	end := &pb.ProcessEvent_EndEvent{ExitCode: -1}
	if st != nil {
		end.ExitCode = int32(st.ExitCode())
		end.Exited = st.Exited()
		end.Status = st.String()
	}
	if waitErr != nil {
		msg := waitErr.Error()
		end.Error = &msg
	}
	return end
}

func clone(b []byte) []byte { return append([]byte(nil), b...) }

func stdoutEvent(b []byte) *pb.ProcessEvent {
	return dataEvent(&pb.ProcessEvent_DataEvent{Output: &pb.ProcessEvent_DataEvent_Stdout{Stdout: b}})
}

func stderrEvent(b []byte) *pb.ProcessEvent {
	return dataEvent(&pb.ProcessEvent_DataEvent{Output: &pb.ProcessEvent_DataEvent_Stderr{Stderr: b}})
}

func ptyEvent(b []byte) *pb.ProcessEvent {
	return dataEvent(&pb.ProcessEvent_DataEvent{Output: &pb.ProcessEvent_DataEvent_Pty{Pty: b}})
}

func dataEvent(d *pb.ProcessEvent_DataEvent) *pb.ProcessEvent {
	return &pb.ProcessEvent{Event: &pb.ProcessEvent_Data{Data: d}}
}
