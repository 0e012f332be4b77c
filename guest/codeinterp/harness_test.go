package codeinterp

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/guest/envd"
)

// testPython is the interpreter the tests drive: Debian's, where
// python3-ipykernel installs (scripts/deps.sh --test). A python3 earlier in
// PATH (pyenv and the like) usually lacks ipykernel.
const testPython = "/usr/bin/python3"

// needKernel skips a test when ipykernel is missing, except under CI
// (CI=true), where a missing dependency must fail the run.
func needKernel(t testing.TB, modules ...string) {
	t.Helper()
	mods := append([]string{"ipykernel"}, modules...)
	code := "import " + strings.Join(mods, ", ")
	if out, err := exec.Command(testPython, "-c", code).CombinedOutput(); err != nil {
		msg := fmt.Sprintf("%s cannot %q (install with scripts/deps.sh --test): %v\n%s", testPython, code, err, out)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

// testServer is a Server behind an httptest server.
type testServer struct {
	*Server
	url string
	// token is the sandbox's access token; client sends it.
	token  string
	client *http.Client
}

// testEnvd is a real envd, as the interpreter finds it in a sandbox.
type testEnvd struct {
	url string
}

func startEnvd(t testing.TB) *testEnvd {
	t.Helper()
	ed, err := envd.NewServer(envd.Options{
		RunDir:   "-",
		SetClock: func(time.Time) error { return nil },
		Logger:   slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	es := httptest.NewServer(ed.Handler())
	t.Cleanup(func() {
		es.Close()
		ed.Close(context.Background())
	})
	return &testEnvd{url: es.URL}
}

// init sends envd the /init the orchestrator sends when it hands the
// sandbox out.
func (e *testEnvd) init(t testing.TB, token string, env map[string]string) {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"accessToken": token, "envVars": env})
	resp, err := http.Post(e.url+"/init", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("envd /init: %s", resp.Status)
	}
}

// newToken returns a random access token.
func newToken(t testing.TB) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// newTestServer starts a server. Without opts.EnvdURL it also starts an envd
// and initialises it with a token, as a handed-out sandbox is; with one, the
// caller owns envd's /init and sets the token (setToken).
func newTestServer(t testing.TB, opts Options) *testServer {
	t.Helper()
	needKernel(t)
	var token string
	if opts.EnvdURL == "" {
		e := startEnvd(t)
		token = newToken(t)
		e.init(t, token, nil)
		opts.EnvdURL = e.url
	}
	if opts.Python == "" {
		opts.Python = testPython
	}
	if opts.Cwd == "" {
		opts.Cwd = t.TempDir()
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	s := New(opts)
	s.keepalive = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(func() {
		hs.Close()
		s.Close()
	})
	ts := &testServer{Server: s, url: hs.URL, token: token}
	ts.client = &http.Client{Transport: tokenTransport{ts}}
	return ts
}

// tokenTransport adds the server's current token to requests that carry
// none, as the SDK does.
type tokenTransport struct{ s *testServer }

func (tt tokenTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if tt.s.token != "" && r.Header.Get(accessTokenHeader) == "" {
		r = r.Clone(r.Context())
		r.Header.Set(accessTokenHeader, tt.s.token)
	}
	return http.DefaultTransport.RoundTrip(r)
}

// testWriter sends log lines to t.Log, so they show only for failing tests.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// execution is the parsed /execute stream.
type execution struct {
	events []map[string]any
}

// exec posts body to /execute and reads the whole stream.
func (s *testServer) exec(t testing.TB, body any) execution {
	t.Helper()
	resp := s.post(t, "/execute", body)
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("POST /execute %v: %s: %s", body, resp.Status, b)
	}
	return readExecution(t, resp.Body)
}

func readExecution(t testing.TB, r io.Reader) execution {
	t.Helper()
	var ex execution
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		var ev map[string]any
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("line %q is not JSON: %v", sc.Text(), err)
		}
		ex.events = append(ex.events, ev)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("reading /execute stream: %v", err)
	}
	if n := len(ex.events); n == 0 || ex.events[n-1]["type"] != typeEnd {
		t.Fatalf("stream does not end with end_of_execution: %v", ex.events)
	}
	for _, ev := range ex.events[:len(ex.events)-1] {
		if ev["type"] == typeEnd {
			t.Fatalf("end_of_execution before the end: %v", ex.events)
		}
	}
	return ex
}

// abandon starts an execution of body and walks away once it runs, as a
// client that aborts or times out does.
func (s *testServer) abandon(t testing.TB, body any) {
	t.Helper()
	j, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.url+"/execute", bytes.NewReader(j))
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	// Read until the cell is running, then walk away.
	if _, err := resp.Body.Read(make([]byte, 256)); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
}

// run executes code in the default Python context.
func (s *testServer) run(t testing.TB, code string) execution {
	t.Helper()
	return s.exec(t, map[string]any{"code": code})
}

func (s *testServer) post(t testing.TB, path string, body any) *http.Response {
	t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		r = strings.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		r = bytes.NewReader(j)
	}
	resp, err := s.client.Post(s.url+path, "application/json", r)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	return resp
}

func (s *testServer) do(t testing.TB, method, path string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, s.url+path, nil)
	if method == http.MethodPost {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := s.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// newContext creates a context and returns its id.
func (s *testServer) newContext(t testing.TB, body any) codeContext {
	t.Helper()
	resp := s.post(t, "/contexts", body)
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /contexts %v: %s: %s", body, resp.Status, b)
	}
	var c codeContext
	if err := json.Unmarshal(b, &c); err != nil {
		t.Fatalf("POST /contexts: %v: %s", err, b)
	}
	return c
}

// Accessors over an execution's events.

func (e execution) ofType(typ string) []map[string]any {
	var out []map[string]any
	for _, ev := range e.events {
		if ev["type"] == typ {
			out = append(out, ev)
		}
	}
	return out
}

func (e execution) stream(name string) string {
	var b strings.Builder
	for _, ev := range e.ofType(name) {
		b.WriteString(ev["text"].(string))
	}
	return b.String()
}

// text is the main result's text, as the SDK's Execution.text.
func (e execution) text() string {
	for _, ev := range e.ofType(typeResult) {
		if ev["is_main_result"] == true {
			s, _ := ev["text"].(string)
			return s
		}
	}
	return ""
}

func (e execution) err() map[string]any {
	errs := e.ofType(typeError)
	if len(errs) == 0 {
		return nil
	}
	return errs[0]
}

func (e execution) mustSucceed(t testing.TB) execution {
	t.Helper()
	if err := e.err(); err != nil {
		t.Fatalf("execution failed: %v", err)
	}
	return e
}
