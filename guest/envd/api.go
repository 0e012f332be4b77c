package envd

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/guest/envd/internal/identity"
	"github.com/cubicle-dev/cubicle/guest/envd/internal/jsonhttp"
)

// maxInitBody bounds the /init body: env vars and a token, never megabytes.
const maxInitBody = 1 << 20

// clockTolerance is how far the sandbox clock may drift from the host's before
// /init sets it. A restored snapshot's clock is off by the time it slept.
const clockTolerance = time.Second

// InitRequest is the body of POST /init, sent by the host before the sandbox
// counts as running (and again after a resume). Absent fields change nothing.
type InitRequest struct {
	EnvVars        map[string]string `json:"envVars,omitempty"`
	AccessToken    *string           `json:"accessToken,omitempty"`
	Timestamp      *time.Time        `json:"timestamp,omitempty"` // RFC 3339, host time at sending
	DefaultUser    *string           `json:"defaultUser,omitempty"`
	DefaultWorkdir *string           `json:"defaultWorkdir,omitempty"`
}

// ErrInvalidInit is returned by ParseInitRequest for a malformed /init body.
var ErrInvalidInit = errors.New("invalid /init request")

// ParseInitRequest decodes and validates an /init body. Unknown fields are
// ignored, as newer hosts may send more.
func ParseInitRequest(body io.Reader) (*InitRequest, error) {
	var req InitRequest
	dec := json.NewDecoder(body)
	if err := dec.Decode(&req); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidInit, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("%w: trailing data after the JSON object", ErrInvalidInit)
	}
	for k, v := range req.EnvVars {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return nil, fmt.Errorf("%w: environment variable %q is not a valid NAME=value pair", ErrInvalidInit, k)
		}
	}
	if req.DefaultWorkdir != nil && *req.DefaultWorkdir != "" {
		if !filepath.IsAbs(*req.DefaultWorkdir) || strings.ContainsRune(*req.DefaultWorkdir, 0) {
			return nil, fmt.Errorf("%w: defaultWorkdir %q is not an absolute path", ErrInvalidInit, *req.DefaultWorkdir)
		}
		clean := filepath.Clean(*req.DefaultWorkdir)
		req.DefaultWorkdir = &clean
	}
	if req.DefaultUser != nil && strings.ContainsAny(*req.DefaultUser, ":\n\x00") {
		return nil, fmt.Errorf("%w: defaultUser %q is not a user name", ErrInvalidInit, *req.DefaultUser)
	}
	return &req, nil
}

// init applies an /init request. The first /init (no token yet) is open: the host
// sends it before any user code runs. Once a token is set, /init must carry it, or
// code inside the sandbox could re-init envd and take the sandbox over.
func (s *Server) init(w http.ResponseWriter, r *http.Request) {
	if s.token.get() != "" && !s.token.matches(r.Header.Get(AccessTokenHeader)) {
		jsonhttp.Error(w, http.StatusUnauthorized, errInitUnauthorized.Error())
		return
	}
	req, err := ParseInitRequest(http.MaxBytesReader(w, r.Body, maxInitBody))
	if err != nil {
		jsonhttp.Error(w, http.StatusBadRequest, err.Error())
		return
	}
	if req.DefaultUser != nil && *req.DefaultUser != "" {
		if _, err := identity.Lookup(*req.DefaultUser); err != nil {
			jsonhttp.Error(w, http.StatusBadRequest, fmt.Sprintf("defaultUser: %v", err))
			return
		}
	}

	if req.Timestamp != nil {
		s.syncClock(*req.Timestamp)
	}
	if len(req.EnvVars) > 0 {
		s.defaults.SetEnv(req.EnvVars)
	}
	if req.DefaultUser != nil && *req.DefaultUser != "" {
		s.defaults.SetUser(*req.DefaultUser)
	}
	if req.DefaultWorkdir != nil && *req.DefaultWorkdir != "" {
		s.defaults.SetWorkdir(*req.DefaultWorkdir)
	}
	// An empty token never clears a set one: that would open the sandbox.
	if req.AccessToken != nil && *req.AccessToken != "" {
		s.token.set(*req.AccessToken)
	}
	s.writeRunFiles()
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusNoContent)
}

// syncClock sets the system clock to host when they differ by more than
// clockTolerance. A sandbox without CAP_SYS_TIME (EPERM) keeps its clock.
func (s *Server) syncClock(host time.Time) {
	drift := time.Since(host)
	if drift.Abs() <= clockTolerance {
		return
	}
	if err := s.opts.SetClock(host); err != nil {
		if errors.Is(err, unix.EPERM) {
			s.log.Debug("cannot set the clock (no CAP_SYS_TIME)", "drift", drift)
			return
		}
		s.log.Warn("cannot set the clock", "drift", drift, "err", err)
		return
	}
	s.log.Info("clock set from /init", "drift", drift)
}

// writeRunFiles publishes the sandbox identity under RunDir, where E2B sandboxes
// keep it for code that does not inherit envd's environment (cron, ssh sessions).
func (s *Server) writeRunFiles() {
	if s.opts.RunDir == "-" {
		return
	}
	env := s.defaults.Env()
	vals := map[string]string{"E2B_SANDBOX": "true"}
	for _, k := range []string{"E2B_SANDBOX_ID", "E2B_TEMPLATE_ID"} {
		if v, ok := env[k]; ok {
			vals[k] = v
		}
	}
	if err := os.MkdirAll(s.opts.RunDir, 0o755); err != nil {
		s.log.Warn("cannot create run dir", "dir", s.opts.RunDir, "err", err)
		return
	}
	for k, v := range vals {
		if err := os.WriteFile(filepath.Join(s.opts.RunDir, "."+k), []byte(v), 0o644); err != nil {
			s.log.Warn("cannot write sandbox identity file", "name", k, "err", err)
		}
	}
}

func (s *Server) health(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) envs(w http.ResponseWriter, _ *http.Request) {
	jsonhttp.Write(w, http.StatusOK, s.defaults.Env())
}

func (s *Server) serveMetrics(w http.ResponseWriter, _ *http.Request) {
	snap, err := s.metrics.Sample()
	if err != nil {
		jsonhttp.Error(w, http.StatusInternalServerError, err.Error())
		return
	}
	jsonhttp.Write(w, http.StatusOK, snap)
}

func notFound(w http.ResponseWriter, r *http.Request) {
	jsonhttp.Error(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path))
}

// withHeaders adds the headers every response carries.
func (s *Server) withHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Envd-Version", s.opts.Version)
		next.ServeHTTP(w, r)
	})
}

// cors opens envd to browsers: the SDK runs in web pages too, and envd's access
// token, not the origin, is what protects it.
func cors(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Access-Control-Allow-Origin", "*")
		h.Set("Access-Control-Expose-Headers", "*")
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
			h.Set("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
			if req := r.Header.Get("Access-Control-Request-Headers"); req != "" {
				h.Set("Access-Control-Allow-Headers", req)
			} else {
				h.Set("Access-Control-Allow-Headers", "*")
			}
			h.Set("Access-Control-Max-Age", "7200")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		next.ServeHTTP(w, r)
	})
}
