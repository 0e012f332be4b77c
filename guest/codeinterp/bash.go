package codeinterp

// Bash contexts: one interactive bash per context, fed through a pipe.
//
// Debian packages no Jupyter bash kernel, and a persistent bash already keeps
// what a context promises (variables, functions, cwd). It runs interactive
// (-i, no line editing, no job control) for one reason: on SIGINT an
// interactive bash abandons the whole command it is running, loops included,
// and goes back to reading input with its state intact, where a
// non-interactive one would exit.
//
// A cell is one line on bash's stdin that says "start" on fd 3 (a copy of
// it: see bashInit), applies the
// cell's env_vars, reads the cell's code from a file and evals it at top
// level (so declare and friends act as in a script). bash runs PROMPT_COMMAND
// before reading the next line, also after an interrupt; ours restores the
// environment and prints a random marker on stdout and on stderr and
// "end <status>" on fd 3. A cell has ended when all three are seen: the
// markers on the output pipes are what tell that every byte of its output
// has been read, which fd 3 alone could not.
//
// Lock order: bashKernel.cells, then bashKernel.mu, then bashProc.mu.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// bashOptions configures a bash context.
type bashOptions struct {
	bash         string
	cwd          string
	env          []string
	startTimeout time.Duration
	log          *slog.Logger
}

// bashKernel is a bash context; like jupyterKernel it outlives its processes.
type bashKernel struct {
	opts  bashOptions
	cells cellLock

	mu      sync.Mutex // guards the fields below
	proc    *bashProc
	closed  bool
	baseEnv map[string]string
	envProc *bashProc
	count   int // cells run, reported as number_of_executions
}

func newBashKernel(ctx context.Context, opts bashOptions) (*bashKernel, error) {
	p, err := startBashProc(ctx, opts)
	if err != nil {
		return nil, err
	}
	return &bashKernel{opts: opts, cells: newCellLock(), proc: p}, nil
}

// shellName is what bash accepts as a variable name.
var shellName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

func (k *bashKernel) setBaseEnv(env map[string]string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.baseEnv = maps.Clone(env)
	k.envProc = nil
}

func (k *bashKernel) run(ctx context.Context, code string, env map[string]string, emit func(any)) error {
	if err := k.cells.lock(ctx); err != nil {
		return err
	}
	defer k.cells.unlock()
	p, err := k.live(ctx)
	if err != nil {
		return err
	}
	for name := range env {
		if !shellName.MatchString(name) {
			emit(errorEvent{Type: typeError, Name: "InvalidEnvVar", Value: fmt.Sprintf("%q is not a valid bash variable name", name)})
			return nil
		}
	}
	var line strings.Builder
	line.WriteString("printf 'start\\n' >&$__cubicle_ctl; ")
	k.mu.Lock()
	if k.envProc != p {
		for _, name := range slices.Sorted(maps.Keys(k.baseEnv)) {
			if shellName.MatchString(name) {
				fmt.Fprintf(&line, "export %s=%s; ", name, shellQuote(k.baseEnv[name]))
			}
		}
		k.envProc = p
	}
	k.count++
	count := k.count
	k.mu.Unlock()
	for _, name := range slices.Sorted(maps.Keys(env)) {
		fmt.Fprintf(&line, `if [[ -v %[1]s ]]; then __cubicle_restore+="export %[1]s=${%[1]s@Q};"; else __cubicle_restore+="unset -v %[1]s;"; fi; export %[1]s=%[2]s; `,
			name, shellQuote(env[name]))
	}
	fmt.Fprintf(&line, "IFS= read -r -d '' __cubicle_code < %s; eval \"$__cubicle_code\" </dev/null\n", shellQuote(p.cellFile))
	if err := os.WriteFile(p.cellFile, []byte(code), 0o600); err != nil {
		return fmt.Errorf("bash cell: %w", err)
	}
	emit(countEvent{Type: typeExecutions, Count: count})
	status, err := k.execute(ctx, p, line.String(), emit)
	if err != nil {
		return err
	}
	if status != 0 {
		// A Jupyter bash kernel's error: no name, the exit status as value.
		emit(errorEvent{Type: typeError, Name: "", Value: strconv.Itoa(status)})
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return nil
}

// execute writes line and collects the cell's output until its end. It
// returns the cell's exit status. Called with cells held.
func (k *bashKernel) execute(ctx context.Context, p *bashProc, line string, emit func(any)) (int, error) {
	c := &bashCell{events: make(chan bashEvent, 64), done: make(chan struct{})}
	p.mu.Lock()
	p.cell = c
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.cell = nil
		p.mu.Unlock()
		close(c.done)
	}()
	if _, err := io.WriteString(p.stdin, line); err != nil {
		return 0, fmt.Errorf("bash cell: %w", ErrKernelDead)
	}
	var (
		started, interruptPending bool
		outMarks, status          = 0, -1
		ctxDone                   = ctx.Done()
		repeat, giveUp            <-chan time.Time
	)
	interrupt := func() {
		if started {
			p.interrupt()
		} else {
			interruptPending = true // bash is still reading the line
		}
	}
	for outMarks < 2 || status < 0 {
		select {
		case ev := <-c.events:
			switch ev.kind {
			case typeStdout, typeStderr:
				emit(streamEvent{Type: ev.kind, Text: ev.text, Timestamp: timestamp()})
			case "start":
				started = true
				if interruptPending {
					interruptPending = false
					p.interrupt()
				}
			case "marker":
				outMarks++
			case "end":
				status = ev.status
			}
		case <-ctxDone:
			ctxDone = nil
			k.opts.log.Info("interrupting a bash cell whose client went away", "why", context.Cause(ctx))
			interrupt()
			t := time.NewTicker(interruptRepeat)
			defer t.Stop()
			repeat = t.C
			giveUp = time.After(interruptLimit)
		case <-repeat:
			interrupt()
		case <-giveUp:
			k.opts.log.Warn("bash ignored interrupts; restarting it", "after", interruptLimit)
			return 0, errors.Join(ctx.Err(), k.replaceAfter(p))
		case <-p.exited:
			if p.restarting.Load() {
				emit(errorEvent{Type: typeError, Name: "ContextRestarting", Value: "Context was restarted"})
				return 0, nil
			}
			emit(errorEvent{Type: typeError, Name: "DeadKernelError",
				Value: "bash exited while running the cell; a new one was started and the context's state is lost"})
			return 0, k.replaceAfter(p)
		}
	}
	return status, nil
}

// replaceAfter starts a new bash in place of p, whose client may be gone.
func (k *bashKernel) replaceAfter(p *bashProc) error {
	ctx, cancel := context.WithTimeout(context.Background(), k.opts.startTimeout)
	defer cancel()
	_, err := k.replace(ctx, p)
	return err
}

func (k *bashKernel) live(ctx context.Context) (*bashProc, error) {
	k.mu.Lock()
	p, closed := k.proc, k.closed
	k.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if p != nil && !p.dead() {
		return p, nil
	}
	return k.replace(ctx, p)
}

func (k *bashKernel) replace(ctx context.Context, old *bashProc) (*bashProc, error) {
	if old != nil {
		old.kill()
	}
	p, err := startBashProc(ctx, k.opts)
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

func (k *bashKernel) restart(ctx context.Context) error {
	k.mu.Lock()
	old, closed := k.proc, k.closed
	k.mu.Unlock()
	if closed {
		return ErrClosed
	}
	old.restarting.Store(true)
	old.kill()
	if err := k.cells.lock(ctx); err != nil {
		return err
	}
	defer k.cells.unlock()
	k.mu.Lock()
	cur := k.proc
	k.count = 0
	k.mu.Unlock()
	if cur != old && cur != nil && !cur.dead() {
		return nil
	}
	_, err := k.replace(ctx, cur)
	return err
}

func (k *bashKernel) close() error {
	k.mu.Lock()
	p := k.proc
	k.closed = true
	k.proc = nil
	k.mu.Unlock()
	if p != nil {
		p.restarting.Store(true)
		p.kill()
	}
	return nil
}

// bashEvent is something one of bash's three pipes said.
type bashEvent struct {
	kind   string // stdout, stderr, marker, start or end
	text   string
	status int
}

// bashCell receives the events of the running cell.
type bashCell struct {
	events chan bashEvent
	done   chan struct{} // closed when the cell stops listening
}

// bashProc is one bash process.
type bashProc struct {
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	pipes    []*os.File // our ends of stdout, stderr and fd 3
	dir      string     // private directory holding the cell file
	cellFile string
	exited   chan struct{}
	log      *slog.Logger

	restarting atomic.Bool // see kernelProc.restarting

	mu   sync.Mutex // guards cell
	cell *bashCell  // nil between cells: output then is dropped
}

// bashInit defines the prompt hook; %s is the output marker as printf
// octal escapes. The markers go to copies of the original stdout, stderr
// and fd 3 (which is closed), so a cell that redirects or closes its own
// (exec >log) cannot hide a cell's end. The hook ignores SIGINT while it
// runs, so a late interrupt cannot cut it short and lose the end either.
const bashInit = `set +H +o history; unset HISTFILE; PS1=; PS2=
exec {__cubicle_out}>&1 {__cubicle_err}>&2 {__cubicle_ctl}>&3 3>&-
__cubicle_prompt() {
	local rc=$?
	trap '' INT
	if [[ -v __cubicle_restore ]]; then eval "$__cubicle_restore"; unset -v __cubicle_restore; fi
	unset -v __cubicle_code
	printf '%[1]s' >&$__cubicle_out; printf '%[1]s' >&$__cubicle_err; printf 'end %%d\n' "$rc" >&$__cubicle_ctl
	trap - INT
}
PROMPT_COMMAND=__cubicle_prompt
`

func startBashProc(ctx context.Context, opts bashOptions) (_ *bashProc, err error) {
	dir, err := os.MkdirTemp("", "cubicle-bash-")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKernelStart, err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	markerBytes := []byte("\x1ecubicle-" + randomHex(8) + "\x1e")
	var octal strings.Builder
	for _, c := range markerBytes {
		fmt.Fprintf(&octal, `\%03o`, c)
	}

	cmd := exec.Command(opts.bash, "--norc", "--noprofile", "--noediting", "-i")
	cmd.Dir = opts.cwd
	cmd.Env = opts.env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // see kernelProc.interrupt
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKernelStart, err)
	}
	// Plain pipes rather than StdoutPipe: exec.Cmd.Wait would close those
	// at bash's exit, and our readers must own their ends (a background job
	// of a cell may keep writing after bash is gone).
	var readEnds, writeEnds []*os.File
	for range 3 {
		r, w, err := os.Pipe()
		if err != nil {
			closeFiles(readEnds...)
			closeFiles(writeEnds...)
			return nil, fmt.Errorf("%w: %v", ErrKernelStart, err)
		}
		readEnds, writeEnds = append(readEnds, r), append(writeEnds, w)
	}
	cmd.Stdout, cmd.Stderr = writeEnds[0], writeEnds[1]
	cmd.ExtraFiles = []*os.File{writeEnds[2]} // fd 3
	err = cmd.Start()
	closeFiles(writeEnds...)
	if err != nil {
		closeFiles(readEnds...)
		return nil, fmt.Errorf("%w: %v", ErrKernelStart, err)
	}
	p := &bashProc{
		cmd: cmd, stdin: stdin, pipes: readEnds, dir: dir, cellFile: filepath.Join(dir, "cell"),
		exited: make(chan struct{}), log: opts.log,
	}
	go p.readOutput(readEnds[0], typeStdout, markerBytes)
	go p.readOutput(readEnds[1], typeStderr, markerBytes)
	go p.readControl(readEnds[2])
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	defer func() {
		if err != nil {
			p.kill()
		}
	}()

	// The first prompt's end marks bash ready. What it printed before
	// (job control warnings) belongs to no cell and is dropped.
	c := &bashCell{events: make(chan bashEvent, 64), done: make(chan struct{})}
	p.mu.Lock()
	p.cell = c
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.cell = nil
		p.mu.Unlock()
		close(c.done)
	}()
	if _, err := io.WriteString(stdin, fmt.Sprintf(bashInit, octal.String())); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKernelStart, err)
	}
	ctx, cancel := context.WithTimeout(ctx, opts.startTimeout)
	defer cancel()
	marks, ended := 0, false
	for marks < 2 || !ended {
		select {
		case ev := <-c.events:
			switch ev.kind {
			case "marker":
				marks++
			case "end":
				ended = true
			}
		case <-p.exited:
			return nil, fmt.Errorf("%w: %w", ErrKernelStart, ErrKernelDead)
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: %w", ErrKernelStart, ctx.Err())
		}
	}
	return p, nil
}

// deliver hands ev to the running cell, or drops it between cells.
func (p *bashProc) deliver(ev bashEvent) {
	p.mu.Lock()
	c := p.cell
	p.mu.Unlock()
	if c == nil {
		return
	}
	select {
	case c.events <- ev:
	case <-c.done:
	}
}

func (p *bashProc) readOutput(r io.Reader, kind string, marker []byte) {
	s := markerScanner{marker: marker}
	buf := make([]byte, 32<<10)
	text := func(b []byte) { p.deliver(bashEvent{kind: kind, text: string(b)}) }
	mark := func() { p.deliver(bashEvent{kind: "marker"}) }
	for {
		n, err := r.Read(buf)
		if n > 0 {
			s.scan(buf[:n], text, mark)
		}
		if err != nil {
			if rest := s.flush(); len(rest) > 0 {
				text(rest)
			}
			return
		}
	}
}

func (p *bashProc) readControl(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "start":
			p.deliver(bashEvent{kind: "start"})
		case strings.HasPrefix(line, "end "):
			n, err := strconv.Atoi(strings.TrimPrefix(line, "end "))
			if err != nil {
				n = 1
			}
			p.deliver(bashEvent{kind: "end", status: n})
		}
	}
}

func (p *bashProc) interrupt() {
	if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGINT); err != nil && !errors.Is(err, syscall.ESRCH) {
		p.log.Warn("interrupting bash", "err", err)
	}
}

func (p *bashProc) dead() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// kill ends bash's process group and closes our pipe ends, which stops the
// readers even if a job that left the group still holds the other ends.
func (p *bashProc) kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	p.stdin.Close()
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		p.log.Warn("bash did not exit after SIGKILL", "pid", p.cmd.Process.Pid)
	}
	closeFiles(p.pipes...)
	os.RemoveAll(p.dir)
}

func closeFiles(fs ...*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// shellQuote quotes s for bash as one word.
func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
