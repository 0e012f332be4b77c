package codeinterp

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// request is one raw request to the interpreter; tokens are sent as given
// (none when nil), never added by the test client.
type request struct {
	method, path string
	contentType  string
	tokens       []string
	body         string
}

func (s *testServer) raw(t *testing.T, rq request) (int, string, http.Header) {
	t.Helper()
	req, err := http.NewRequest(rq.method, s.url+rq.path, strings.NewReader(rq.body))
	if err != nil {
		t.Fatal(err)
	}
	if rq.contentType != "" {
		req.Header.Set("Content-Type", rq.contentType)
	}
	for _, tok := range rq.tokens {
		req.Header.Add(accessTokenHeader, tok)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

// TestAccessToken checks that the interpreter demands the sandbox's access
// token as envd does, verified by the real envd: refused before /init (a
// pooled sandbox) but for /health, then 401 without the token or with a
// wrong one, and no code runs for a refused request.
func TestAccessToken(t *testing.T) {
	e := startEnvd(t)
	s := newTestServer(t, Options{EnvdURL: e.url})
	marker := filepath.Join(t.TempDir(), "ran")
	j, _ := json.Marshal(map[string]string{"code": "open(" + pyString(marker) + ", 'w').close()"})
	code := string(j)
	const ct = "application/json"

	// Pooled: envd has no token yet.
	if status, body, _ := s.raw(t, request{method: "GET", path: "/health"}); status != http.StatusOK {
		t.Fatalf("/health before /init: %d %s", status, body)
	}
	before := []struct {
		name string
		rq   request
		want int
	}{
		{"execute, no token", request{method: "POST", path: "/execute", contentType: ct, body: code}, 401},
		{"execute, a token", request{method: "POST", path: "/execute", contentType: ct, tokens: []string{"guess"}, body: code}, 503},
		{"create a context", request{method: "POST", path: "/contexts", contentType: ct, body: `{}`}, 503},
		{"list contexts", request{method: "GET", path: "/contexts"}, 503},
	}
	for _, tt := range before {
		if status, body, _ := s.raw(t, tt.rq); status != tt.want {
			t.Errorf("before /init, %s: %d %q, want %d", tt.name, status, body, tt.want)
		}
	}

	token := newToken(t)
	e.init(t, token, nil)
	refused := []struct {
		name string
		rq   request
		want int
	}{
		{"no token", request{method: "POST", path: "/execute", contentType: ct, body: code}, 401},
		{"empty token", request{method: "POST", path: "/execute", contentType: ct, tokens: []string{""}, body: code}, 401},
		{"wrong token", request{method: "POST", path: "/execute", contentType: ct, tokens: []string{"wrong"}, body: code}, 401},
		{"a prefix of the token", request{method: "POST", path: "/execute", contentType: ct, tokens: []string{token[:len(token)-1]}, body: code}, 401},
		{"two tokens", request{method: "POST", path: "/execute", contentType: ct, tokens: []string{token, "wrong"}, body: code}, 401},
		{"text/plain, no token", request{method: "POST", path: "/execute", contentType: "text/plain", body: code}, 401},
		{"text/plain", request{method: "POST", path: "/execute", contentType: "text/plain;charset=UTF-8", tokens: []string{token}, body: code}, 415},
		{"form", request{method: "POST", path: "/execute", contentType: "application/x-www-form-urlencoded", tokens: []string{token}, body: code}, 415},
		{"no content type", request{method: "POST", path: "/execute", tokens: []string{token}, body: code}, 415},
		{"a context, wrong token", request{method: "POST", path: "/contexts", contentType: ct, tokens: []string{"wrong"}, body: `{}`}, 401},
		{"a context, text/plain", request{method: "POST", path: "/contexts", contentType: "text/plain", body: `{}`}, 415},
		{"list, wrong token", request{method: "GET", path: "/contexts", tokens: []string{"wrong"}}, 401},
		{"delete, wrong token", request{method: "DELETE", path: "/contexts/x", tokens: []string{"wrong"}}, 401},
		{"unknown path", request{method: "GET", path: "/nothing"}, 401},
	}
	for _, tt := range refused {
		status, body, hdr := s.raw(t, tt.rq)
		if status != tt.want {
			t.Errorf("%s: %d %q, want %d", tt.name, status, body, tt.want)
		}
		if hdr.Get("Cache-Control") != "no-store" {
			t.Errorf("%s: Cache-Control %q", tt.name, hdr.Get("Cache-Control"))
		}
		if want := map[int]string{401: "Unauthorized", 415: "application/json"}[tt.want]; !strings.Contains(body, want) || !strings.HasPrefix(hdr.Get("Content-Type"), "text/plain") {
			t.Errorf("%s: body %q (%s), want plain text with %q", tt.name, body, hdr.Get("Content-Type"), want)
		}
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("a refused request ran its code")
	}

	// The token opens it.
	s.token = token
	s.run(t, "import os; os.getpid()").mustSucceed(t)
	if status, body, _ := s.raw(t, request{method: "POST", path: "/execute", contentType: "application/json; charset=utf-8", tokens: []string{token}, body: code}); status != http.StatusOK {
		t.Fatalf("the right token: %d %s", status, body)
	}
	if _, err := os.Stat(marker); err != nil {
		t.Fatalf("the accepted cell did not run: %v", err)
	}
	// The SDKs send no token with their context calls: those work once the
	// sandbox is handed out.
	if status, body, _ := s.raw(t, request{method: "POST", path: "/contexts", contentType: ct, body: `{"language":"bash"}`}); status != http.StatusOK {
		t.Errorf("token-less context create: %d %s", status, body)
	}
	if status, body, _ := s.raw(t, request{method: "GET", path: "/contexts"}); status != http.StatusOK || !strings.Contains(body, `"bash"`) {
		t.Errorf("token-less list: %d %s", status, body)
	}
	if status, body, _ := s.raw(t, request{method: "GET", path: "/health"}); status != http.StatusOK {
		t.Errorf("/health: %d %s", status, body)
	}
}

// TestNoEnvdFailsClosed checks that a server that cannot ask envd refuses
// everything but /health.
func TestNoEnvdFailsClosed(t *testing.T) {
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	for _, envdURL := range []string{"", gone.URL} {
		s := New(Options{EnvdURL: envdURL, Cwd: t.TempDir()})
		t.Cleanup(func() { s.Close() })
		h := s.Handler()
		for _, rq := range []request{
			{method: "POST", path: "/execute", contentType: "application/json", tokens: []string{"some-token"}, body: `{"code":"1"}`},
			{method: "GET", path: "/contexts"},
		} {
			req := httptest.NewRequest(rq.method, rq.path, strings.NewReader(rq.body))
			req.Header.Set("Content-Type", rq.contentType)
			for _, tok := range rq.tokens {
				req.Header.Add(accessTokenHeader, tok)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "Authentication unavailable") {
				t.Errorf("envd %q, %s %s: %d %q", envdURL, rq.method, rq.path, rec.Code, rec.Body.String())
			}
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/health", nil))
		if rec.Code != http.StatusServiceUnavailable || rec.Body.String() != "starting" {
			t.Errorf("envd %q: /health %d %q (want the server's own answer)", envdURL, rec.Code, rec.Body.String())
		}
	}
}
