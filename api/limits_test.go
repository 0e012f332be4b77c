package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/orchestrator"
	"github.com/cubicle-dev/cubicle/store"
)

// newTestServer is an API over a real store with one key. It has no
// orchestrator: these tests stay on routes that are refused or answered
// before one is needed.
func newTestServer(t *testing.T, opts Options) (*Server, string) {
	t.Helper()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	_, key, err := st.CreateAPIKey(context.Background(), "test")
	if err != nil {
		t.Fatal(err)
	}
	opts.Store = st
	return New(opts), key
}

// call sends one request from the given peer address.
func call(h http.Handler, from, method, path, key string, hdr map[string]string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, nil)
	r.RemoteAddr = from
	if key != "" {
		r.Header.Set("X-API-KEY", key)
	}
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func isAPIError(w *httptest.ResponseRecorder, code int) bool {
	var e apiError
	return w.Code == code && json.Unmarshal(w.Body.Bytes(), &e) == nil && e.Code == code && e.Message != ""
}

// TestFailedAuthRateLimit: a burst of bad keys from one source is cut off
// with 429 after a small budget; other sources, with good or bad keys, are
// not affected; a forged X-Forwarded-For does not buy a new budget.
func TestFailedAuthRateLimit(t *testing.T) {
	s, good := newTestServer(t, Options{})
	const attacker, bystander = "192.0.2.1:40000", "198.51.100.7:50000"
	// An authenticated route that needs no orchestrator: 501 means "in".
	const path = "/v2/templates"
	const burst = 200
	var unauthorized, limited int
	for i := range burst {
		w := call(s, attacker, "GET", path, fmt.Sprintf("e2b_%040x", i), map[string]string{"X-Forwarded-For": fmt.Sprintf("203.0.113.%d", i%250)})
		switch {
		case isAPIError(w, http.StatusUnauthorized):
			unauthorized++
		case isAPIError(w, http.StatusTooManyRequests):
			limited++
			if w.Header().Get("Retry-After") == "" {
				t.Fatal("429 without Retry-After")
			}
		default:
			t.Fatalf("bad key %d: %d %s", i, w.Code, w.Body)
		}
	}
	t.Logf("%d bad keys: %d answered 401, %d 429", burst, unauthorized, limited)
	if unauthorized < authBurst || limited < burst/2 {
		t.Fatalf("%d answered 401 and %d 429; want the first %d checked and most of the rest refused", unauthorized, limited, authBurst)
	}
	// The throttled source's good key waits too: answering it would tell a
	// guesser when it had hit.
	if w := call(s, attacker, "GET", path, good, nil); !isAPIError(w, http.StatusTooManyRequests) {
		t.Fatalf("good key from the throttled source: %d %s", w.Code, w.Body)
	}
	// A request with no key is no guess and is never throttled.
	if w := call(s, attacker, "GET", path, "", nil); !isAPIError(w, http.StatusUnauthorized) {
		t.Fatalf("no key from the throttled source: %d %s", w.Code, w.Body)
	}
	// Another source is untouched.
	if w := call(s, bystander, "GET", path, good, nil); w.Code != http.StatusNotImplemented {
		t.Fatalf("good key from another source: %d %s", w.Code, w.Body)
	}
	if w := call(s, bystander, "GET", path, "e2b_00", nil); !isAPIError(w, http.StatusUnauthorized) {
		t.Fatalf("bad key from another source: %d %s", w.Code, w.Body)
	}
	// Good keys are not counted against their source.
	for range 3 * authBurst {
		if w := call(s, bystander, "GET", path, good, nil); w.Code != http.StatusNotImplemented {
			t.Fatalf("good keys got throttled: %d %s", w.Code, w.Body)
		}
	}
	// An IPv6 source counts per /64: the next address of the same host is
	// the same source.
	for i := range 2 * authBurst {
		call(s, fmt.Sprintf("[2001:db8::%x]:1", i), "GET", path, "e2b_00", nil)
	}
	if w := call(s, "[2001:db8::ffff]:1", "GET", path, good, nil); !isAPIError(w, http.StatusTooManyRequests) {
		t.Fatalf("another address of a throttled /64: %d %s", w.Code, w.Body)
	}
}

// TestFailedAuthTrustedProxy: behind a proxy the operator trusts, the
// client's address in X-Forwarded-For is the source.
func TestFailedAuthTrustedProxy(t *testing.T) {
	s, good := newTestServer(t, Options{TrustedProxies: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}})
	const proxyPeer = "10.1.2.3:4000"
	for range 3 * authBurst {
		call(s, proxyPeer, "GET", "/v2/templates", "e2b_00", map[string]string{"X-Forwarded-For": "192.0.2.1, 10.9.9.9"})
	}
	if w := call(s, proxyPeer, "GET", "/v2/templates", good, map[string]string{"X-Forwarded-For": "192.0.2.1"}); !isAPIError(w, http.StatusTooManyRequests) {
		t.Fatalf("the throttled client behind the proxy: %d %s", w.Code, w.Body)
	}
	if w := call(s, proxyPeer, "GET", "/v2/templates", good, map[string]string{"X-Forwarded-For": "198.51.100.7"}); w.Code != http.StatusNotImplemented {
		t.Fatalf("another client behind the same proxy: %d %s", w.Code, w.Body)
	}
}

func TestAuthLimiterMemoryBounded(t *testing.T) {
	l := newAuthLimiter()
	l.max = 100
	now := time.Now()
	for i := range 1000 {
		src := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 32)
		for range authBurst + 1 {
			l.take(src, now)
		}
		if len(l.buckets) > l.max {
			t.Fatalf("%d sources held; the bound is %d", len(l.buckets), l.max)
		}
	}
	// The newest source is still throttled: eviction took the stalest.
	last := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 0, 3, 231}), 32)
	if ok, _ := l.take(last, now); ok {
		t.Fatal("the newest throttled source was forgotten")
	}
	// Refilled sources are dropped first and cost nothing to forget.
	later := now.Add(time.Duration(authBurst/authRefill+1) * time.Second)
	l.take(netip.MustParsePrefix("192.0.2.1/32"), later)
	if len(l.buckets) != 1 {
		t.Fatalf("%d sources held after all refilled; want only the new one", len(l.buckets))
	}
}

func TestCreateLimits(t *testing.T) {
	big := func(n int) string { return strings.Repeat("x", n) }
	many := func(n, valueLen int) string {
		parts := make([]string, n)
		for i := range parts {
			parts[i] = fmt.Sprintf("%q:%q", fmt.Sprint("k", i), big(valueLen))
		}
		return "{" + strings.Join(parts, ",") + "}"
	}
	for _, tc := range []struct {
		name, field, value string
		ok                 bool
	}{
		{"metadata at the bounds", "metadata", many(metadataLimits.keys, 200), true},
		{"metadata: too many keys", "metadata", many(metadataLimits.keys+1, 1), false},
		{"metadata: long key", "metadata", fmt.Sprintf(`{%q:"v"}`, big(metadataLimits.keyLen+1)), false},
		{"metadata: long value", "metadata", fmt.Sprintf(`{"k":%q}`, big(metadataLimits.valueLen+1)), false},
		{"metadata: too large in all", "metadata", many(metadataLimits.keys, metadataLimits.valueLen), false},
		{"metadata: empty key", "metadata", `{"":"v"}`, false},
		{"envVars at the bounds", "envVars", many(100, 2000), true},
		{"envVars: too many", "envVars", many(envVarLimits.keys+1, 1), false},
		{"envVars: long value", "envVars", fmt.Sprintf(`{"K":%q}`, big(envVarLimits.valueLen+1)), false},
		{"envVars: too large in all", "envVars", many(envVarLimits.keys, envVarLimits.valueLen/2), false},
		{"envVars: '=' in a name", "envVars", `{"A=B":"v"}`, false},
		{"envVars: NUL in a value", "envVars", `{"A":"a\u0000b"}`, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseNewSandbox([]byte(fmt.Sprintf(`{"templateID":"base",%q:%s}`, tc.field, tc.value)), 2)
			if tc.ok != (err == nil) {
				t.Fatalf("got %v", err)
			}
			if err != nil && (!errors.Is(err, orchestrator.ErrInvalid) || !strings.Contains(err.Error(), tc.field)) {
				t.Fatalf("error %q is not a 400 naming %s", err, tc.field)
			}
		})
	}
}

func TestCORS(t *testing.T) {
	preflight := map[string]string{"Origin": "https://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key, content-type"}
	t.Run("default: any origin, explicit headers", func(t *testing.T) {
		s, _ := newTestServer(t, Options{})
		w := call(s, "192.0.2.1:1", "OPTIONS", "/v2/sandboxes", "", preflight)
		h := w.Header()
		if w.Code != http.StatusNoContent || h.Get("Access-Control-Allow-Origin") != "*" || h.Get("Access-Control-Allow-Credentials") != "" {
			t.Fatalf("preflight: %d %v", w.Code, h)
		}
		allowed := strings.ToLower(h.Get("Access-Control-Allow-Headers"))
		for _, want := range []string{"x-api-key", "content-type", "lang_version", "package_version"} {
			if !strings.Contains(allowed, want) {
				t.Fatalf("Allow-Headers %q lacks %s", allowed, want)
			}
		}
		if strings.Contains(allowed, "*") || strings.Contains(h.Get("Access-Control-Allow-Methods"), "*") {
			t.Fatalf("wildcards in %v", h)
		}
		// The real answer carries the origin and the headers a page may read.
		w = call(s, "192.0.2.1:1", "GET", "/health", "", map[string]string{"Origin": "https://app.example"})
		if w.Header().Get("Access-Control-Allow-Origin") != "*" || !strings.Contains(w.Header().Get("Access-Control-Expose-Headers"), "X-Total-Running") {
			t.Fatalf("GET with Origin: %v", w.Header())
		}
	})
	t.Run("an allow-list", func(t *testing.T) {
		s, _ := newTestServer(t, Options{CORSOrigins: []string{"https://app.example"}})
		w := call(s, "192.0.2.1:1", "OPTIONS", "/v2/sandboxes", "", preflight)
		if w.Code != http.StatusNoContent || w.Header().Get("Access-Control-Allow-Origin") != "https://app.example" || !strings.Contains(strings.Join(w.Header().Values("Vary"), ","), "Origin") {
			t.Fatalf("listed origin: %d %v", w.Code, w.Header())
		}
		other := map[string]string{"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"}
		w = call(s, "192.0.2.1:1", "OPTIONS", "/sandboxes/x", "", other)
		if !isAPIError(w, http.StatusForbidden) || w.Header().Get("Access-Control-Allow-Origin") != "" {
			t.Fatalf("unlisted origin: %d %v", w.Code, w.Header())
		}
		w = call(s, "192.0.2.1:1", "GET", "/health", "", map[string]string{"Origin": "https://evil.example"})
		if w.Header().Get("Access-Control-Allow-Origin") != "" {
			t.Fatalf("unlisted origin can read: %v", w.Header())
		}
	})
}

func TestParseCORSOrigins(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want string
		ok   bool
	}{
		{[]string{"*"}, "*", true},
		{[]string{"https://App.Example", " http://localhost:5173 "}, "https://app.example,http://localhost:5173", true},
		{[]string{""}, "", true},
		{[]string{"https://a.example/"}, "https://a.example", true},
		{[]string{"*", "https://a.example"}, "", false},
		{[]string{"a.example"}, "", false},
		{[]string{"https://a.example/path"}, "", false},
		{[]string{"ftp://a.example"}, "", false},
		{[]string{"https://user@a.example"}, "", false},
	} {
		got, err := ParseCORSOrigins(tc.in)
		if tc.ok != (err == nil) || (tc.ok && strings.Join(got, ",") != tc.want) {
			t.Errorf("ParseCORSOrigins(%q) = %q, %v", tc.in, got, err)
		}
	}
}
