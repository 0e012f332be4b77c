package envd

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/process"
)

// postInit sends /init with body and fails the test unless envd answers 204.
func postInit(t *testing.T, e *testEnv, body string) {
	t.Helper()
	res := e.do(http.MethodPost, "/init", strings.NewReader(body), map[string]string{"Content-Type": "application/json"})
	if res.StatusCode != http.StatusNoContent {
		t.Fatalf("/init: %d %s", res.StatusCode, readBody(t, res))
	}
	if v := res.Header.Get("X-Envd-Version"); v != Version {
		t.Errorf("X-Envd-Version %q, want %q", v, Version)
	}
}

// jsonError decodes an envd JSON error body.
func jsonError(t *testing.T, res *http.Response) (int, string) {
	t.Helper()
	var body struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}
	if err := json.NewDecoder(res.Body).Decode(&body); err != nil {
		t.Fatalf("error body is not JSON: %v", err)
	}
	if body.Code != res.StatusCode {
		t.Errorf("body code %d, HTTP status %d", body.Code, res.StatusCode)
	}
	return body.Code, body.Message
}

func TestHealthAndHeaders(t *testing.T) {
	e := newEnv(t)
	res := e.do(http.MethodGet, "/health", nil, nil)
	if res.StatusCode != http.StatusNoContent || res.Header.Get("X-Envd-Version") != Version || res.Header.Get("Access-Control-Allow-Origin") != "*" {
		t.Errorf("GET /health: %d %v", res.StatusCode, res.Header)
	}
	res = e.do(http.MethodOptions, "/process.Process/Start", nil, map[string]string{
		"Origin": "https://example.com", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type,x-access-token,connect-timeout-ms",
	})
	if res.StatusCode != http.StatusNoContent || res.Header.Get("Access-Control-Allow-Headers") != "content-type,x-access-token,connect-timeout-ms" {
		t.Errorf("CORS preflight: %d %v", res.StatusCode, res.Header)
	}
	res = e.do(http.MethodGet, "/no/such/endpoint", nil, nil)
	if code, _ := jsonError(t, res); code != http.StatusNotFound {
		t.Errorf("unknown endpoint: %d", code)
	}

	// Cleartext HTTP/2 with prior knowledge works too (for proxies that
	// multiplex); the SDKs use HTTP/1.1.
	var h2c http.Protocols
	h2c.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: &h2c}}
	res, err := client.Get(e.url + "/health")
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.ProtoMajor != 2 || res.StatusCode != http.StatusNoContent {
		t.Errorf("h2c: %s %d", res.Proto, res.StatusCode)
	}
}

func TestInit(t *testing.T) {
	var clockMu sync.Mutex
	var clockSet []time.Time
	e := newEnv(t, func(o *Options) {
		o.SetClock = func(tm time.Time) error {
			clockMu.Lock()
			defer clockMu.Unlock()
			clockSet = append(clockSet, tm)
			return nil
		}
	})
	work := filepath.Join(e.dir, "work")
	if err := os.Mkdir(work, 0o755); err != nil {
		t.Fatal(err)
	}

	// Malformed bodies are refused and change nothing.
	for _, body := range []string{`{`, `[]`, `{"envVars":{"A=B":"x"}}`, `{"defaultWorkdir":"relative"}`, `{"defaultUser":"no-such-user"}`, `{"timestamp":"yesterday"}`, `{} {}`} {
		res := e.do(http.MethodPost, "/init", strings.NewReader(body), nil)
		if code, msg := jsonError(t, res); code != http.StatusBadRequest {
			t.Errorf("/init %s: %d %s, want 400", body, code, msg)
		}
	}

	now := time.Now().UTC().Format(time.RFC3339Nano)
	postInit(t, e, `{"envVars":{"E2B_SANDBOX_ID":"sbx1","E2B_TEMPLATE_ID":"tpl","FOO":"bar"},"accessToken":"secret","defaultUser":"nobody","defaultWorkdir":"`+work+`","timestamp":"`+now+`","unknownField":1}`)
	clockMu.Lock()
	if len(clockSet) != 0 {
		t.Errorf("clock set although it was in sync: %v", clockSet)
	}
	clockMu.Unlock()

	// The token is now required everywhere but /health.
	res := e.do(http.MethodGet, "/envs", nil, nil)
	if code, msg := jsonError(t, res); code != http.StatusUnauthorized || !strings.Contains(msg, "access token") {
		t.Errorf("/envs without token: %d %q", code, msg)
	}
	_, err := e.process.List(e.ctx(5*time.Second), connect.NewRequest(&pb.ListRequest{}))
	if code(err) != connect.CodeUnauthenticated {
		t.Errorf("List without token: %v, want unauthenticated", err)
	}
	st, err := e.process.Start(e.ctx(5*time.Second), connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "true"}}))
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
	}
	if code(err) != connect.CodeUnauthenticated {
		t.Errorf("Start stream without token: %v, want unauthenticated", err)
	}
	bad := e.do(http.MethodGet, "/envs", nil, map[string]string{AccessTokenHeader: "wrong"})
	if bad.StatusCode != http.StatusUnauthorized {
		t.Errorf("/envs with a wrong token: %d", bad.StatusCode)
	}
	if res := e.do(http.MethodGet, "/health", nil, nil); res.StatusCode != http.StatusNoContent {
		t.Errorf("/health must stay open: %d", res.StatusCode)
	}

	// A second /init (code inside the sandbox trying to take it over) needs the token.
	res = e.do(http.MethodPost, "/init", strings.NewReader(`{"accessToken":"stolen"}`), nil)
	if code, _ := jsonError(t, res); code != http.StatusUnauthorized {
		t.Errorf("re-init without token: %d", code)
	}
	res = e.do(http.MethodPost, "/init", strings.NewReader(`{"accessToken":"stolen"}`), map[string]string{AccessTokenHeader: "wrong"})
	if res.StatusCode != http.StatusUnauthorized {
		t.Errorf("re-init with a wrong token: %d", res.StatusCode)
	}

	e.token = "secret"
	res = e.do(http.MethodGet, "/envs", nil, nil)
	var envs map[string]string
	if err := json.NewDecoder(res.Body).Decode(&envs); err != nil || envs["FOO"] != "bar" || envs["E2B_SANDBOX_ID"] != "sbx1" {
		t.Errorf("/envs: %v %v", envs, err)
	}
	r := e.run("", "id -un; pwd; echo $FOO")
	if r.stdout != "nobody\n"+work+"\nbar\n" {
		t.Errorf("process after /init: %q", r.stdout)
	}
	for name, want := range map[string]string{".E2B_SANDBOX": "true", ".E2B_SANDBOX_ID": "sbx1", ".E2B_TEMPLATE_ID": "tpl"} {
		if b, err := os.ReadFile(filepath.Join(e.srv.opts.RunDir, name)); err != nil || string(b) != want {
			t.Errorf("%s: %q %v", name, b, err)
		}
	}

	// With the token: re-init works, a far-off timestamp sets the clock, an empty
	// token does not clear the set one, env vars merge.
	past := time.Now().Add(-time.Hour).UTC().Truncate(time.Second)
	postInit(t, e, `{"accessToken":"","envVars":{"NEW":"1"},"timestamp":"`+past.Format(time.RFC3339)+`"}`)
	clockMu.Lock()
	if len(clockSet) != 1 || !clockSet[0].Equal(past) {
		t.Errorf("clock set to %v, want %v", clockSet, past)
	}
	clockMu.Unlock()
	res = e.do(http.MethodGet, "/envs", nil, nil)
	envs = nil
	_ = json.NewDecoder(res.Body).Decode(&envs)
	if envs["FOO"] != "bar" || envs["NEW"] != "1" {
		t.Errorf("env after second /init: %v", envs)
	}
	postInit(t, e, `{"accessToken":"rotated"}`)
	e.token = "rotated"
	if res := e.do(http.MethodGet, "/envs", nil, nil); res.StatusCode != http.StatusOK {
		t.Errorf("with the rotated token: %d", res.StatusCode)
	}
}

func TestMetrics(t *testing.T) {
	e := newEnv(t)
	res := e.do(http.MethodGet, "/metrics", nil, nil)
	var m map[string]float64
	if err := json.NewDecoder(res.Body).Decode(&m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "mem_cache", "mem_total_mib", "mem_used_mib", "disk_used", "disk_total"} {
		if _, ok := m[k]; !ok {
			t.Errorf("metrics lack %s: %v", k, m)
		}
	}
	if m["cpu_count"] < 1 || m["mem_total"] <= m["mem_used"] || m["mem_total_mib"] != float64(int64(m["mem_total"])>>20) ||
		m["disk_total"] < m["disk_used"] || m["disk_total"] == 0 || m["cpu_used_pct"] < 0 || m["cpu_used_pct"] > 100 ||
		time.Since(time.Unix(int64(m["ts"]), 0)).Abs() > time.Minute {
		t.Errorf("implausible metrics %v", m)
	}
}

// TestMalformedRPC sends broken Connect requests: each gets an error in the
// protocol's shape, and envd keeps serving.
func TestMalformedRPC(t *testing.T) {
	e := newEnv(t)
	cases := []struct {
		path, ctype, body string
		status            int
	}{
		{"/process.Process/List", "application/json", "{not json", http.StatusBadRequest},
		{"/filesystem.Filesystem/Stat", "application/json", `{"path": 5}`, http.StatusBadRequest},
		{"/filesystem.Filesystem/Stat", "application/json", `{"path": "/tmp\u0000x"}`, http.StatusBadRequest},
		{"/process.Process/SendSignal", "application/json", `{"signal":"SIGNAL_NOPE"}`, http.StatusBadRequest},
		{"/process.Process/Start", "application/connect+json", "\x00\x00\x00\x00\x05{bad}", http.StatusOK}, // stream errors travel in the end frame
		{"/process.Process/Nope", "application/json", `{}`, http.StatusNotFound},
	}
	for _, c := range cases {
		res := e.do(http.MethodPost, c.path, strings.NewReader(c.body), map[string]string{"Content-Type": c.ctype})
		body := readBody(t, res)
		if res.StatusCode != c.status {
			t.Errorf("%s %q: %d %s, want %d", c.path, c.body, res.StatusCode, body, c.status)
		}
		if c.status == http.StatusBadRequest && !strings.Contains(body, `"invalid_argument"`) {
			t.Errorf("%s %q: body %s lacks invalid_argument", c.path, c.body, body)
		}
		if c.ctype == "application/connect+json" && !strings.Contains(body, `"invalid_argument"`) {
			t.Errorf("stream error frame %q lacks invalid_argument", body)
		}
	}
	if _, err := e.fs.Stat(e.ctx(5*time.Second), connect.NewRequest(&fspb.StatRequest{Path: "/"})); err != nil {
		t.Errorf("envd stopped serving: %v", err)
	}
}

// TestVerifyToken checks GET /auth, which the sandbox's other servers ask
// whether a presented token is the sandbox's: 503 before /init gave one, then
// 204 for it and 401 for anything else, never cached by a proxy.
func TestVerifyToken(t *testing.T) {
	e := newEnv(t)
	auth := func(hdr map[string]string) *http.Response {
		t.Helper()
		res := e.do(http.MethodGet, "/auth", nil, hdr)
		if cc := res.Header.Get("Cache-Control"); cc != "no-store" {
			t.Errorf("Cache-Control %q", cc)
		}
		return res
	}
	for _, hdr := range []map[string]string{nil, {AccessTokenHeader: "anything"}} {
		if code, msg := jsonError(t, auth(hdr)); code != http.StatusServiceUnavailable || !strings.Contains(msg, "/init") {
			t.Errorf("before /init with %v: %d %q", hdr, code, msg)
		}
	}
	postInit(t, e, `{"accessToken":"right-token"}`)
	if res := auth(map[string]string{AccessTokenHeader: "right-token"}); res.StatusCode != http.StatusNoContent {
		t.Errorf("the right token: %d %s", res.StatusCode, readBody(t, res))
	}
	for _, hdr := range []map[string]string{nil, {AccessTokenHeader: ""}, {AccessTokenHeader: "wrong-token"}, {AccessTokenHeader: "right-toke"}, {AccessTokenHeader: "right-tokenX"}} {
		if code, _ := jsonError(t, auth(hdr)); code != http.StatusUnauthorized {
			t.Errorf("%v: %d, want 401", hdr, code)
		}
	}
	// A second /init with the token changes it: the old one stops counting.
	if res := e.do(http.MethodPost, "/init", strings.NewReader(`{"accessToken":"next-token"}`), map[string]string{AccessTokenHeader: "right-token"}); res.StatusCode != http.StatusNoContent {
		t.Fatalf("changing the token: %d", res.StatusCode)
	}
	if code, _ := jsonError(t, auth(map[string]string{AccessTokenHeader: "right-token"})); code != http.StatusUnauthorized {
		t.Errorf("the old token after a change: %d", code)
	}
	if res := auth(map[string]string{AccessTokenHeader: "next-token"}); res.StatusCode != http.StatusNoContent {
		t.Errorf("the new token: %d", res.StatusCode)
	}
}
