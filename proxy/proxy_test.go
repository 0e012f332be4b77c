package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// table is a Resolver over a map: the control plane is outside this package.
type table struct {
	mu     sync.Mutex
	routes map[string]Route
	woken  []string
	// checkpoints lists the sandboxes Checkpoint was called for; it fails
	// with checkpointErr when set.
	checkpoints   []string
	checkpointErr error
}

func (t *table) Route(id string) (Route, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.routes[id]
	return r, ok
}

func (t *table) Wake(ctx context.Context, id string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.routes[id]
	if !ok || r.AccessToken != "wakeable" {
		return false
	}
	r.Paused = false
	t.routes[id] = r
	t.woken = append(t.woken, id)
	return true
}

func (t *table) Checkpoint(ctx context.Context, id string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.checkpoints = append(t.checkpoints, id)
	return t.checkpointErr
}

func (t *table) Each(fn func(string, Route) bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for id, r := range t.routes {
		if !fn(id, r) {
			return
		}
	}
}

// upstream is a real HTTP server on 127.0.0.1 standing in for a sandbox port.
func upstream(t *testing.T, h http.Handler) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).Port
}

func startProxy(t *testing.T, tb *table) (*Proxy, string) {
	t.Helper()
	p := New(tb, "sb.test", nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := p.Server("")
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return p, "http://" + ln.Addr().String()
}

var loopback = netip.MustParseAddr("127.0.0.1")

func TestRouting(t *testing.T) {
	port := upstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello "+r.URL.Path+" token="+r.Header.Get("X-Access-Token"))
	}))
	closedPort := func() int { // a port nothing listens on
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		defer ln.Close()
		return ln.Addr().(*net.TCPAddr).Port
	}()
	tb := &table{routes: map[string]Route{
		"aaaaaaaaaaaaaaaaaaaa": {Addr: loopback},
		"pppppppppppppppppppp": {Addr: loopback, Paused: true},
		"wwwwwwwwwwwwwwwwwwww": {Addr: loopback, Paused: true, AccessToken: "wakeable"},
		"tttttttttttttttttttt": {Addr: loopback, TrafficToken: "secret"},
	}}
	_, base := startProxy(t, tb)
	ps := strconv.Itoa(port)

	for _, tc := range []struct {
		name     string
		host     string
		headers  map[string]string
		path     string
		wantCode int
		wantBody string
	}{
		{"headers", "", map[string]string{"E2b-Sandbox-Id": "aaaaaaaaaaaaaaaaaaaa", "E2b-Sandbox-Port": ps, "X-Access-Token": "tok"}, "/x", 200, "hello /x token=tok"},
		{"host", ps + "-aaaaaaaaaaaaaaaaaaaa.sb.test", nil, "/y", 200, "hello /y token="},
		{"host with port suffix", ps + "-aaaaaaaaaaaaaaaaaaaa.sb.test:443", nil, "/z", 200, "hello /z token="},
		{"unknown sandbox", "", map[string]string{"E2b-Sandbox-Id": "zzzzzzzzzzzzzzzzzzzz", "E2b-Sandbox-Port": ps}, "/", 502, `"message":"The sandbox was not found"`},
		{"port closed", "", map[string]string{"E2b-Sandbox-Id": "aaaaaaaaaaaaaaaaaaaa", "E2b-Sandbox-Port": strconv.Itoa(closedPort)}, "/", 502, `"message":"The sandbox is running but port is not open"`},
		{"paused", "", map[string]string{"E2b-Sandbox-Id": "pppppppppppppppppppp", "E2b-Sandbox-Port": ps}, "/", 502, `"message":"The sandbox is paused"`},
		{"paused, woken by traffic", "", map[string]string{"E2b-Sandbox-Id": "wwwwwwwwwwwwwwwwwwww", "E2b-Sandbox-Port": ps}, "/w", 200, "hello /w"},
		{"traffic token missing", "", map[string]string{"E2b-Sandbox-Id": "tttttttttttttttttttt", "E2b-Sandbox-Port": ps}, "/", 403, `"code":403`},
		{"traffic token given", "", map[string]string{"E2b-Sandbox-Id": "tttttttttttttttttttt", "E2b-Sandbox-Port": ps, "E2B-Traffic-Access-Token": "secret"}, "/t", 200, "hello /t"},
		{"bad port header", "", map[string]string{"E2b-Sandbox-Id": "aaaaaaaaaaaaaaaaaaaa", "E2b-Sandbox-Port": "70000"}, "/", 400, `"code":400`},
		{"no sandbox named", "", nil, "/", 400, `"code":400`},
		{"foreign domain", ps + "-aaaaaaaaaaaaaaaaaaaa.elsewhere.test", nil, "/", 400, `"code":400`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", base+tc.path, nil)
			if tc.host != "" {
				req.Host = tc.host
			}
			for k, v := range tc.headers {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.wantCode || !strings.Contains(string(body), tc.wantBody) {
				t.Fatalf("got %d %q, want %d containing %q", resp.StatusCode, body, tc.wantCode, tc.wantBody)
			}
			if tc.wantCode >= 400 {
				var e errorBody
				if err := json.Unmarshal(body, &e); err != nil || e.Code != tc.wantCode {
					t.Fatalf("error body %q is not the E2B shape", body)
				}
			}
		})
	}
}

func TestSignedFilesURLFindsItsSandbox(t *testing.T) {
	// Signed URLs carry no port: they go to envd's, so serve envd's port.
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(EnvdPort))
	if err != nil {
		t.Skipf("port %d busy on this host: %v", EnvdPort, err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "file of "+r.URL.Query().Get("path"))
	})}
	go srv.Serve(ln)
	defer srv.Close()

	tb := &table{routes: map[string]Route{
		"aaaaaaaaaaaaaaaaaaaa": {Addr: loopback, AccessToken: "token-a"},
		"bbbbbbbbbbbbbbbbbbbb": {Addr: netip.MustParseAddr("127.0.0.2"), AccessToken: "token-b"},
	}}
	_, base := startProxy(t, tb)
	sig := FileSignature("/tmp/f", "read", "", "token-a", "")
	resp, err := http.Get(base + "/files?path=/tmp/f&signature=" + sig)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "file of /tmp/f" {
		t.Fatalf("signed URL: %d %q", resp.StatusCode, body)
	}
	resp, err = http.Get(base + "/files?path=/tmp/f&signature=" + FileSignature("/tmp/f", "read", "", "not-a-token", ""))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("forged signature routed: %d", resp.StatusCode)
	}
	// A request that names a sandbox goes to that sandbox whatever its
	// signature says: a's signature cannot carry a request into a, nor b's
	// envd be asked with a's (b's envd refuses it: the signature is a's).
	req, _ := http.NewRequest("GET", base+"/files?path=/tmp/f&signature="+sig, nil)
	req.Header.Set("E2b-Sandbox-Id", "bbbbbbbbbbbbbbbbbbbb")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) == "file of /tmp/f" {
		t.Fatalf("a's signed URL naming b was served by a")
	}
}

func TestStreamingAndEvictResets(t *testing.T) {
	started := make(chan struct{})
	port := upstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		close(started)
		for i := 0; i < 600; i++ { // bounded: at most a minute
			if _, err := io.WriteString(w, "tick\n"); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}))
	tb := &table{routes: map[string]Route{"aaaaaaaaaaaaaaaaaaaa": {Addr: loopback}}}
	p, base := startProxy(t, tb)
	req, _ := http.NewRequest("GET", base+"/stream", nil)
	req.Header.Set("E2b-Sandbox-Id", "aaaaaaaaaaaaaaaaaaaa")
	req.Header.Set("E2b-Sandbox-Port", strconv.Itoa(port))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	<-started
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || line != "tick\n" {
		t.Fatalf("first streamed line: %q, %v", line, err)
	}
	if n := p.Connections("aaaaaaaaaaaaaaaaaaaa"); n != 1 {
		t.Fatalf("tracked connections = %d, want 1", n)
	}
	p.Evict("aaaaaaaaaaaaaaaaaaaa")
	_, err = io.Copy(io.Discard, br)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("after Evict the stream ended with %v, want a connection reset", err)
	}
	if n := p.Connections("aaaaaaaaaaaaaaaaaaaa"); n != 0 {
		t.Fatalf("connections still tracked after evict: %d", n)
	}
}

func TestWebSocketUpgrade(t *testing.T) {
	port := upstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
			http.Error(w, "want upgrade", 400)
			return
		}
		conn, brw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		brw.Flush()
		line, _ := brw.ReadString('\n')
		brw.WriteString("echo: " + line)
		brw.Flush()
	}))
	tb := &table{routes: map[string]Route{"aaaaaaaaaaaaaaaaaaaa": {Addr: loopback}}}
	_, base := startProxy(t, tb)
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "GET /ws HTTP/1.1\r\nHost: "+strconv.Itoa(port)+"-aaaaaaaaaaaaaaaaaaaa.sb.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	io.WriteString(conn, "ping\n")
	line, err := br.ReadString('\n')
	if err != nil || line != "echo: ping\n" {
		t.Fatalf("after upgrade got %q, %v", line, err)
	}
}

func TestParseHost(t *testing.T) {
	for _, tc := range []struct {
		host, domain string
		id           string
		port         int
		ok           bool
	}{
		{"49983-abc.example.com", "example.com", "abc", 49983, true},
		{"49983-abc.EXAMPLE.com:8080", "example.com", "abc", 49983, true},
		{"abc.example.com", "example.com", "", 0, false},
		{"0-abc.example.com", "example.com", "", 0, false},
		{"99999-abc.example.com", "example.com", "", 0, false},
		{"x-abc.example.com", "example.com", "", 0, false},
		{"49983-.example.com", "example.com", "", 0, false},
		{"49983-abc.other.com", "example.com", "", 0, false},
		{"localhost", "example.com", "", 0, false},
	} {
		id, port, ok := parseHost(tc.host, tc.domain)
		if id != tc.id || port != tc.port || ok != tc.ok {
			t.Errorf("parseHost(%q) = %q, %d, %v; want %q, %d, %v", tc.host, id, port, ok, tc.id, tc.port, tc.ok)
		}
	}
}

func FuzzParseHost(f *testing.F) {
	for _, s := range []string{"49983-abc.example.com", "1-.x", "-", ":", "65535-a.example.com:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, host string) {
		id, port, ok := parseHost(host, "example.com")
		if ok && (id == "" || port <= 0 || port > 65535 || strings.Contains(id, ".")) {
			t.Fatalf("parseHost(%q) accepted %q:%d", host, id, port)
		}
	})
}

// TestFullDuplex: an upstream that answers before it has read the whole
// request body (as Connect streams do) must still get the rest of the body
// through the proxy, and the client its whole response.
func TestFullDuplex(t *testing.T) {
	port := upstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.NewResponseController(w).EnableFullDuplex()
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		buf := make([]byte, 5)
		for {
			n, err := io.ReadFull(r.Body, buf)
			if n > 0 {
				w.Write([]byte("echo:" + string(buf[:n]) + "\n"))
				w.(http.Flusher).Flush()
			}
			if err != nil {
				return
			}
		}
	}))
	tb := &table{routes: map[string]Route{"aaaaaaaaaaaaaaaaaaaa": {Addr: loopback}}}
	_, base := startProxy(t, tb)
	pr, pw := io.Pipe()
	req, _ := http.NewRequest("POST", base+"/duplex", pr)
	req.ContentLength = 10
	req.Header.Set("E2b-Sandbox-Id", "aaaaaaaaaaaaaaaaaaaa")
	req.Header.Set("E2b-Sandbox-Port", strconv.Itoa(port))
	go pw.Write([]byte("first"))
	client := &http.Client{Timeout: 10 * time.Second} // bounded: a broken proxy stalls the second echo
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || line != "echo:first\n" {
		t.Fatalf("first echo: %q, %v", line, err)
	}
	// The response has started; the rest of the body must still arrive.
	go func() {
		pw.Write([]byte("other"))
		pw.Close()
	}()
	if line, err := br.ReadString('\n'); err != nil || line != "echo:other\n" {
		t.Fatalf("second echo after the response started: %q, %v", line, err)
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("end of response: %q, %v", rest, err)
	}
}

// TestTrafficToken checks network.allowPublicTraffic false as E2B's proxy
// enforces it: 403 with E2B's body on every sandbox port without the traffic
// token or with a wrong one, envd's port exempt, and a paused sandbox not
// woken by a request that may not reach it.
func TestTrafficToken(t *testing.T) {
	port := upstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello "+r.URL.Path)
	}))
	ps := strconv.Itoa(port)
	const (
		private = "tttttttttttttttttttt"
		sleeper = "ssssssssssssssssssss" // paused, wakes on traffic
	)
	tb := &table{routes: map[string]Route{
		private: {Addr: loopback, TrafficToken: "secret"},
		sleeper: {Addr: loopback, Paused: true, AccessToken: "wakeable", TrafficToken: "secret"},
	}}
	_, base := startProxy(t, tb)

	for _, tc := range []struct {
		name     string
		host     string
		headers  [][2]string
		wantCode int
		wantMsg  string
	}{
		{"missing, by headers", "", [][2]string{{"E2b-Sandbox-Id", private}, {"E2b-Sandbox-Port", ps}}, 403, "'e2b-traffic-access-token' is missing"},
		{"missing, by host", ps + "-" + private + ".sb.test", nil, 403, "is missing"},
		{"empty", ps + "-" + private + ".sb.test", [][2]string{{"e2b-traffic-access-token", ""}}, 403, "is missing"},
		{"wrong", ps + "-" + private + ".sb.test", [][2]string{{"e2b-traffic-access-token", "secreT"}}, 403, "'e2b-traffic-access-token' is invalid"},
		{"a prefix", ps + "-" + private + ".sb.test", [][2]string{{"e2b-traffic-access-token", "secre"}}, 403, "is invalid"},
		{"twice", ps + "-" + private + ".sb.test", [][2]string{{"e2b-traffic-access-token", "secret"}, {"e2b-traffic-access-token", "other"}}, 403, "is invalid"},
		{"the envd token instead", ps + "-" + private + ".sb.test", [][2]string{{"X-Access-Token", "secret"}}, 403, "is missing"},
		{"given, as the SDK sends it", ps + "-" + private + ".sb.test", [][2]string{{"e2b-traffic-access-token", "secret"}}, 200, ""},
		{"paused, no token: not woken", ps + "-" + sleeper + ".sb.test", nil, 403, "is missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", base+"/p", nil)
			req.Host = tc.host
			for _, h := range tc.headers {
				req.Header.Add(h[0], h[1])
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.wantCode {
				t.Fatalf("got %d %q, want %d", resp.StatusCode, body, tc.wantCode)
			}
			if tc.wantCode == 200 {
				if string(body) != "hello /p" {
					t.Fatalf("body %q", body)
				}
				return
			}
			var e errorBody
			if err := json.Unmarshal(body, &e); err != nil || e.Code != 403 || !strings.Contains(e.Message, tc.wantMsg) {
				t.Fatalf("error body %q, want E2B's 403 with %q", body, tc.wantMsg)
			}
			if id, _, _ := parseHost(tc.host, "sb.test"); id != "" && e.SandboxID != id {
				t.Fatalf("sandboxId %q", e.SandboxID)
			}
		})
	}
	if len(tb.woken) != 0 {
		t.Fatalf("woken by refused traffic: %v", tb.woken)
	}

	// envd's port is exempt: envd checks its own token. Nothing listens on
	// 49983 here, so the request gets as far as the port-closed answer.
	req, _ := http.NewRequest("GET", base+"/health", nil)
	req.Host = strconv.Itoa(EnvdPort) + "-" + private + ".sb.test"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == http.StatusForbidden {
		t.Fatal("envd's port demanded the traffic token")
	}

	// With the token, the paused sandbox wakes and answers.
	req, _ = http.NewRequest("GET", base+"/w", nil)
	req.Host = ps + "-" + sleeper + ".sb.test"
	req.Header.Set("e2b-traffic-access-token", "secret")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "hello /w" || len(tb.woken) != 1 {
		t.Fatalf("paused, with the token: %d %q, woken %v", resp.StatusCode, body, tb.woken)
	}
}

func TestCheckpointBeforeProcessStart(t *testing.T) {
	// The checkpoint hook is for envd's port only: serve it.
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(EnvdPort))
	if err != nil {
		t.Skipf("port %d busy on this host: %v", EnvdPort, err)
	}
	var mu sync.Mutex
	var forwarded []string
	record := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		forwarded = append(forwarded, r.Method+" "+r.URL.Path)
		mu.Unlock()
		io.WriteString(w, "ok")
	})
	srv := &http.Server{Handler: record}
	go srv.Serve(ln)
	defer srv.Close()
	other := upstream(t, record)

	const ckpt, plain = "cccccccccccccccccccc", "dddddddddddddddddddd"
	tb := &table{routes: map[string]Route{
		ckpt:  {Addr: loopback, AccessToken: "tok", Checkpoint: true},
		plain: {Addr: loopback, AccessToken: "tok"},
	}}
	_, base := startProxy(t, tb)
	failing := errors.New("disk full")
	for _, tc := range []struct {
		name, id, method, path, token string
		port                          int
		fail                          error
		wantCheckpoint                bool
		wantCode                      int
	}{
		{"a command", ckpt, "POST", processStartPath, "tok", EnvdPort, nil, true, 200},
		{"without the token", ckpt, "POST", processStartPath, "", EnvdPort, nil, false, 200},
		{"with a wrong token", ckpt, "POST", processStartPath, "nope", EnvdPort, nil, false, 200},
		{"another envd call", ckpt, "POST", "/process.Process/List", "tok", EnvdPort, nil, false, 200},
		{"a GET", ckpt, "GET", processStartPath, "tok", EnvdPort, nil, false, 200},
		{"another port", ckpt, "POST", processStartPath, "tok", other, nil, false, 200},
		{"a sandbox without checkpoints", plain, "POST", processStartPath, "tok", EnvdPort, nil, false, 200},
		{"a checkpoint that fails", ckpt, "POST", processStartPath, "tok", EnvdPort, failing, true, 502},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb.mu.Lock()
			tb.checkpoints, tb.checkpointErr = nil, tc.fail
			tb.mu.Unlock()
			mu.Lock()
			forwarded = nil
			mu.Unlock()
			req, _ := http.NewRequest(tc.method, base+tc.path, strings.NewReader("{}"))
			req.Header.Set("E2b-Sandbox-Id", tc.id)
			req.Header.Set("E2b-Sandbox-Port", strconv.Itoa(tc.port))
			if tc.token != "" {
				req.Header.Set("X-Access-Token", tc.token)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.wantCode {
				t.Fatalf("got %d %q, want %d", resp.StatusCode, body, tc.wantCode)
			}
			tb.mu.Lock()
			got := len(tb.checkpoints) > 0
			tb.mu.Unlock()
			if got != tc.wantCheckpoint {
				t.Errorf("checkpoint taken: %v, want %v", got, tc.wantCheckpoint)
			}
			mu.Lock()
			n := len(forwarded)
			mu.Unlock()
			if tc.wantCode == 502 {
				var e errorBody
				if err := json.Unmarshal(body, &e); err != nil || e.Code != 502 || e.SandboxID != tc.id || !strings.Contains(e.Message, "disk full") {
					t.Errorf("error body %q", body)
				}
				if n != 0 {
					t.Errorf("a command whose checkpoint failed was forwarded")
				}
			} else if n != 1 {
				t.Errorf("forwarded %d requests, want 1", n)
			}
		})
	}
}
