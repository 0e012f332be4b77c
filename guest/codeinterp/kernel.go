package codeinterp

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"os/exec"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// kernel is one context's interpreter.
type kernel interface {
	// run executes code with env added to the environment for its
	// duration, passing each output event to emit in order. It runs one
	// cell at a time: a second call waits for the first. When ctx ends
	// during the cell, run interrupts it and returns only once the kernel
	// is idle again (restarting a kernel that ignores interrupts), so the
	// next cell finds it usable.
	run(ctx context.Context, code string, env map[string]string, emit func(any)) error
	// setBaseEnv records variables every later cell sees (the sandbox's
	// environment from envd, which a kernel started before the sandbox was
	// handed out does not have). They are applied before the next cell.
	setBaseEnv(env map[string]string)
	// restart replaces the interpreter with a fresh one: all state is lost.
	restart(ctx context.Context) error
	// close stops the interpreter and frees what it holds.
	close() error
}

var (
	// ErrKernelDead means the interpreter process has exited.
	ErrKernelDead = errors.New("kernel is not running")
	// ErrKernelStart means an interpreter could not be started or did not
	// answer in time.
	ErrKernelStart = errors.New("kernel did not start")
	// ErrClosed means the context was removed while the call waited.
	ErrClosed = errors.New("context closed")
)

// Timing of interrupts. A cell that has not stopped interruptGrace after
// SIGINT gets another SIGINT every interruptRepeat; one still running after
// interruptLimit is ended by restarting its kernel, state and all, since a
// context that never answers again is worse.
const (
	interruptRepeat = time.Second
	interruptLimit  = 10 * time.Second
)

// cellLock serializes a kernel's cells. Unlike a sync.Mutex a waiter can
// give up when its request ends.
type cellLock chan struct{}

func newCellLock() cellLock { return make(cellLock, 1) }

func (l cellLock) lock(ctx context.Context) error {
	select {
	case l <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (l cellLock) unlock() { <-l }

// timestamp is the time format of stream events' timestamp field.
func timestamp() string { return time.Now().UTC().Format(time.RFC3339Nano) }

// process is what the processes of both kinds of context share. Each runs
// in its own process group, so an interrupt or kill reaches what the cell
// started too, as jupyter_client does it.
type process struct {
	name   string // "bash" or "kernel", for the log
	cmd    *exec.Cmd
	exited chan struct{} // closed once the process has been waited for
	log    *slog.Logger

	// restarting is set before a deliberate kill, so the cell it ends
	// says "restarted" rather than "died".
	restarting atomic.Bool
}

// base gives kernelBase, which knows its processes only by type
// parameter, the part they share.
func (p *process) base() *process { return p }

// interrupt sends SIGINT to the process group. ipykernel raises
// KeyboardInterrupt in the running cell and ignores SIGINT between cells;
// an interactive bash abandons the running command.
func (p *process) interrupt() {
	if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGINT); err != nil && !errors.Is(err, syscall.ESRCH) {
		p.log.Warn("interrupting "+p.name, "err", err)
	}
}

func (p *process) dead() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// stop kills the process group and waits for the process, so that what it
// held can be freed.
func (p *process) stop() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		p.log.Warn(p.name+" did not exit after SIGKILL", "pid", p.cmd.Process.Pid)
	}
}

// proc is a context's process, as kernelBase holds it. The type set is
// closed so that kernelBase may compare processes with nil.
type proc interface {
	*bashProc | *kernelProc
	base() *process
	kill() // stop, then free what the process held
}

// kernelBase is the half of a context that does not depend on its kind: it
// outlives the context's processes (a restart, or a process that died or
// ignored interrupts, swaps in a new one), and it implements setBaseEnv,
// restart and close for both kinds. Its cells lock is held for a whole cell
// and for starting a replacement process; mu only for field access.
type kernelBase[P proc] struct {
	start        func(context.Context) (P, error) // see init
	startTimeout time.Duration
	died         string // a DeadKernelError's value
	onRestart    func() // clears what the kind keeps outside the process; called with mu held
	cells        cellLock

	mu      sync.Mutex        // guards the fields below
	proc    P                 // current process; nil once closed
	closed  bool              // close was called
	baseEnv map[string]string // sandbox environment, see setBaseEnv
	envProc P                 // the process baseEnv was last applied to
}

// init starts the context's first process with start, which also starts
// its replacements; died is what a cell whose process died reports.
func (k *kernelBase[P]) init(ctx context.Context, start func(context.Context) (P, error), startTimeout time.Duration, died string) error {
	p, err := start(ctx)
	if err != nil {
		return err
	}
	k.start, k.startTimeout, k.died = start, startTimeout, died
	k.cells = newCellLock()
	k.proc = p
	return nil
}

func (k *kernelBase[P]) setBaseEnv(env map[string]string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.baseEnv = maps.Clone(env)
	k.envProc = nil
}

// live returns the current process, starting a new one when the last died.
// Called with cells held.
func (k *kernelBase[P]) live(ctx context.Context) (P, error) {
	k.mu.Lock()
	p, closed := k.proc, k.closed
	k.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if p != nil && !p.base().dead() {
		return p, nil
	}
	return k.replace(ctx, p)
}

// lockLive takes the cells lock for a cell and returns the live process.
// Unless it fails, the caller unlocks cells when the cell is done.
func (k *kernelBase[P]) lockLive(ctx context.Context) (P, error) {
	if err := k.cells.lock(ctx); err != nil {
		return nil, err
	}
	p, err := k.live(ctx)
	if err != nil {
		k.cells.unlock()
	}
	return p, err
}

// replace starts a new process in place of old (killed if still running).
// Called with cells held.
func (k *kernelBase[P]) replace(ctx context.Context, old P) (P, error) {
	if old != nil {
		old.kill()
	}
	p, err := k.start(ctx)
	if err != nil {
		return nil, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		p.kill()
		return nil, ErrClosed
	}
	k.proc = p
	return p, nil
}

// replaceAfter replaces p, which died or ignored interrupts, for a cell
// whose client may be gone: the start gets a timeout of its own.
func (k *kernelBase[P]) replaceAfter(p P) error {
	ctx, cancel := context.WithTimeout(context.Background(), k.startTimeout)
	defer cancel()
	_, err := k.replace(ctx, p)
	return err
}

func (k *kernelBase[P]) restart(ctx context.Context) error {
	// Kill first, so that a running cell ends now rather than holding the
	// lock; it reports the restart as its error.
	k.mu.Lock()
	old, closed := k.proc, k.closed
	k.mu.Unlock()
	if closed {
		return ErrClosed
	}
	old.base().restarting.Store(true)
	old.kill()
	if err := k.cells.lock(ctx); err != nil {
		return err
	}
	defer k.cells.unlock()
	k.mu.Lock()
	cur := k.proc
	if k.onRestart != nil {
		k.onRestart()
	}
	k.mu.Unlock()
	if cur != old && cur != nil && !cur.base().dead() {
		return nil // a cell that came in meanwhile already started a fresh one
	}
	_, err := k.replace(ctx, cur)
	return err
}

func (k *kernelBase[P]) close() error {
	k.mu.Lock()
	p := k.proc
	k.closed = true
	k.proc = nil
	k.mu.Unlock()
	if p != nil {
		p.base().restarting.Store(true)
		p.kill()
	}
	return nil
}

// cellWait is what awaitCell needs to know of a running cell that differs
// between the kinds of context.
type cellWait[E any] struct {
	events <-chan E // what the process says about the cell
	// handle passes an event on to the client and reports whether the
	// cell has ended.
	handle func(E) (ended bool)
	// interrupt asks the cell to stop; called again every
	// interruptRepeat until it does.
	interrupt func()
	// stalled, when it fires, ends the cell though its end was not seen
	// (Jupyter: the reply came but the idle status after it was lost).
	// Nil for a kind whose end cannot go missing.
	stalled <-chan time.Time
	log     *slog.Logger
}

// awaitCell waits for the end of the cell that p is running, passing its
// events to c.handle. When ctx ends first, the client has gone: the cell is
// interrupted, the context's state kept, and a cell that ignores interrupts
// for interruptLimit has its process replaced, state and all. When p exits,
// the cell ends with a ContextRestarting or DeadKernelError event and a dead
// p is replaced. Called with k.cells held.
//
// ended reports whether the cell came to its end; err is then ctx's error
// when it was interrupted. When the cell was cut short, err says why the
// replacement failed, if it did.
func awaitCell[P proc, E any](ctx context.Context, k *kernelBase[P], p P, c cellWait[E], emit func(any)) (ended bool, err error) {
	pb := p.base()
	var (
		ctxDone        = ctx.Done()
		repeat, giveUp <-chan time.Time
	)
	interrupted := func() error {
		if ctxDone == nil {
			return ctx.Err()
		}
		return nil
	}
	for {
		select {
		case ev := <-c.events:
			if c.handle(ev) {
				return true, interrupted()
			}
		case <-c.stalled:
			c.log.Warn(pb.name + " never reported the cell's end; ending it")
			return true, interrupted()
		case <-ctxDone:
			ctxDone = nil
			c.log.Info("interrupting a "+pb.name+" cell whose client went away", "why", context.Cause(ctx))
			c.interrupt()
			t := time.NewTicker(interruptRepeat)
			defer t.Stop()
			repeat = t.C
			giveUp = time.After(interruptLimit)
		case <-repeat:
			c.interrupt()
		case <-giveUp:
			c.log.Warn(pb.name+" ignored interrupts; restarting it", "after", interruptLimit)
			pb.restarting.Store(true) // what else waits on p ends quietly
			return false, errors.Join(ctx.Err(), k.replaceAfter(p))
		case <-pb.exited:
			if pb.restarting.Load() {
				emit(errorEvent{Type: typeError, Name: "ContextRestarting", Value: "Context was restarted"})
				return false, nil
			}
			emit(errorEvent{Type: typeError, Name: "DeadKernelError", Value: k.died})
			k.mu.Lock()
			replaced := k.proc != p
			k.mu.Unlock()
			if replaced {
				return false, nil // an earlier request on p already did
			}
			return false, k.replaceAfter(p)
		}
	}
}
