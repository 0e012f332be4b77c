// Package envd is cubicle's implementation of envd, the daemon that runs as the first
// process inside every sandbox and serves the E2B envd protocol on TCP port 49983:
// the Process and Filesystem Connect RPC services plus plain HTTP (/health, /init,
// /files, /envs, /metrics), so that the official E2B SDKs work against it unchanged,
// and GET /auth, which tells the sandbox's other servers whether a token is the
// sandbox's access token (see verifyToken).
//
// The host calls Run (or NewServer and Serve) inside the sandbox. As PID 1, Run
// becomes a minimal init (see RunInit) and serves from a re-executed child.
//
// The wire protocol is shared/e2b-protocol.md section 3; the .proto files under
// spec/ are its Process and Filesystem services, generated into gen/ by
// scripts/gen-proto.sh.
package envd

//go:generate bash ../../scripts/gen-proto.sh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"connectrpc.com/connect"
	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem/filesystemconnect"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/defaults"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/files"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/filesys"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/metrics"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/processes"
)

// Version is the envd protocol version this implementation speaks, advertised in
// the X-Envd-Version header. The SDKs gate features on it (e.g. metadata needs
// 0.6.2, watch entries 0.6.3), so it must not be lowered.
const Version = "0.6.13"

// DefaultAddr is where envd listens in a sandbox; the SDKs and the proxy assume
// port 49983.
const DefaultAddr = ":49983"

// DefaultRunDir is where /init publishes the sandbox identity as files
// (.E2B_SANDBOX, .E2B_SANDBOX_ID, .E2B_TEMPLATE_ID), as E2B sandboxes do.
const DefaultRunDir = "/run/e2b"

// Options configure a Server. The zero value serves on DefaultAddr.
type Options struct {
	// Addr is the TCP address Run listens on; default DefaultAddr.
	Addr string
	// Version is advertised in X-Envd-Version; default Version.
	Version string
	// Logger receives envd's logs; default a text logger on stderr.
	Logger *slog.Logger
	// DefaultUser is the user requests act as until /init names one; default
	// "user" when it exists, else root.
	DefaultUser string
	// DefaultWorkdir is where relative paths and processes start until /init
	// sets one; default the user's home.
	DefaultWorkdir string
	// RunDir is where /init writes the sandbox identity files; default
	// DefaultRunDir. Set "-" to write none.
	RunDir string
	// SetClock sets the system clock when /init brings a timestamp that is more
	// than a second off; default unix.Settimeofday. EPERM is tolerated (a sandbox
	// without CAP_SYS_TIME keeps its clock).
	SetClock func(time.Time) error
	// NoInit keeps Run from acting as init when it finds itself PID 1 (for hosts
	// that run their own init in front of envd).
	NoInit bool
}

// Server is an envd instance: its RPC services, HTTP handlers and sandbox state.
type Server struct {
	opts     Options
	log      *slog.Logger
	token    *accessToken
	defaults *defaults.Store
	procs    *processes.Service
	fs       *filesys.Service
	files    *files.Handler
	metrics  *metrics.Sampler
	handler  http.Handler
}

// maxRPCMessageBytes bounds one RPC message: requests are small (paths, commands,
// input chunks), so anything bigger is a mistake or an attack.
const maxRPCMessageBytes = 32 << 20

// NewServer builds a Server; it starts nothing.
func NewServer(opts Options) (*Server, error) {
	if opts.Addr == "" {
		opts.Addr = DefaultAddr
	}
	if opts.Version == "" {
		opts.Version = Version
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if opts.RunDir == "" {
		opts.RunDir = DefaultRunDir
	}
	if opts.SetClock == nil {
		opts.SetClock = setSystemClock
	}
	if opts.DefaultWorkdir != "" && opts.DefaultWorkdir[0] != '/' {
		return nil, fmt.Errorf("%w: default workdir %q is not absolute", ErrInvalidOption, opts.DefaultWorkdir)
	}
	log := opts.Logger
	d := defaults.New(opts.DefaultUser, opts.DefaultWorkdir)
	s := &Server{
		opts:     opts,
		log:      log,
		token:    &accessToken{},
		defaults: d,
		procs:    processes.New(log.With("service", "process"), d),
		fs:       filesys.New(log.With("service", "filesystem"), d),
		files:    files.New(log.With("handler", "files"), d),
		metrics:  metrics.New("/proc", "/"),
	}

	rpcOpts := []connect.HandlerOption{
		connect.WithReadMaxBytes(maxRPCMessageBytes),
		connect.WithRecover(func(_ context.Context, spec connect.Spec, _ http.Header, r any) error {
			log.Error("panic in RPC handler", "procedure", spec.Procedure, "panic", r)
			return connect.NewError(connect.CodeInternal, errors.New("internal error"))
		}),
	}
	mux := http.NewServeMux()
	mux.Handle(processconnect.NewProcessHandler(s.procs, rpcOpts...))
	mux.Handle(filesystemconnect.NewFilesystemHandler(s.fs, rpcOpts...))
	mux.HandleFunc("GET /health", s.health)
	mux.HandleFunc("POST /init", s.init)
	mux.HandleFunc("GET /envs", s.envs)
	mux.HandleFunc("GET /auth", s.verifyToken)
	mux.HandleFunc("GET /metrics", s.serveMetrics)
	mux.Handle("/files", s.files)
	mux.HandleFunc("/", notFound)
	s.handler = s.withHeaders(cors(s.authorize(mux)))
	return s, nil
}

// ErrInvalidOption is returned by NewServer for unusable Options.
var ErrInvalidOption = errors.New("invalid envd option")

// Handler returns the HTTP handler serving the whole envd API.
func (s *Server) Handler() http.Handler { return s.handler }

// Close kills the processes envd started and stops its directory watchers,
// waiting up to ctx for the processes to be reaped.
func (s *Server) Close(ctx context.Context) error {
	s.fs.Close()
	return s.procs.Close(ctx)
}

// shutdownGrace is how long Serve lets requests finish after its context ends.
// Streams (process output, watches) never finish by themselves, so they are cut.
const shutdownGrace = 5 * time.Second

// Serve serves HTTP/1.1 (and cleartext HTTP/2 with prior knowledge) on ln until
// ctx ends, then shuts down and closes the Server.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	srv := &http.Server{
		Handler:   s.handler,
		Protocols: &protocols,
		// Bounds the time a client may take to send headers, so idle or
		// slow-loris connections cannot pile up. Bodies and streams are
		// unbounded: uploads and process streams legitimately last long.
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       5 * time.Minute,
		MaxHeaderBytes:    1 << 20,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	s.log.Info("envd serving", "addr", ln.Addr().String(), "version", s.opts.Version)
	select {
	case err := <-errc:
		_ = s.Close(context.Background())
		return fmt.Errorf("envd: serve: %w", err)
	case <-ctx.Done():
	}
	shutCtx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(shutCtx); err != nil {
		_ = srv.Close()
	}
	closeCtx, cancelClose := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancelClose()
	return s.Close(closeCtx)
}

// Run serves envd on opts.Addr until ctx ends. When the calling process is PID 1
// (and opts.NoInit is false) it instead acts as init: it re-executes the program
// with the same arguments as a child that serves, reaps orphans, forwards
// termination signals, and returns an *ExitError carrying the child's exit status
// when that is not 0.
func Run(ctx context.Context, opts Options) error {
	if os.Getpid() == 1 && !opts.NoInit {
		code, err := RunInit(ctx, os.Args[1:])
		if err != nil {
			return err
		}
		if code != 0 {
			return &ExitError{Code: code}
		}
		return nil
	}
	s, err := NewServer(opts)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", s.opts.Addr)
	if err != nil {
		return fmt.Errorf("envd: listen: %w", err)
	}
	return s.Serve(ctx, ln)
}

// ExitError reports the exit status of the serving child when Run acted as init;
// the caller (PID 1) should exit with Code.
type ExitError struct {
	Code int
}

func (e *ExitError) Error() string { return fmt.Sprintf("envd server exited with status %d", e.Code) }

func setSystemClock(t time.Time) error {
	tv := unix.NsecToTimeval(t.UnixNano())
	return unix.Settimeofday(&tv)
}
