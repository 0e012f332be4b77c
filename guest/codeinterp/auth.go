package codeinterp

// Who may use the interpreter: the sandbox's access token, verified by envd,
// and JSON bodies only. See doc.go for why it is done this way.

import (
	"context"
	"errors"
	"mime"
	"net/http"
	"strconv"
	"strings"
)

// accessTokenHeader carries the sandbox's envd access token, as the SDKs send
// it to envd and to POST /execute.
const accessTokenHeader = "X-Access-Token"

// envdAuthPath is envd's token check: 204 for the sandbox's token, 401 for
// any other, 503 while envd has none (before /init).
const envdAuthPath = "/auth"

// Why a request was refused.
var (
	// errUnauthorized: no token where one is required, a wrong token, or
	// more than one. Answered 401.
	errUnauthorized = errors.New("unauthorized")
	// errAuthUnavailable: the token cannot be checked, because the sandbox
	// has none yet (envd awaits /init) or envd does not answer. Answered
	// 503: it fails closed.
	errAuthUnavailable = errors.New("authentication unavailable")
)

// The bodies of the refusals, plain text as E2B's interpreter answers them.
const (
	msgUnauthorized      = "Unauthorized: send the sandbox's access token in " + accessTokenHeader
	msgAuthUnavailable   = "Authentication unavailable: the sandbox's access token cannot be checked yet"
	msgUnsupportedMedium = "Content-Type must be application/json"
)

// verifyToken asks envd whether token is the sandbox's access token ("" asks
// whether the sandbox has one at all: 401 then means it has). It returns nil
// for the token, errUnauthorized when envd says it is not, and
// errAuthUnavailable for anything else.
func (s *Server) verifyToken(ctx context.Context, token string) error {
	if s.opts.EnvdURL == "" {
		return errAuthUnavailable
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(s.opts.EnvdURL, "/")+envdAuthPath, nil)
	if err != nil {
		return errAuthUnavailable
	}
	if token != "" {
		req.Header.Set(accessTokenHeader, token)
	}
	resp, err := s.http.Do(req)
	if err != nil {
		s.log.Warn("checking an access token with envd", "err", err)
		return errAuthUnavailable
	}
	resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusNoContent:
		return nil
	case http.StatusUnauthorized:
		return errUnauthorized
	}
	s.log.Debug("envd cannot check access tokens", "status", resp.Status)
	return errAuthUnavailable
}

// tokenRequired reports whether a request must carry the access token. The
// @e2b/code-interpreter SDKs (JS 2.8, Python alike) send it only with
// POST /execute, the one route that runs code; their context calls
// (create, list, restart, remove) carry none, so demanding it there would
// break them. Those calls are still refused before /init, refused with a
// wrong token, and held to JSON bodies.
func tokenRequired(r *http.Request) bool {
	return r.URL.Path != "/contexts" && !strings.HasPrefix(r.URL.Path, "/contexts/")
}

// guard puts the access-token and content-type checks in front of next.
// Only GET /health is open: the template's ready command polls it.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		switch err := s.authorize(r); {
		case errors.Is(err, errUnauthorized):
			plain(w, http.StatusUnauthorized, msgUnauthorized)
			return
		case err != nil:
			plain(w, http.StatusServiceUnavailable, msgAuthUnavailable)
			return
		}
		if ct, ok := jsonBody(r); !ok {
			plain(w, http.StatusUnsupportedMediaType, msgUnsupportedMedium+", not "+ct)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// authorize admits a request whose token envd confirms, or a token-less
// context call (tokenRequired) once the sandbox has a token.
func (s *Server) authorize(r *http.Request) error {
	tokens := r.Header.Values(accessTokenHeader)
	if len(tokens) > 1 {
		return errUnauthorized
	}
	var token string
	if len(tokens) == 1 {
		if token = tokens[0]; token == "" {
			return errUnauthorized
		}
	}
	required := tokenRequired(r)
	if token == "" && required {
		return errUnauthorized
	}
	err := s.verifyToken(r.Context(), token)
	if token == "" && errors.Is(err, errUnauthorized) {
		// envd has a token and was not shown one: the sandbox is
		// handed out, and this call may come without it.
		return nil
	}
	return err
}

// jsonBody refuses a POST, PUT or PATCH whose Content-Type is not
// application/json. Both SDKs send it on every call; a web page cannot send
// it cross-site without a CORS preflight, which this server never grants, so
// the check is what keeps a page a user visits from driving the interpreter
// with a "simple" text/plain or form POST.
// It returns what was sent instead, quoted, when it refuses.
func jsonBody(r *http.Request) (string, bool) {
	switch r.Method {
	case http.MethodPost, http.MethodPut, http.MethodPatch:
	default:
		return "", true
	}
	ct := r.Header.Get("Content-Type")
	if mt, _, err := mime.ParseMediaType(ct); err == nil && mt == "application/json" {
		return "", true
	}
	if ct == "" {
		return "none", false
	}
	return strconv.Quote(ct), false
}
