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
// Lock order: kernelBase.cells, then kernelBase.mu, then bashProc.mu.

import (
	"bufio"
	"context"
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

// bashKernel is a bash context.
type bashKernel struct {
	kernelBase[*bashProc]
	opts  bashOptions
	count int // cells run, reported as number_of_executions; guarded by mu
}

func newBashKernel(ctx context.Context, opts bashOptions) (*bashKernel, error) {
	k := &bashKernel{opts: opts}
	// bash has no counter of its own: a restart starts ours afresh.
	k.onRestart = func() { k.count = 0 }
	start := func(ctx context.Context) (*bashProc, error) { return startBashProc(ctx, opts) }
	died := "bash exited while running the cell; a new one was started and the context's state is lost"
	if err := k.init(ctx, start, opts.startTimeout, died); err != nil {
		return nil, err
	}
	return k, nil
}

// shellName is what bash accepts as a variable name.
var shellName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

func (k *bashKernel) run(ctx context.Context, code string, env map[string]string, emit func(any)) error {
	p, err := k.lockLive(ctx)
	if err != nil {
		return err
	}
	defer k.cells.unlock()
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
	c, stop := p.listen()
	defer stop()
	if _, err := io.WriteString(p.stdin, line); err != nil {
		return 0, fmt.Errorf("bash cell: %w", ErrKernelDead)
	}
	var (
		started, interruptPending bool
		outMarks, status          = 0, -1
	)
	ended, err := awaitCell(ctx, &k.kernelBase, p, cellWait[bashEvent]{
		events: c.events,
		handle: func(ev bashEvent) bool {
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
			return outMarks >= 2 && status >= 0
		},
		interrupt: func() {
			if started {
				p.interrupt()
			} else {
				interruptPending = true // bash is still reading the line
			}
		},
		log: k.opts.log,
	}, emit)
	if !ended {
		return 0, err
	}
	// An interrupted cell still reports its status; run returns ctx's
	// error after it.
	return status, nil
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
	process
	stdin    io.WriteCloser
	pipes    []*os.File // our ends of stdout, stderr and fd 3
	dir      string     // private directory holding the cell file
	cellFile string

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
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // see process
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
		process: process{name: "bash", cmd: cmd, exited: make(chan struct{}), log: opts.log},
		stdin:   stdin, pipes: readEnds, dir: dir, cellFile: filepath.Join(dir, "cell"),
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
	c, stop := p.listen()
	defer stop()
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

// listen makes c the cell that receives p's events, until stop.
func (p *bashProc) listen() (c *bashCell, stop func()) {
	c = &bashCell{events: make(chan bashEvent, 64), done: make(chan struct{})}
	p.mu.Lock()
	p.cell = c
	p.mu.Unlock()
	return c, func() {
		p.mu.Lock()
		p.cell = nil
		p.mu.Unlock()
		close(c.done)
	}
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

// kill ends bash's process group and closes our pipe ends, which stops the
// readers even if a job that left the group still holds the other ends.
func (p *bashProc) kill() {
	p.stop()
	p.stdin.Close()
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
