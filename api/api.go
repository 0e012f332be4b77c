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
	"net/netip"
	"strconv"
	"time"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/store"
	"github.com/cubicle-dev/cubicle/volume"
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
	// TrustedProxies are the peers whose X-Forwarded-For is believed when
	// the failed-authentication limit finds a request's source; by default
	// none is, and the peer's own address counts.
	TrustedProxies []netip.Prefix
	// CORSOrigins are the browser origins allowed to call the API; "*" is
	// any. Nil means DefaultCORSOrigins.
	CORSOrigins []string
	// Templates serves template builds; nil answers them with 501.
	Templates *Templates
	// Isolation names the sandbox backend ("microvm", "gvisor"), which
	// GET /health reports.
	Isolation string
	// Volumes keeps the volumes' files (volumes.go); nil answers the
	// volume endpoints with 501.
	Volumes *volume.Dirs
	Logger  *slog.Logger
}

// Server is the control-plane HTTP handler.
type Server struct {
	opts    Options
	log     *slog.Logger
	mux     *http.ServeMux
	authLim *authLimiter
	cors    corsPolicy
	// uploadKey signs the upload URLs of template builds.
	uploadKey []byte
	vols      volumeLocks
}

// New returns the API handler.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.CORSOrigins == nil {
		opts.CORSOrigins = DefaultCORSOrigins
	}
	s := &Server{opts: opts, log: opts.Logger, mux: http.NewServeMux(), authLim: newAuthLimiter(), cors: newCORSPolicy(opts.CORSOrigins)}
	s.routes()
	return s
}

func (s *Server) routes() {
	m := s.mux
	m.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		body := map[string]string{"status": "ok"}
		if s.opts.Isolation != "" {
			body["isolation"] = s.opts.Isolation
		}
		writeJSON(w, http.StatusOK, body)
	})
	auth := s.authenticated
	m.Handle("POST /sandboxes", auth(s.create(1)))
	m.Handle("POST /v2/sandboxes", auth(s.create(2)))
	m.Handle("GET /sandboxes", auth(http.HandlerFunc(s.listV1)))
	m.Handle("GET /v2/sandboxes", auth(http.HandlerFunc(s.listV2)))
	// Every route that names a sandbox goes through sandboxRoute: the tenant
	// wall (owner.go).
	sandboxRoute := func(pattern string, h sandboxHandler) { m.Handle(pattern, auth(s.owned(h))) }
	sandboxRoute("GET /sandboxes/{id}", s.get)
	sandboxRoute("DELETE /sandboxes/{id}", s.kill)
	sandboxRoute("POST /sandboxes/{id}/connect", s.connect)
	sandboxRoute("POST /v2/sandboxes/{id}/connect", s.connect)
	sandboxRoute("POST /sandboxes/{id}/timeout", s.setTimeout)
	sandboxRoute("POST /sandboxes/{id}/refreshes", s.refresh)
	sandboxRoute("POST /sandboxes/{id}/pause", s.pause)
	sandboxRoute("POST /sandboxes/{id}/resume", s.resume)
	sandboxRoute("GET /sandboxes/{id}/metrics", s.metrics)
	sandboxRoute("PUT /sandboxes/{id}/network", s.updateNetwork)
	s.volumeRoutes(m, auth) // volumes.go

	// Not yet served: answered plainly rather than with a fake result.
	notYet := func(what string) http.Handler {
		return auth(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			writeError(w, http.StatusNotImplemented, what+" is not implemented by this cubicle server yet")
		}))
	}
	sandboxRoute("POST /sandboxes/{id}/snapshots", s.createSnapshot)
	m.Handle("GET /snapshots", auth(http.HandlerFunc(s.listSnapshots)))
	sandboxRoute("POST /sandboxes/{id}/fork", s.fork)
	sandboxRoute("POST /sandboxes/{id}/rollback", s.rollback) // rollback.go, a cubicle extension
	// Snapshots are templates: deleted as such. Owner-walled by the
	// orchestrator's lookup (another owner's snapshot is not found).
	m.Handle("DELETE /templates/{id}", auth(http.HandlerFunc(s.deleteTemplate)))
	s.templateRoutes(m, auth)
	for _, p := range []string{"/templates", "/templates/", "/v2/templates", "/v2/templates/", "/v3/templates", "/v3/templates/"} {
		m.Handle(p, notYet("this template endpoint"))
	}
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path))
	})
}

// ServeHTTP serves the API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.cors.handle(w, r) {
		return
	}
	s.mux.ServeHTTP(w, r)
}

type apiKeyCtx struct{}

func (s *Server) authenticated(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.Header.Get("X-API-KEY")
		if key == "" {
			// Not a guess: costs nothing, and is not counted, so that a web
			// page cannot spend a visitor's budget with simple requests.
			writeError(w, http.StatusUnauthorized, "missing API key: send it in the X-API-KEY header")
			return
		}
		src := sourceOf(r, s.opts.TrustedProxies)
		if ok, wait := s.authLim.take(src, time.Now()); !ok {
			w.Header().Set("Retry-After", strconv.Itoa(int(wait/time.Second)+1))
			writeError(w, http.StatusTooManyRequests, "too many requests with invalid API keys from this address: retry later")
			return
		}
		k, err := s.opts.Store.VerifyAPIKey(r.Context(), key)
		if errors.Is(err, store.ErrNotFound) {
			writeError(w, http.StatusUnauthorized, "invalid API key")
			return
		}
		s.authLim.refund(src)
		if err != nil {
			s.log.Error("verifying API key", "err", err)
			writeError(w, http.StatusInternalServerError, "cannot verify API key")
			return
		}
		ctx := context.WithValue(r.Context(), apiKeyCtx{}, k.ID)
		next.ServeHTTP(w, r.WithContext(context.WithValue(ctx, ownerCtx{}, ownerOf(k))))
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
	code, msg := s.errorOf(err)
	writeError(w, code, msg)
}

// errorOf is the status and message that answer err.
func (s *Server) errorOf(err error) (int, string) {
	switch {
	case errors.Is(err, orchestrator.ErrNotFound):
		return http.StatusNotFound, "sandbox not found"
	case errors.Is(err, orchestrator.ErrTemplateNotFound):
		return http.StatusNotFound, err.Error()
	case errors.Is(err, orchestrator.ErrAlreadyPaused):
		return http.StatusConflict, "sandbox is already paused"
	case errors.Is(err, orchestrator.ErrNotPaused):
		return http.StatusConflict, "sandbox is already running"
	case errors.Is(err, orchestrator.ErrInvalid):
		return http.StatusBadRequest, err.Error()
	case errors.Is(err, orchestrator.ErrUnsupported):
		return http.StatusNotImplemented, err.Error()
	case errors.Is(err, orchestrator.ErrHostFull):
		// E2B's answer when a team is at its sandbox limit; the SDKs raise
		// it as a RateLimitError carrying the message. No Retry-After: the
		// SDKs would wait and retry on it, and a full host may stay full.
		return http.StatusTooManyRequests, err.Error()
	case errors.Is(err, orchestrator.ErrClosed):
		return http.StatusServiceUnavailable, "server is shutting down"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return http.StatusServiceUnavailable, "request cancelled or timed out: " + err.Error()
	default:
		s.log.Error("request failed", "err", err)
		return http.StatusInternalServerError, err.Error()
	}
}

// secondsOr is seconds of *n, or of def when the body left it out.
func secondsOr(n *int64, def int64) (time.Duration, error) {
	if n != nil {
		def = *n
	}
	return seconds(def)
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
