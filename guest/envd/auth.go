package envd

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/cubicle-dev/cubicle/guest/envd/internal/jsonhttp"
)

// AccessTokenHeader carries the sandbox's envd access token on every request.
const AccessTokenHeader = "X-Access-Token"

// Signature errors, reported to the client as 401 with the error text as message
// (the SDK's tests compare "signature is already expired" verbatim).
var (
	ErrMissingSignature     = errors.New("missing signature query parameter")
	ErrInvalidSignature     = errors.New("invalid signature")
	ErrSignatureExpired     = errors.New("signature is already expired")
	ErrTokenMismatch        = errors.New("access token present in header but does not match")
	ErrUnauthorized         = errors.New("unauthorized access, please provide a valid access token or method signing if supported")
	errInitUnauthorized     = errors.New("envd is already initialized: /init needs the current access token in " + AccessTokenHeader)
	errNoSignatureOperation = errors.New("no signature operation for this method")
	errNoTokenYet           = errors.New("no access token is set yet: envd awaits /init")
)

// Signature operations, by HTTP method of /files.
const (
	SignRead  = "read"
	SignWrite = "write"
)

// accessToken is the secret /init sets; once set, requests must present it.
type accessToken struct {
	mu    sync.RWMutex // guards value
	value string       // "" while unset
}

func (t *accessToken) get() string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.value
}

func (t *accessToken) set(v string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.value = v
}

// matches reports whether presented equals the token, in constant time. An unset
// token matches nothing.
func (t *accessToken) matches(presented string) bool {
	tok := t.get()
	return tok != "" && equalSecret(tok, presented)
}

// equalSecret compares two secrets in time independent of their contents and of
// the length of the presented one (both are hashed to a fixed size first).
func equalSecret(want, got string) bool {
	w, g := sha256.Sum256([]byte(want)), sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(w[:], g[:]) == 1
}

// Sign returns the /files URL signature the E2B SDKs compute for downloadUrl and
// uploadUrl: "v1_" + base64(sha256("<path>:<operation>:<username>:<token>[:<expires>]"))
// without "=" padding. operation is SignRead or SignWrite; expires is unix seconds,
// 0 for a signature that does not expire.
func Sign(path, operation, username, token string, expires int64) string {
	return sign(path, operation, username, token, expires, expires != 0)
}

func sign(path, operation, username, token string, expires int64, hasExpiry bool) string {
	raw := path + ":" + operation + ":" + username + ":" + token
	if hasExpiry {
		raw += ":" + strconv.FormatInt(expires, 10)
	}
	sum := sha256.Sum256([]byte(raw))
	return "v1_" + strings.TrimRight(base64.StdEncoding.EncodeToString(sum[:]), "=")
}

// VerifySignature checks the signature query parameters of a /files request
// (signature, signature_expiration, path, username) for operation against token.
func VerifySignature(q url.Values, operation, token string, now time.Time) error {
	sig := q.Get("signature")
	if sig == "" {
		return ErrMissingSignature
	}
	var exp int64
	expStr := q.Get("signature_expiration")
	hasExpiry := expStr != ""
	if hasExpiry {
		var err error
		if exp, err = strconv.ParseInt(expStr, 10, 64); err != nil {
			return ErrInvalidSignature
		}
	}
	want := sign(q.Get("path"), operation, q.Get("username"), token, exp, hasExpiry)
	if !equalSecret(want, sig) {
		return ErrInvalidSignature
	}
	if hasExpiry && exp < now.Unix() {
		return ErrSignatureExpired
	}
	return nil
}

// authorizeFiles admits a /files request carrying the token, or a valid signature
// for its operation, or any request while no token is set.
func (s *Server) authorizeFiles(r *http.Request) error {
	tok := s.token.get()
	if tok == "" {
		return nil
	}
	if h := r.Header.Get(AccessTokenHeader); h != "" {
		if !equalSecret(tok, h) {
			return ErrTokenMismatch
		}
		return nil
	}
	var op string
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		op = SignRead
	case http.MethodPost:
		op = SignWrite
	default:
		return errNoSignatureOperation
	}
	return VerifySignature(r.URL.Query(), op, tok, time.Now())
}

// verifyToken is GET /auth: it answers 204 when X-Access-Token is the
// sandbox's access token, 401 when it is not, and 503 while /init has set no
// token. It lets the sandbox's other servers (the code interpreter on 49999)
// demand the same token as envd without ever holding a copy of it: envd stays
// the one place the secret lives, a token set or changed by a later /init
// counts at once, and nothing is written to disk. It tells a caller nothing
// that any other authenticated route would not.
func (s *Server) verifyToken(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if s.token.get() == "" {
		jsonhttp.Error(w, http.StatusServiceUnavailable, errNoTokenYet.Error())
		return
	}
	if !s.token.matches(r.Header.Get(AccessTokenHeader)) {
		jsonhttp.Error(w, http.StatusUnauthorized, ErrUnauthorized.Error())
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// isRPC reports whether a request is for one of the Connect services, whose errors
// must be in the Connect protocol's shape rather than envd's JSON.
func isRPC(r *http.Request) bool {
	return strings.HasPrefix(r.URL.Path, "/process.Process/") || strings.HasPrefix(r.URL.Path, "/filesystem.Filesystem/")
}

// authorize enforces the access token. Exempt: GET /health (the proxy probes it),
// POST /init and GET /auth (they check the token themselves: init, verifyToken)
// and /files (token or signature).
func (s *Server) authorize(next http.Handler) http.Handler {
	rpcErrors := connect.NewErrorWriter()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/health" && (r.Method == http.MethodGet || r.Method == http.MethodHead),
			r.URL.Path == "/init" && r.Method == http.MethodPost,
			r.URL.Path == "/auth" && r.Method == http.MethodGet:
		case r.URL.Path == "/files":
			if err := s.authorizeFiles(r); err != nil {
				jsonhttp.Error(w, http.StatusUnauthorized, err.Error())
				return
			}
		case s.token.get() != "" && !s.token.matches(r.Header.Get(AccessTokenHeader)):
			if isRPC(r) {
				_ = rpcErrors.Write(w, r, connect.NewError(connect.CodeUnauthenticated, ErrUnauthorized))
				return
			}
			jsonhttp.Error(w, http.StatusUnauthorized, ErrUnauthorized.Error())
			return
		}
		next.ServeHTTP(w, r)
	})
}
