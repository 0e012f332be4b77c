// Package api serves E2B's control-plane REST API (sandbox create, connect,
// list, get, kill, timeouts, pause/resume, metrics) over the orchestrator,
// authenticated by API key. Errors always take E2B's shape:
// {"code": <http status>, "message": "…"}.
package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"time"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/store"
)

// ClientID is the constant client id E2B puts in every sandbox object.
const ClientID = "6532622b"

// maxBody bounds every request body; the control plane never needs more.
const maxBody = 1 << 20

// Options configure the API.
type Options struct {
	Orchestrator *orchestrator.Orchestrator
	Store        *store.Store
	// EnvdVersion is advertised in every sandbox object.
	EnvdVersion string
	// Domain, when set, is returned as the sandbox domain so that SDKs build
	// <port>-<id>.<domain> URLs.
	Domain string
	Logger *slog.Logger
}

// Server is the control-plane HTTP handler.
type Server struct {
	opts Options
	log  *slog.Logger
	mux  *http.ServeMux
}

// New returns the API handler.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	s := &Server{opts: opts, log: opts.Logger, mux: http.NewServeMux()}
	s.routes()
	return s
}

func (s *Server) routes() {
	m := s.mux
	m.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	auth := s.authenticated
	m.Handle("POST /sandboxes", auth(s.create(1)))
	m.Handle("POST /v2/sandboxes", auth(s.create(2)))
	m.Handle("GET /sandboxes", auth(http.HandlerFunc(s.listV1)))
	m.Handle("GET /v2/sandboxes", auth(http.HandlerFunc(s.listV2)))
	m.Handle("GET /sandboxes/{id}", auth(http.HandlerFunc(s.get)))
	m.Handle("DELETE /sandboxes/{id}", auth(http.HandlerFunc(s.kill)))
	m.Handle("POST /sandboxes/{id}/connect", auth(http.HandlerFunc(s.connect)))
	m.Handle("POST /v2/sandboxes/{id}/connect", auth(http.HandlerFunc(s.connect)))
	m.Handle("POST /sandboxes/{id}/timeout", auth(http.HandlerFunc(s.setTimeout)))
	m.Handle("POST /sandboxes/{id}/refreshes", auth(http.HandlerFunc(s.refresh)))
	m.Handle("POST /sandboxes/{id}/pause", auth(http.HandlerFunc(s.pause)))
	m.Handle("POST /sandboxes/{id}/resume", auth(http.HandlerFunc(s.resume)))
	m.Handle("GET /sandboxes/{id}/metrics", auth(http.HandlerFunc(s.metrics)))

	// Not yet served: answered plainly rather than with a fake result.
	notYet := func(what string) http.Handler {
		return auth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			writeError(w, http.StatusNotImplemented, what+" is not implemented by this cubicle server yet")
		}))
	}
	m.Handle("PUT /sandboxes/{id}/network", auth(http.HandlerFunc(s.updateNetwork)))
	m.Handle("POST /sandboxes/{id}/snapshots", notYet("sandbox snapshots"))
	m.Handle("GET /snapshots", notYet("sandbox snapshots"))
	m.Handle("POST /sandboxes/{id}/fork", notYet("forking sandboxes"))
	for _, p := range []string{"/templates", "/templates/", "/v2/templates", "/v2/templates/", "/v3/templates", "/v3/templates/"} {
		m.Handle(p, notYet("building templates through the API"))
	}
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path))
	})
}

// ServeHTTP serves the API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// CORS open, as E2B's API: browsers running the SDK must reach it.
	w.Header().Set("Access-Control-Allow-Origin", "*")
	if r.Method == http.MethodOptions {
		w.Header().Set("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS")
		w.Header().Set("Access-Control-Allow-Headers", "*")
		w.Header().Set("Access-Control-Expose-Headers", "X-Next-Token, X-Total-Running")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	s.mux.ServeHTTP(w, r)
}

type apiKeyCtx struct{}

func (s *Server) authenticated(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.Header.Get("X-API-KEY")
		if key == "" {
			writeError(w, http.StatusUnauthorized, "missing API key: send it in the X-API-KEY header")
			return
		}
		k, err := s.opts.Store.VerifyAPIKey(r.Context(), key)
		if errors.Is(err, store.ErrNotFound) {
			writeError(w, http.StatusUnauthorized, "invalid API key")
			return
		}
		if err != nil {
			s.log.Error("verifying API key", "err", err)
			writeError(w, http.StatusInternalServerError, "cannot verify API key")
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), apiKeyCtx{}, k.ID)))
	})
}

// apiError is E2B's error shape.
type apiError struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, apiError{Code: code, Message: msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	if err := json.NewEncoder(w).Encode(v); err != nil {
		slog.Debug("writing response", "err", err)
	}
}

// readBody reads a request body, refusing more than maxBody bytes.
func readBody(r *http.Request) ([]byte, error) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return nil, fmt.Errorf("reading body: %w", err)
	}
	if len(body) > maxBody {
		return nil, fmt.Errorf("body larger than %d bytes", maxBody)
	}
	return body, nil
}

// decode reads a JSON body into v. An empty body is allowed when emptyOK:
// several endpoints take an optional object.
func decode(r *http.Request, v any, emptyOK bool) error {
	body, err := readBody(r)
	if err != nil {
		return err
	}
	return decodeBytes(body, v, emptyOK)
}

func decodeBytes(body []byte, v any, emptyOK bool) error {
	if len(bytes.TrimSpace(body)) == 0 {
		if emptyOK {
			return nil
		}
		return fmt.Errorf("%w: request body is empty: a JSON object is required", orchestrator.ErrInvalid)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%w: malformed JSON body: %v", orchestrator.ErrInvalid, err)
	}
	return nil
}

// fail maps an orchestrator error to the E2B error response.
func (s *Server) fail(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, orchestrator.ErrNotFound):
		writeError(w, http.StatusNotFound, "sandbox not found")
	case errors.Is(err, orchestrator.ErrTemplateNotFound):
		writeError(w, http.StatusNotFound, err.Error())
	case errors.Is(err, orchestrator.ErrAlreadyPaused):
		writeError(w, http.StatusConflict, "sandbox is already paused")
	case errors.Is(err, orchestrator.ErrNotPaused):
		writeError(w, http.StatusConflict, "sandbox is already running")
	case errors.Is(err, orchestrator.ErrInvalid):
		writeError(w, http.StatusBadRequest, err.Error())
	case errors.Is(err, orchestrator.ErrHostFull):
		// E2B's answer when a team is at its sandbox limit; the SDKs raise
		// it as a RateLimitError carrying the message. No Retry-After: the
		// SDKs would wait and retry on it, and a full host may stay full.
		writeError(w, http.StatusTooManyRequests, err.Error())
	case errors.Is(err, orchestrator.ErrClosed):
		writeError(w, http.StatusServiceUnavailable, "server is shutting down")
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		writeError(w, http.StatusServiceUnavailable, "request cancelled or timed out: "+err.Error())
	default:
		s.log.Error("request failed", "err", err)
		writeError(w, http.StatusInternalServerError, err.Error())
	}
}

// seconds converts a JSON timeout in seconds to a duration, refusing the
// values that would overflow it.
func seconds(n int64) (time.Duration, error) {
	if n < 0 {
		return 0, fmt.Errorf("%w: timeout must not be negative", orchestrator.ErrInvalid)
	}
	if n > int64(365*24*time.Hour/time.Second) {
		return 0, fmt.Errorf("%w: timeout of %d seconds is too large", orchestrator.ErrInvalid, n)
	}
	return time.Duration(n) * time.Second, nil
}
