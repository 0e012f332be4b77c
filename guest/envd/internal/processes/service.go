// Package processes implements envd's Process RPC service: it starts commands as
// sandbox users (with pipes or a PTY), streams their output to any number of
// watchers with backpressure, and takes their input, signals and resizes.
package processes

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/process"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/defaults"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/keepalive"
)

// defaultPath is the PATH processes get when envd itself has none (as PID 1 it is
// started with an empty environment).
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Service serves process.Process.
type Service struct {
	processconnect.UnimplementedProcessHandler

	log      *slog.Logger
	defaults *defaults.Store
	path     string // PATH given to processes: envd's own, or defaultPath
	isRoot   bool   // envd may switch to any user's credentials

	mu     sync.Mutex       // guards procs and closed
	procs  map[uint32]*proc // running processes by pid, until their end event is out
	closed bool             // Close was called: start nothing new
}

var _ processconnect.ProcessHandler = (*Service)(nil)

// ErrClosed is returned by Start after Close.
var ErrClosed = errors.New("process service is shutting down")

// New returns a Service that takes users, workdir and environment from d.
func New(log *slog.Logger, d *defaults.Store) *Service {
	path := os.Getenv("PATH")
	if path == "" {
		path = defaultPath
	}
	return &Service{log: log, defaults: d, path: path, isRoot: os.Geteuid() == 0, procs: map[uint32]*proc{}}
}

// Close kills every running process (and its process group) and waits, up to ctx,
// for their end events to go out.
func (s *Service) Close(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	procs := slices.Collect(maps.Values(s.procs))
	s.mu.Unlock()
	for _, p := range procs {
		_ = p.signal(unix.SIGKILL)
	}
	for _, p := range procs {
		select {
		case <-p.out.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// List returns the running processes.
func (s *Service) List(_ context.Context, _ *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	s.mu.Lock()
	procs := slices.SortedFunc(maps.Values(s.procs), func(a, b *proc) int { return cmp.Compare(a.pid, b.pid) })
	s.mu.Unlock()
	res := &pb.ListResponse{Processes: make([]*pb.ProcessInfo, 0, len(procs))}
	for _, p := range procs {
		res.Processes = append(res.Processes, &pb.ProcessInfo{Config: p.config, Pid: p.pid, Tag: p.tag})
	}
	return connect.NewResponse(res), nil
}

// Start starts a process and streams its events: start (with the pid) first, then
// output, then end. The stream's deadline (Connect-Timeout-Ms) is the process's
// lifetime: when it passes the process group is killed, even if the client has
// disconnected by then. A client that merely disconnects leaves the process running.
func (s *Service) Start(ctx context.Context, req *connect.Request[pb.StartRequest], stream *connect.ServerStream[pb.StartResponse]) error {
	sp, err := s.spec(req)
	if err != nil {
		return err
	}
	p, err := startProc(sp)
	if err != nil {
		// The error does not say whether exec or the chdir before it failed, so
		// name both.
		err = fmt.Errorf("start %q in '%s' as %s: %w", sp.config.GetCmd(), sp.dir, sp.user.Name, err)
		if isUserError(err) {
			return connect.NewError(connect.CodeInvalidArgument, err)
		}
		return connect.NewError(connect.CodeInternal, err)
	}
	// Subscribe before any output can be read, so the Start stream sees all of it.
	sub := p.out.subscribe()
	defer p.out.unsubscribe(sub)
	if deadline, ok := ctx.Deadline(); ok {
		p.timer = time.AfterFunc(time.Until(deadline), func() {
			s.log.Info("process timed out, killing it", "pid", p.pid)
			_ = p.signal(unix.SIGKILL)
		})
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = p.signal(unix.SIGKILL)
		p.run(func() {})
		return connect.NewError(connect.CodeUnavailable, ErrClosed)
	}
	s.procs[p.pid] = p
	s.mu.Unlock()
	s.log.Info("process started", "pid", p.pid, "cmd", sp.config.GetCmd(), "user", sp.user.Name, "pty", sp.pty != nil)
	p.run(func() {
		s.mu.Lock()
		delete(s.procs, p.pid)
		s.mu.Unlock()
		s.log.Info("process ended", "pid", p.pid, "status", p.out.end.GetStatus())
	})
	return follow(ctx, keepalive.Period(req.Header()), p, sub, func(ev *pb.ProcessEvent) error {
		return stream.Send(&pb.StartResponse{Event: ev})
	})
}

// Connect streams the events of a running process, starting with a start event,
// as Start does; any number of streams may follow one process.
func (s *Service) Connect(ctx context.Context, req *connect.Request[pb.ConnectRequest], stream *connect.ServerStream[pb.ConnectResponse]) error {
	p, err := s.find(req.Msg.GetProcess())
	if err != nil {
		return err
	}
	sub := p.out.subscribe()
	defer p.out.unsubscribe(sub)
	return follow(ctx, keepalive.Period(req.Header()), p, sub, func(ev *pb.ProcessEvent) error {
		return stream.Send(&pb.ConnectResponse{Event: ev})
	})
}

// Update resizes a process's PTY.
func (s *Service) Update(_ context.Context, req *connect.Request[pb.UpdateRequest]) (*connect.Response[pb.UpdateResponse], error) {
	p, err := s.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if req.Msg.GetPty().GetSize() == nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("update carries no pty size"))
	}
	if err := p.resize(req.Msg.GetPty().GetSize()); err != nil {
		return nil, procError(err)
	}
	return connect.NewResponse(&pb.UpdateResponse{}), nil
}

// SendInput writes to a process's stdin or PTY.
func (s *Service) SendInput(ctx context.Context, req *connect.Request[pb.SendInputRequest]) (*connect.Response[pb.SendInputResponse], error) {
	p, err := s.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if err := writeInput(ctx, p, req.Msg.GetInput()); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.SendInputResponse{}), nil
}

// StreamInput takes a start event naming the process, then input data events.
func (s *Service) StreamInput(ctx context.Context, stream *connect.ClientStream[pb.StreamInputRequest]) (*connect.Response[pb.StreamInputResponse], error) {
	var p *proc
	for stream.Receive() {
		switch ev := stream.Msg().GetEvent().(type) {
		case *pb.StreamInputRequest_Start:
			if p != nil {
				return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("second start event on one input stream"))
			}
			var err error
			if p, err = s.find(ev.Start.GetProcess()); err != nil {
				return nil, err
			}
		case *pb.StreamInputRequest_Data:
			if p == nil {
				return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("input before the start event"))
			}
			if err := writeInput(ctx, p, ev.Data.GetInput()); err != nil {
				return nil, err
			}
		case *pb.StreamInputRequest_Keepalive:
		default:
			return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("empty input stream event"))
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.StreamInputResponse{}), nil
}

// SendSignal sends SIGTERM to the process or SIGKILL to its process group.
func (s *Service) SendSignal(_ context.Context, req *connect.Request[pb.SendSignalRequest]) (*connect.Response[pb.SendSignalResponse], error) {
	p, err := s.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	var sig unix.Signal
	switch req.Msg.GetSignal() {
	case pb.Signal_SIGNAL_SIGKILL:
		sig = unix.SIGKILL
	case pb.Signal_SIGNAL_SIGTERM:
		sig = unix.SIGTERM
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("unsupported signal %v", req.Msg.GetSignal()))
	}
	if err := p.signal(sig); err != nil {
		return nil, procError(err)
	}
	return connect.NewResponse(&pb.SendSignalResponse{}), nil
}

// CloseStdin closes a process's stdin so it reads end-of-file.
func (s *Service) CloseStdin(_ context.Context, req *connect.Request[pb.CloseStdinRequest]) (*connect.Response[pb.CloseStdinResponse], error) {
	p, err := s.find(req.Msg.GetProcess())
	if err != nil {
		return nil, err
	}
	if p.ptmx != nil {
		return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("process has a PTY: send Ctrl-D (0x04) as pty input to end its input"))
	}
	if err := p.closeStdin(); err != nil {
		return nil, connect.NewError(connect.CodeInternal, err)
	}
	return connect.NewResponse(&pb.CloseStdinResponse{}), nil
}

// spec validates a StartRequest and resolves user, working directory, executable
// and environment.
func (s *Service) spec(req *connect.Request[pb.StartRequest]) (*spec, error) {
	cfg := req.Msg.GetProcess()
	if cfg.GetCmd() == "" {
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("process.cmd is required"))
	}
	u, err := s.defaults.User(req.Header(), "")
	if err != nil {
		return nil, connect.NewError(connect.CodeUnauthenticated, err)
	}
	if !s.isRoot && u.UID != uint32(os.Geteuid()) {
		return nil, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("envd is not running as root and cannot act as user %q", u.Name))
	}
	dir, err := s.defaults.Resolve(cfg.GetCwd(), u)
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("cwd '%s' does not exist or is not a directory", dir))
	}

	// Later entries win (os/exec keeps the last of duplicate keys), hence the order:
	// envd's fixed variables, then the sandbox's from /init, then the request's.
	env := []string{
		"PATH=" + s.path,
		"HOME=" + u.Home,
		"USER=" + u.Name,
		"LOGNAME=" + u.Name,
		"E2B_SANDBOX=true",
	}
	env = append(env, s.defaults.EnvList()...)
	reqEnv := cfg.GetEnvs()
	for _, k := range slices.Sorted(maps.Keys(reqEnv)) {
		env = append(env, k+"="+reqEnv[k])
	}
	path, err := lookPath(cfg.GetCmd(), lastValue(env, "PATH"), dir)
	if err != nil {
		return nil, connect.NewError(connect.CodeInvalidArgument, err)
	}
	return &spec{
		config: cfg,
		tag:    req.Msg.Tag,
		path:   path,
		argv:   append([]string{cfg.GetCmd()}, cfg.GetArgs()...),
		env:    env,
		dir:    dir,
		user:   u,
		setUID: s.isRoot,
		pty:    req.Msg.GetPty(),
		// An unset stdin means true: SDKs before the field existed expect stdin.
		stdin: req.Msg.Stdin == nil || req.Msg.GetStdin(),
	}, nil
}

// find returns the process a selector names, or a not_found error.
func (s *Service) find(sel *pb.ProcessSelector) (*proc, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch v := sel.GetSelector().(type) {
	case *pb.ProcessSelector_Pid:
		if p, ok := s.procs[v.Pid]; ok {
			return p, nil
		}
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with pid %d not found", v.Pid))
	case *pb.ProcessSelector_Tag:
		// Tags need not be unique; the oldest (lowest pid) holder wins so the
		// answer is stable.
		var found *proc
		for _, p := range s.procs {
			if p.tag != nil && *p.tag == v.Tag && (found == nil || p.pid < found.pid) {
				found = p
			}
		}
		if found == nil {
			return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("process with tag %q not found", v.Tag))
		}
		return found, nil
	default:
		return nil, connect.NewError(connect.CodeInvalidArgument, errors.New("process selector names neither pid nor tag"))
	}
}

// follow sends a process's events to one stream: start, output, end, and keepalives
// while idle. It returns when the end event is sent, the stream fails or ctx ends.
func follow(ctx context.Context, period time.Duration, p *proc, sub *subscriber, send func(*pb.ProcessEvent) error) error {
	if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: p.pid}}}); err != nil {
		return err
	}
	var tick <-chan time.Time
	var timer *time.Timer
	if period > 0 {
		timer = time.NewTimer(period)
		defer timer.Stop()
		tick = timer.C
	}
	sendReset := func(ev *pb.ProcessEvent) error {
		if timer != nil {
			timer.Reset(period)
		}
		return send(ev)
	}
	for {
		select {
		case ev := <-sub.ch:
			if err := sendReset(ev); err != nil {
				return err
			}
		case <-p.out.done:
			// All output is in sub.ch by now and no more will come (see
			// fanout.finish), so its length is exact: flush it, then end.
			for len(sub.ch) > 0 {
				if err := send(<-sub.ch); err != nil {
					return err
				}
			}
			return send(&pb.ProcessEvent{Event: &pb.ProcessEvent_End{End: p.out.end}})
		case <-tick:
			if err := sendReset(&pb.ProcessEvent{Event: &pb.ProcessEvent_Keepalive{Keepalive: &pb.ProcessEvent_KeepAlive{}}}); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func writeInput(ctx context.Context, p *proc, in *pb.ProcessInput) error {
	var err error
	switch v := in.GetInput().(type) {
	case *pb.ProcessInput_Stdin:
		err = p.writeStdin(ctx, v.Stdin)
	case *pb.ProcessInput_Pty:
		err = p.writePTY(ctx, v.Pty)
	default:
		return connect.NewError(connect.CodeInvalidArgument, errors.New("input carries neither stdin nor pty data"))
	}
	if err != nil {
		return procError(err)
	}
	return nil
}

// procError maps a failure acting on a process to a connect error.
func procError(err error) error {
	switch {
	case errors.Is(err, errNoPTY), errors.Is(err, errHasPTY), errors.Is(err, errStdinClosed):
		return connect.NewError(connect.CodeFailedPrecondition, err)
	case errors.Is(err, errExited), errors.Is(err, unix.ESRCH), errors.Is(err, unix.EPIPE), errors.Is(err, os.ErrClosed):
		return connect.NewError(connect.CodeNotFound, fmt.Errorf("process is not running: %w", err))
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	}
	return connect.NewError(connect.CodeInternal, err)
}

// lastValue returns the value of the last KEY=VALUE entry for key in env.
func lastValue(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}
