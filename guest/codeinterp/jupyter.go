package codeinterp

// Python contexts: an ipykernel process and the client side of the Jupyter
// messaging protocol.
//
// Lock order: kernelBase.cells, then kernelBase.mu, then kernelProc.mu.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-zeromq/zmq4"
)

// jupyterOptions configures a Python context.
type jupyterOptions struct {
	python       string        // interpreter with ipykernel importable
	cwd          string        // working directory of the kernel
	env          []string      // the kernel's environment, KEY=VALUE
	startTimeout time.Duration // how long a kernel may take to answer
	log          *slog.Logger
}

// jupyterKernel is a Python context.
type jupyterKernel struct {
	kernelBase[*kernelProc]
	opts jupyterOptions
}

func newJupyterKernel(ctx context.Context, opts jupyterOptions) (*jupyterKernel, error) {
	k := &jupyterKernel{opts: opts}
	start := func(ctx context.Context) (*kernelProc, error) { return startKernelProc(ctx, opts) }
	died := "The kernel died while running the cell; a new one was started and the context's state is lost"
	if err := k.init(ctx, start, opts.startTimeout, died); err != nil {
		return nil, err
	}
	return k, nil
}

func (k *jupyterKernel) run(ctx context.Context, code string, env map[string]string, emit func(any)) error {
	p, err := k.lockLive(ctx)
	if err != nil {
		return err
	}
	defer k.cells.unlock()
	k.mu.Lock()
	base := k.baseEnv
	applyBase := len(base) > 0 && k.envProc != p
	k.mu.Unlock()

	// Our own setup cells are pipelined ahead of the user's: the kernel
	// runs shell requests in order, so they take effect first without a
	// round trip each.
	var setup []*pendingRequest
	defer func() {
		for _, req := range setup {
			p.forget(req)
		}
	}()
	queue := func(code string) error {
		req, err := p.execute(code, true)
		if err == nil {
			setup = append(setup, req)
		}
		return err
	}
	if applyBase {
		if err := queue(pyUpdateEnv(base)); err != nil {
			return err
		}
		k.mu.Lock()
		k.envProc = p
		k.mu.Unlock()
	}
	if len(env) > 0 {
		if err := queue(pySetEnv(env)); err != nil {
			return err
		}
	}
	cell, err := p.execute(code, false)
	if err != nil {
		return err
	}
	for _, req := range setup {
		if err := k.collectSilent(ctx, p, req); err != nil {
			k.opts.log.Warn("setting a cell's environment", "err", err)
		}
	}
	err = k.collect(ctx, p, cell, emit)
	if len(env) > 0 && !p.dead() {
		// After the cell, not pipelined with it: an interrupt meant for
		// the cell must not land on the restore. The client may be gone;
		// the restore must run all the same.
		rctx, cancel := context.WithTimeout(context.Background(), interruptLimit)
		if rerr := k.silent(rctx, p, pyRestoreEnv); rerr != nil {
			k.opts.log.Warn("restoring environment after a cell", "err", rerr)
		}
		cancel()
	}
	return err
}

// runSilent runs code of ours (not the user's) as its own cell.
func (k *jupyterKernel) runSilent(ctx context.Context, code string) error {
	p, err := k.lockLive(ctx)
	if err != nil {
		return err
	}
	defer k.cells.unlock()
	return k.silent(ctx, p, code)
}

// silent runs code that is ours, not the user's (environment changes): no
// outputs, no execution count, and an error if it fails.
func (k *jupyterKernel) silent(ctx context.Context, p *kernelProc, code string) error {
	req, err := p.execute(code, true)
	if err != nil {
		return err
	}
	return k.collectSilent(ctx, p, req)
}

// collectSilent waits for a silent request and returns its error, if any.
func (k *jupyterKernel) collectSilent(ctx context.Context, p *kernelProc, req *pendingRequest) error {
	var failure error
	err := k.collect(ctx, p, req, func(v any) {
		if e, ok := v.(errorEvent); ok && failure == nil {
			failure = fmt.Errorf("%s: %s", e.Name, e.Value)
		}
	})
	return errors.Join(err, failure)
}

// execute sends an execute_request.
func (p *kernelProc) execute(code string, silent bool) (*pendingRequest, error) {
	return p.request("execute_request", executeRequest{
		Code:            code,
		Silent:          silent,
		StoreHistory:    !silent,
		UserExpressions: map[string]string{},
		AllowStdin:      false,
		// Requests are pipelined (see run): after an error, ipykernel
		// would abort the ones queued behind it.
		StopOnError: false,
	})
}

// collect turns the replies to req into events until the kernel is idle
// after it. Called with cells held.
func (k *jupyterKernel) collect(ctx context.Context, p *kernelProc, req *pendingRequest, emit func(any)) error {
	defer p.forget(req)
	var (
		idle, replied, errored bool
		replyErr               *errorEvent
	)
	// ipykernel publishes idle right after the reply; a lost iopub message
	// must not hang the cell. Armed by the reply.
	replyGrace := time.NewTimer(time.Hour)
	replyGrace.Stop()
	handle := func(m message) bool {
		switch m.Header.MsgType {
		case "status":
			var c struct {
				State string `json:"execution_state"`
			}
			if json.Unmarshal(m.Content, &c) == nil && c.State == "idle" {
				idle = true
			}
		case "execute_reply":
			replied = true
			replyGrace.Reset(5 * time.Second)
			var c struct {
				Status    string   `json:"status"`
				EName     string   `json:"ename"`
				EValue    string   `json:"evalue"`
				Traceback []string `json:"traceback"`
			}
			if json.Unmarshal(m.Content, &c) != nil {
				break
			}
			// iopub's error message says the same and keeps its place
			// among the outputs; the reply's is the fallback.
			switch c.Status {
			case "error":
				replyErr = &errorEvent{Type: typeError, Name: c.EName, Value: c.EValue, Traceback: strings.Join(c.Traceback, "\n")}
			case "aborted":
				replyErr = &errorEvent{Type: typeError, Name: "ExecutionAborted", Value: "Execution was aborted"}
			}
		case "error":
			if errored {
				break
			}
			var c struct {
				EName     string   `json:"ename"`
				EValue    string   `json:"evalue"`
				Traceback []string `json:"traceback"`
			}
			if json.Unmarshal(m.Content, &c) == nil {
				errored = true
				emit(errorEvent{Type: typeError, Name: c.EName, Value: c.EValue, Traceback: strings.Join(c.Traceback, "\n")})
			}
		default:
			if ev, ok := iopubEvent(m); ok {
				emit(ev)
			}
		}
		return idle && replied
	}
	ended, err := awaitCell(ctx, &k.kernelBase, p, cellWait[message]{
		events:    req.msgs,
		handle:    handle,
		interrupt: p.interrupt,
		stalled:   replyGrace.C,
		log:       k.opts.log.With("msg_id", req.id),
	}, emit)
	if ended && replyErr != nil && !errored {
		emit(*replyErr)
	}
	return err
}

// iopubEvent converts the iopub messages that carry output.
func iopubEvent(m message) (any, bool) {
	switch m.Header.MsgType {
	case "execute_input":
		var c struct {
			Count int `json:"execution_count"`
		}
		if json.Unmarshal(m.Content, &c) == nil {
			return countEvent{Type: typeExecutions, Count: c.Count}, true
		}
	case "stream":
		var c struct {
			Name string `json:"name"`
			Text string `json:"text"`
		}
		if json.Unmarshal(m.Content, &c) == nil && (c.Name == typeStdout || c.Name == typeStderr) {
			ts := m.Header.Date
			if ts == "" {
				ts = timestamp()
			}
			return streamEvent{Type: c.Name, Text: c.Text, Timestamp: ts}, true
		}
	case "execute_result", "display_data":
		var c struct {
			Data map[string]json.RawMessage `json:"data"`
		}
		if json.Unmarshal(m.Content, &c) == nil {
			return newResult(m.Header.MsgType == "execute_result", c.Data), true
		}
	}
	return nil, false
}

// executeRequest is execute_request's content.
type executeRequest struct {
	Code            string            `json:"code"`
	Silent          bool              `json:"silent"`
	StoreHistory    bool              `json:"store_history"`
	UserExpressions map[string]string `json:"user_expressions"`
	AllowStdin      bool              `json:"allow_stdin"`
	StopOnError     bool              `json:"stop_on_error"`
}

// Environment changes run as silent Python expressions that bind no name in
// the user's namespace; the values a cell's env_vars replaced are kept on
// the os module until the restore.
func pyUpdateEnv(env map[string]string) string {
	return "__import__('os').environ.update(" + pyDict(env) + ")"
}

func pySetEnv(env map[string]string) string {
	return "(lambda os, new: (setattr(os, '_cubicle_saved_env', {k: os.environ.get(k) for k in new}), os.environ.update(new)))(__import__('os'), " + pyDict(env) + ")"
}

const pyRestoreEnv = "(lambda os: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v) for k, v in os.__dict__.pop('_cubicle_saved_env', {}).items()])(__import__('os'))"

// pyDict renders env as a Python dict literal. Go's JSON encoding of a
// map[string]string is one: it escapes only with \", \\, \n, \r, \t and
// \uXXXX, all of which Python reads the same.
func pyDict(env map[string]string) string {
	b, err := json.Marshal(env)
	if err != nil {
		panic(fmt.Sprintf("codeinterp: encode env: %v", err)) // strings only: cannot fail
	}
	return string(b)
}

// pyString renders s as a Python string literal (see pyDict).
func pyString(s string) string {
	b, _ := json.Marshal(s) // a string cannot fail to encode
	return string(b)
}

// kernelProc is one ipykernel process and our sockets to it.
type kernelProc struct {
	process
	dir     string // private directory: connection file and ipc sockets
	signer  signer
	session string
	shell   zmq4.Socket
	iopub   zmq4.Socket
	cancel  context.CancelFunc // ends the sockets
	stderr  *tailBuffer

	mu      sync.Mutex // guards pending
	pending map[string]*pendingRequest
}

// pendingRequest collects the shell reply and iopub messages whose parent
// is one request.
type pendingRequest struct {
	id   string
	msgs chan message
	done chan struct{} // closed by forget; readers stop delivering
}

// connectionFile is the kernel's connection file (jupyter_client's format).
// With the ipc transport each port number is the suffix of a socket path,
// <ip>-<port>, so no TCP port is raced for.
type connectionFile struct {
	Transport       string `json:"transport"`
	IP              string `json:"ip"`
	ShellPort       int    `json:"shell_port"`
	IOPubPort       int    `json:"iopub_port"`
	StdinPort       int    `json:"stdin_port"`
	ControlPort     int    `json:"control_port"`
	HBPort          int    `json:"hb_port"`
	Key             string `json:"key"`
	SignatureScheme string `json:"signature_scheme"`
	KernelName      string `json:"kernel_name"`
}

// kernelBootstrap starts ipykernel as ipykernel_launcher does, with one
// change measured to save 20-30 % of a cell's overhead under gVisor: ipykernel
// flushes stdout and stderr after every cell, and each flush waits for a
// round trip to its IOPub thread even when nothing was written; here an
// empty stream's flush returns at once. Output ordering is kept: whatever an
// earlier flush handed to the IOPub thread goes out before the idle status
// that ends the cell, which that same thread sends later. An ipykernel
// without these internals keeps its own flush.
const kernelBootstrap = `import sys
import ipykernel.iostream as _io
_flush = _io.OutStream.flush
def _quick_flush(self):
    try:
        with self._buffer_lock:
            empty = self._buffer.tell() == 0
        idle = empty and not self._flush_pending and not self._subprocess_flush_pending
    except AttributeError:
        idle = False
    if not idle:
        _flush(self)
_io.OutStream.flush = _quick_flush
if sys.path and sys.path[0] == "":
    del sys.path[0]
from ipykernel import kernelapp
kernelapp.launch_new_instance()
`

// startKernelProc launches ipykernel and waits until it answers a
// kernel_info_request on shell and publishes on iopub, so that the first
// cell's output cannot be lost to ZeroMQ's slow-joiner window.
func startKernelProc(ctx context.Context, opts jupyterOptions) (_ *kernelProc, err error) {
	dir, err := os.MkdirTemp("", "cubicle-kernel-")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKernelStart, err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
		}
	}()
	key := []byte(randomHex(32))
	conn := connectionFile{
		Transport: "ipc", IP: filepath.Join(dir, "k"),
		ShellPort: 1, IOPubPort: 2, StdinPort: 3, ControlPort: 4, HBPort: 5,
		Key: string(key), SignatureScheme: "hmac-sha256", KernelName: "python3",
	}
	b, _ := json.Marshal(conn)
	connPath := filepath.Join(dir, "connection.json")
	if err := os.WriteFile(connPath, b, 0o600); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKernelStart, err)
	}

	cmd := exec.Command(opts.python, "-c", kernelBootstrap, "-f", connPath,
		// No history database: nothing to write in $HOME, a faster start.
		"--HistoryManager.enabled=False",
		// Plain tracebacks, as E2B's kernels give.
		"--InteractiveShell.colors=NoColor",
		// ipykernel sleeps 0.5 ms after each cell so that stdout reaches
		// clients before the reply; we end a cell on iopub's idle, which
		// follows the output on the same socket, so the sleep only costs.
		"--IPythonKernel._execute_sleep=0")
	cmd.Dir = opts.cwd
	// JPY_PARENT_PID makes the kernel exit when this server does.
	cmd.Env = append(slices.Clone(opts.env), fmt.Sprintf("JPY_PARENT_PID=%d", os.Getpid()))
	stderr := &tailBuffer{max: 8 << 10}
	cmd.Stderr = stderr
	// Its own process group, so an interrupt reaches the kernel and what
	// it started (subprocesses of the cell), as jupyter_client does it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrKernelStart, err)
	}
	sctx, cancel := context.WithCancel(context.Background())
	p := &kernelProc{
		process: process{name: "kernel", cmd: cmd, exited: make(chan struct{}), log: opts.log},
		dir:     dir, signer: signer{key: key}, session: newID(),
		cancel: cancel, stderr: stderr,
		pending: make(map[string]*pendingRequest),
	}
	go func() {
		_ = cmd.Wait()
		close(p.exited)
		cancel()
	}()
	defer func() {
		if err != nil {
			p.kill()
		}
	}()

	ctx, stop := context.WithTimeout(ctx, opts.startTimeout)
	defer stop()
	var up atomic.Bool
	go func() {
		// Dialing retries until the kernel has bound its sockets; end the
		// retries when the kernel exits or we give up.
		select {
		case <-ctx.Done():
			if !up.Load() {
				cancel()
			}
		case <-sctx.Done():
		}
	}()
	zlog := log.New(&slogWriter{log: opts.log}, "zmq4: ", 0)
	zopts := []zmq4.Option{zmq4.WithDialerRetry(10 * time.Millisecond), zmq4.WithDialerMaxRetries(-1), zmq4.WithLogger(zlog)}
	p.shell = zmq4.NewDealer(sctx, zopts...)
	p.iopub = zmq4.NewSub(sctx, zopts...)
	if err := p.iopub.SetOption(zmq4.OptionSubscribe, ""); err != nil {
		return nil, fmt.Errorf("%w: subscribe: %v", ErrKernelStart, err)
	}
	for _, d := range []struct {
		s    zmq4.Socket
		port int
	}{{p.shell, conn.ShellPort}, {p.iopub, conn.IOPubPort}} {
		if err := d.s.Dial(fmt.Sprintf("ipc://%s-%d", conn.IP, d.port)); err != nil {
			return nil, p.startError(ctx, err)
		}
	}
	go p.read(p.shell)
	go p.read(p.iopub)

	// kernel_info_request until both channels have answered.
	for {
		req, err := p.request("kernel_info_request", struct{}{})
		if err != nil {
			return nil, p.startError(ctx, err)
		}
		replied, published := false, false
		wait := time.After(250 * time.Millisecond)
	collect:
		for !replied || !published {
			select {
			case m := <-req.msgs:
				if m.Header.MsgType == "kernel_info_reply" {
					replied = true
				} else {
					published = true
				}
			case <-wait:
				break collect
			case <-p.exited:
				p.forget(req)
				return nil, p.startError(ctx, ErrKernelDead)
			case <-ctx.Done():
				p.forget(req)
				return nil, p.startError(ctx, ctx.Err())
			}
		}
		p.forget(req)
		if replied && published {
			up.Store(true)
			return p, nil
		}
	}
}

// startError describes why a kernel did not come up, with its last words.
func (p *kernelProc) startError(ctx context.Context, err error) error {
	select {
	case <-p.exited:
		err = ErrKernelDead
	default:
		if ctx.Err() != nil {
			err = ctx.Err()
		}
	}
	msg := strings.TrimSpace(p.stderr.String())
	if msg != "" {
		return fmt.Errorf("%w: %w; kernel stderr:\n%s", ErrKernelStart, err, msg)
	}
	return fmt.Errorf("%w: %w", ErrKernelStart, err)
}

// request sends a shell request and registers for its replies.
func (p *kernelProc) request(msgType string, content any) (*pendingRequest, error) {
	frames, id, err := p.signer.encode(p.session, msgType, content)
	if err != nil {
		return nil, err
	}
	req := &pendingRequest{id: id, msgs: make(chan message, 64), done: make(chan struct{})}
	p.mu.Lock()
	p.pending[id] = req
	p.mu.Unlock()
	if err := p.shell.Send(zmq4.NewMsgFrom(frames...)); err != nil {
		p.forget(req)
		if p.dead() {
			return nil, ErrKernelDead
		}
		return nil, fmt.Errorf("send %s: %w", msgType, err)
	}
	return req, nil
}

// forget stops delivery to req. It may be called more than once.
func (p *kernelProc) forget(req *pendingRequest) {
	p.mu.Lock()
	_, ok := p.pending[req.id]
	delete(p.pending, req.id)
	p.mu.Unlock()
	if ok {
		close(req.done)
	}
}

// read delivers a socket's messages to the requests they answer, until the
// socket closes. Messages for nobody (other sessions' or forgotten
// requests') are dropped.
func (p *kernelProc) read(s zmq4.Socket) {
	for {
		zm, err := s.Recv()
		if err != nil {
			return
		}
		m, err := p.signer.decode(zm.Frames)
		if err != nil {
			p.log.Warn("dropping a kernel message", "err", err)
			continue
		}
		p.mu.Lock()
		req := p.pending[m.ParentHeader.MsgID]
		p.mu.Unlock()
		if req == nil {
			continue
		}
		select {
		case req.msgs <- m:
		case <-req.done:
		}
	}
}

// kill ends the kernel's process group and waits for it, then frees the
// sockets and the private directory.
func (p *kernelProc) kill() {
	p.stop()
	p.cancel()
	if p.shell != nil {
		p.shell.Close()
	}
	if p.iopub != nil {
		p.iopub.Close()
	}
	os.RemoveAll(p.dir)
}
