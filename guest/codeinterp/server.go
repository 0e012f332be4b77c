package codeinterp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Port is the code interpreter's TCP port in a sandbox; the SDK's
// JUPYTER_PORT.
const Port = 49999

// keepaliveInterval is how often /execute writes a keepalive line while a
// cell is silent. The writes are also how a vanished client is noticed.
const keepaliveInterval = 5 * time.Second

// Options configures a Server.
type Options struct {
	// Python is the interpreter that runs ipykernel. Default /usr/bin/python3.
	Python string
	// Bash is the shell of bash contexts. Default /bin/bash.
	Bash string
	// Cwd is the working directory of contexts created without one.
	// Default /home/user when it exists (E2B's), else the current one.
	Cwd string
	// EnvdURL is envd's base URL inside the sandbox. envd checks the
	// access token of every request but GET /health (its GET /auth), and
	// the sandbox's environment (what Sandbox.create's envs and envd's
	// /init set) is fetched from its /envs with the caller's token and
	// applied to every context, since the kernels start before the
	// sandbox is handed out. Empty: no token can be checked, so every
	// request but GET /health is refused with 503.
	EnvdURL string
	// StartTimeout bounds a kernel's start. Default 60 s (gVisor makes
	// the first Python start slow).
	StartTimeout time.Duration
	// Preload lists Python modules the default context imports at start
	// (not into the user's namespace), so the first cell using them is
	// fast. A module that fails to import is logged and skipped.
	Preload []string
	// Logger receives the server's log. Default: discard.
	Logger *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.Python == "" {
		o.Python = "/usr/bin/python3"
	}
	if o.Bash == "" {
		o.Bash = "/bin/bash"
	}
	if o.Cwd == "" {
		if fi, err := os.Stat("/home/user"); err == nil && fi.IsDir() {
			o.Cwd = "/home/user"
		} else if wd, err := os.Getwd(); err == nil {
			o.Cwd = wd
		} else {
			o.Cwd = "/"
		}
	}
	if o.StartTimeout <= 0 {
		o.StartTimeout = 60 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return o
}

// Server is the code interpreter: contexts and the HTTP API over them.
type Server struct {
	opts  Options
	log   *slog.Logger
	ready atomic.Bool // the default Python context is up
	http  *http.Client
	// keepalive is keepaliveInterval; tests shorten it.
	keepalive time.Duration

	// defaultMu serializes the creation of default contexts, so two
	// first requests for a language make one context.
	defaultMu sync.Mutex

	mu         sync.Mutex              // guards the fields below
	contexts   map[string]*codeContext // by id
	defaults   map[string]string       // language → id of its default context
	sandboxEnv map[string]string       // from envd; nil until fetched
	closed     bool
}

// codeContext is one context: what GET /contexts lists, and its kernel.
type codeContext struct {
	ID       string `json:"id"`
	Language string `json:"language"`
	Cwd      string `json:"cwd"`
	kernel   kernel
}

// New returns a server with no contexts; Start makes the default one.
func New(opts Options) *Server {
	opts = opts.withDefaults()
	return &Server{
		opts:      opts,
		log:       opts.Logger,
		http:      &http.Client{Timeout: 5 * time.Second},
		keepalive: keepaliveInterval,
		contexts:  make(map[string]*codeContext),
		defaults:  make(map[string]string),
	}
}

// Start creates the default Python context and imports Options.Preload in
// it; /health answers OK from then on.
func (s *Server) Start(ctx context.Context) error {
	t0 := time.Now()
	c, err := s.defaultContext(ctx, langPython)
	if err != nil {
		return err
	}
	if len(s.opts.Preload) > 0 {
		jk, ok := c.kernel.(*jupyterKernel)
		if !ok {
			return fmt.Errorf("preload: the default context is not a Python kernel")
		}
		for _, mod := range s.opts.Preload {
			// Silent: the user's first cell is still In[1].
			code := "__import__('importlib').import_module(" + pyString(mod) + ")"
			if err := jk.runSilent(ctx, code); err != nil {
				if errors.Is(err, ErrKernelDead) || ctx.Err() != nil {
					return fmt.Errorf("preload %s: %w", mod, err)
				}
				s.log.Warn("preloading a module failed", "module", mod, "err", err)
			}
		}
	}
	s.ready.Store(true)
	s.log.Info("code interpreter ready", "default_context", c.ID, "took", time.Since(t0).Round(time.Millisecond))
	return nil
}

// Close stops every context's kernel.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	cs := slices.Collect(maps.Values(s.contexts))
	s.contexts = map[string]*codeContext{}
	s.defaults = map[string]string{}
	s.mu.Unlock()
	var errs []error
	for _, c := range cs {
		errs = append(errs, c.kernel.close())
	}
	return errors.Join(errs...)
}

// Run serves the code interpreter on addr until ctx ends. It listens at
// once (answering /health with 503 while the default context starts) and
// fails if the default context cannot start.
func Run(ctx context.Context, addr string, opts Options) error {
	s := New(opts)
	defer s.Close()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("code interpreter: listen: %w", err)
	}
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 30 * time.Second}
	errc := make(chan error, 2)
	go func() { errc <- srv.Serve(ln) }()
	go func() {
		if err := s.Start(ctx); err != nil {
			errc <- fmt.Errorf("code interpreter: default context: %w", err)
		}
	}()
	select {
	case <-ctx.Done():
		err = nil
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return errors.Join(err, srv.Shutdown(sctx))
}

// Handler returns the HTTP API (shared/e2b-protocol.md §4), behind the
// access-token and content-type checks (auth.go).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", s.health)
	mux.HandleFunc("POST /execute", s.execute)
	mux.HandleFunc("POST /contexts", s.createContext)
	mux.HandleFunc("GET /contexts", s.listContexts)
	mux.HandleFunc("POST /contexts/{id}/restart", s.restartContext)
	mux.HandleFunc("DELETE /contexts/{id}", s.deleteContext)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		plain(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path))
	})
	return s.guard(mux)
}

func (s *Server) health(w http.ResponseWriter, _ *http.Request) {
	if !s.ready.Load() {
		plain(w, http.StatusServiceUnavailable, "starting")
		return
	}
	writeJSON(w, http.StatusOK, "OK")
}

func (s *Server) execute(w http.ResponseWriter, r *http.Request) {
	body, err := readBody(w, r)
	if err != nil {
		plain(w, http.StatusBadRequest, err.Error())
		return
	}
	req, err := parseExecute(body)
	if err != nil {
		plain(w, http.StatusBadRequest, err.Error())
		return
	}
	s.syncSandboxEnv(r)
	var c *codeContext
	if req.contextID != "" {
		c = s.context(req.contextID)
		if c == nil {
			plain(w, http.StatusNotFound, fmt.Sprintf("Context %s not found", req.contextID))
			return
		}
	} else if c, err = s.defaultContext(r.Context(), req.language); err != nil {
		s.fail(w, err)
		return
	}

	ctx := r.Context()
	events := make(chan any, 64)
	done := make(chan error, 1)
	go func() {
		done <- c.kernel.run(ctx, req.code, req.env, func(v any) {
			select {
			case events <- v:
			case <-ctx.Done(): // nobody reads any more
			}
		})
	}()

	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	out := &ndjson{w: w}
	tick := time.NewTicker(s.keepalive)
	defer tick.Stop()
	for {
		select {
		case v := <-events:
			out.write(v)
			tick.Reset(s.keepalive)
		case <-tick.C:
			out.write(typeOnly{Type: typeKeepalive})
		case err := <-done:
			// Every emit happened before run returned, so what is left
			// is all in the buffer.
			for len(events) > 0 {
				out.write(<-events)
			}
			if err != nil && ctx.Err() == nil {
				s.log.Warn("execution failed", "context", c.ID, "err", err)
				out.write(errorEvent{Type: typeError, Name: "ExecutionError", Value: err.Error()})
			}
			out.write(typeOnly{Type: typeEnd})
			return
		}
	}
}

// ndjson writes one JSON value per line and flushes it, ignoring a client
// that has gone (the request's context tells the kernel).
type ndjson struct {
	w      http.ResponseWriter
	failed bool
}

func (n *ndjson) write(v any) {
	if n.failed {
		return
	}
	b, err := json.Marshal(v)
	if err != nil {
		b, _ = json.Marshal(errorEvent{Type: typeError, Name: "EncodingError", Value: err.Error()})
	}
	b = append(b, '\n')
	if _, err := n.w.Write(b); err != nil {
		n.failed = true
		return
	}
	if err := http.NewResponseController(n.w).Flush(); err != nil {
		n.failed = true
	}
}

func (s *Server) createContext(w http.ResponseWriter, r *http.Request) {
	body, err := readBody(w, r)
	if err != nil {
		plain(w, http.StatusBadRequest, err.Error())
		return
	}
	req, err := parseCreateContext(body)
	if err != nil {
		plain(w, http.StatusBadRequest, err.Error())
		return
	}
	c, err := s.newContext(r.Context(), req.language, req.cwd)
	if err != nil {
		s.fail(w, err)
		return
	}
	writeJSON(w, http.StatusOK, c)
}

func (s *Server) listContexts(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	list := slices.SortedFunc(maps.Values(s.contexts), func(a, b *codeContext) int { return strings.Compare(a.ID, b.ID) })
	s.mu.Unlock()
	if list == nil {
		list = []*codeContext{}
	}
	writeJSON(w, http.StatusOK, list)
}

func (s *Server) restartContext(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	c := s.context(id)
	if c == nil {
		plain(w, http.StatusNotFound, fmt.Sprintf("Context %s not found", id))
		return
	}
	if err := c.kernel.restart(r.Context()); err != nil {
		s.fail(w, err)
		return
	}
	s.mu.Lock()
	env := s.sandboxEnv
	s.mu.Unlock()
	if env != nil {
		c.kernel.setBaseEnv(env)
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) deleteContext(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	s.mu.Lock()
	c := s.contexts[id]
	delete(s.contexts, id)
	for lang, d := range s.defaults {
		if d == id {
			delete(s.defaults, lang) // the next request makes a new default
		}
	}
	s.mu.Unlock()
	if c == nil {
		plain(w, http.StatusNotFound, fmt.Sprintf("Context %s not found", id))
		return
	}
	if err := c.kernel.close(); err != nil {
		s.log.Warn("closing a context", "context", id, "err", err)
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) context(id string) *codeContext {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.contexts[id]
}

// defaultContext returns language's default context, creating it on first
// use as E2B's server does.
func (s *Server) defaultContext(ctx context.Context, language string) (*codeContext, error) {
	s.defaultMu.Lock()
	defer s.defaultMu.Unlock()
	s.mu.Lock()
	c := s.contexts[s.defaults[language]]
	s.mu.Unlock()
	if c != nil {
		return c, nil
	}
	c, err := s.newContext(ctx, language, "")
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.defaults[language] = c.ID
	s.mu.Unlock()
	return c, nil
}

// errBadCwd means a context's working directory does not exist.
var errBadCwd = errors.New("working directory does not exist")

// newContext starts a kernel for language in cwd ("" for the default).
func (s *Server) newContext(ctx context.Context, language, cwd string) (*codeContext, error) {
	if cwd == "" {
		cwd = s.opts.Cwd
	}
	if fi, err := os.Stat(cwd); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("%w: %w: %s", ErrBadRequest, errBadCwd, cwd)
	}
	// A kernel outlives the request that made it.
	kctx := context.WithoutCancel(ctx)
	env := os.Environ()
	log := s.log.With("language", language)
	var (
		k   kernel
		err error
	)
	switch language {
	case langPython:
		k, err = newJupyterKernel(kctx, jupyterOptions{python: s.opts.Python, cwd: cwd, env: env, startTimeout: s.opts.StartTimeout, log: log})
	case langBash:
		k, err = newBashKernel(kctx, bashOptions{bash: s.opts.Bash, cwd: cwd, env: env, startTimeout: s.opts.StartTimeout, log: log})
	default:
		return nil, fmt.Errorf("%w: language %q is not supported", ErrBadRequest, language)
	}
	if err != nil {
		return nil, err
	}
	c := &codeContext{ID: newID(), Language: language, Cwd: cwd, kernel: k}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		k.close()
		return nil, ErrClosed
	}
	s.contexts[c.ID] = c
	if s.sandboxEnv != nil {
		k.setBaseEnv(s.sandboxEnv)
	}
	s.mu.Unlock()
	s.log.Info("context created", "context", c.ID, "language", language, "cwd", cwd)
	return c, nil
}

// syncSandboxEnv fetches the sandbox's environment from envd once, with the
// caller's access token, and hands it to every context.
func (s *Server) syncSandboxEnv(r *http.Request) {
	if s.opts.EnvdURL == "" {
		return
	}
	s.mu.Lock()
	have := s.sandboxEnv != nil
	s.mu.Unlock()
	if have {
		return
	}
	req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, strings.TrimRight(s.opts.EnvdURL, "/")+"/envs", nil)
	if err != nil {
		return
	}
	if tok := r.Header.Get("X-Access-Token"); tok != "" {
		req.Header.Set("X-Access-Token", tok)
	}
	resp, err := s.http.Do(req)
	if err != nil {
		s.log.Debug("fetching the sandbox environment", "err", err)
		return
	}
	defer resp.Body.Close()
	var env map[string]string
	if resp.StatusCode != http.StatusOK {
		s.log.Debug("fetching the sandbox environment", "status", resp.Status)
		return
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&env); err != nil {
		s.log.Warn("decoding the sandbox environment", "err", err)
		return
	}
	if env == nil {
		env = map[string]string{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sandboxEnv != nil {
		return
	}
	s.sandboxEnv = env
	for _, c := range s.contexts {
		c.kernel.setBaseEnv(env)
	}
}

// fail answers err with its status: 400 for the client's mistakes, 500 for
// ours, always as plain text as E2B's server does.
func (s *Server) fail(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, ErrBadRequest):
		plain(w, http.StatusBadRequest, err.Error())
	case errors.Is(err, ErrClosed):
		plain(w, http.StatusNotFound, err.Error())
	case errors.Is(err, context.Canceled):
		plain(w, http.StatusServiceUnavailable, err.Error())
	default:
		s.log.Error("request failed", "err", err)
		plain(w, http.StatusInternalServerError, err.Error())
	}
}

func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		return nil, fmt.Errorf("%w: reading body: %v", ErrBadRequest, err)
	}
	return b, nil
}

func plain(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	io.WriteString(w, msg)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		plain(w, http.StatusInternalServerError, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}
