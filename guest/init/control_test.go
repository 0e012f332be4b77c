package guestinit

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// recorder is a System that records what the control channel asked of it.
type recorder struct {
	mu       sync.Mutex
	calls    []string
	envdUp   atomic.Bool
	failSync atomic.Bool
	off      chan struct{}
}

func newRecorder() *recorder { return &recorder{off: make(chan struct{}, 4)} }

func (r *recorder) record(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls = append(r.calls, fmt.Sprintf(format, args...))
}

func (r *recorder) Calls() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.calls...)
}

func (r *recorder) system() *System {
	return &System{
		SetClock:    func(ns int64) error { r.record("clock %d", ns); return nil },
		AddEntropy:  func(b []byte) error { r.record("entropy %d", len(b)); return nil },
		SetHostname: func(name string) error { r.record("hostname %s", name); return nil },
		Sync: func() error {
			r.record("sync")
			if r.failSync.Load() {
				return errors.New("disk on fire")
			}
			return nil
		},
		PowerOff: func() { r.record("poweroff"); r.off <- struct{}{} },
		EnvdUp:   func(ctx context.Context) bool { r.record("envd?"); return r.envdUp.Load() },
	}
}

var entropy64 = base64.StdEncoding.EncodeToString(make([]byte, 64))

func TestParseRequest(t *testing.T) {
	for _, tc := range []struct {
		line string
		err  string // "" for a valid request
	}{
		{`{"op":"ping"}`, ""},
		{`{"op":"sync"}`, ""},
		{`{"op":"poweroff"}`, ""},
		{`  {"op":"ping"}  `, ""},
		{`{"op":"identity","unixNano":1700000000000000000,"entropy":"` + entropy64 + `"}`, ""},
		{`{"op":"identity","unixNano":1,"entropy":"` + entropy64 + `","hostname":"sbx-1.example"}`, ""},
		{``, "malformed request"},
		{`not json`, "malformed request"},
		{`[]`, "malformed request"},
		{`"ping"`, "malformed request"},
		{`{"op":"ping"}{"op":"ping"}`, "more than one JSON value"},
		{`{"op":"ping"} x`, "more than one JSON value"},
		{`{"op":"ping","extra":1}`, "unknown field"},
		{`{}`, "no op"},
		{`{"op":"reboot"}`, `unknown op "reboot"`},
		{`{"op":"ping","hostname":"x"}`, "takes no fields"},
		{`{"op":"identity","entropy":"` + entropy64 + `"}`, "unixNano"},
		{`{"op":"identity","unixNano":-5,"entropy":"` + entropy64 + `"}`, "unixNano"},
		{`{"op":"identity","unixNano":1.5,"entropy":"` + entropy64 + `"}`, "malformed request"},
		{`{"op":"identity","unixNano":1}`, "entropy must be"},
		{`{"op":"identity","unixNano":1,"entropy":"!!"}`, "not base64"},
		{`{"op":"identity","unixNano":1,"entropy":"` + base64.StdEncoding.EncodeToString(make([]byte, 31)) + `"}`, "entropy must be"},
		{`{"op":"identity","unixNano":1,"entropy":"` + base64.StdEncoding.EncodeToString(make([]byte, 513)) + `"}`, "entropy must be"},
		{`{"op":"identity","unixNano":1,"entropy":"` + entropy64 + `","hostname":"a b"}`, "not a hostname"},
	} {
		_, _, err := ParseRequest([]byte(tc.line))
		if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
			t.Errorf("ParseRequest(%.80q) = %v, want error containing %q", tc.line, err, tc.err)
		}
	}
}

// FuzzParseRequest: request lines come from the host but are parsed by
// PID 1, whose crash would take the VM down. Whatever the line, the handler
// answers with one well-formed response, and a request it accepts keeps
// the documented bounds.
func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{`{"op":"ping"}`, `{"op":"identity","unixNano":1,"entropy":"` + entropy64 + `","hostname":"h"}`, `{"op":"sync"}`, `{`, `{"op":null}`, "\x00"} {
		f.Add([]byte(s))
	}
	rec := newRecorder()
	sys := rec.system()
	sys.PowerOff = func() {}
	f.Fuzz(func(t *testing.T, line []byte) {
		req, ent, err := ParseRequest(line)
		if err == nil {
			switch req.Op {
			case "ping", "sync", "poweroff":
			case "identity":
				if req.UnixNano <= 0 || len(ent) < minEntropy || len(ent) > maxEntropy || req.Hostname != "" && !ValidHostname(req.Hostname) {
					t.Fatalf("accepted %q as %+v", line, req)
				}
			default:
				t.Fatalf("accepted unknown op in %q", line)
			}
		}
		resp, _ := sys.handle(context.Background(), line)
		if (err == nil) != resp.OK || !resp.OK && resp.Error == "" {
			t.Fatalf("%q: parse error %v but response %+v", line, err, resp)
		}
		if _, err := json.Marshal(resp); err != nil {
			t.Fatal(err)
		}
	})
}

// dialServe serves the control protocol on one end of a Unix socketpair
// (Serve is what the vsock listener runs on each connection) and returns
// the other end.
func dialServe(t *testing.T, sys *System) (net.Conn, *bufio.Reader, <-chan error) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The server end is an *os.File on a non-blocking socket, exactly as
	// serveVsock wraps an accepted vsock connection.
	server := os.NewFile(uintptr(fds[0]), "control-server")
	clientFile := os.NewFile(uintptr(fds[1]), "control-client")
	client, err := net.FileConn(clientFile)
	clientFile.Close()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		defer server.Close()
		done <- sys.Serve(ctx, server)
	}()
	t.Cleanup(func() {
		cancel()
		client.Close()
	})
	client.SetDeadline(time.Now().Add(30 * time.Second))
	return client, bufio.NewReader(client), done
}

func ask(t *testing.T, c net.Conn, r *bufio.Reader, line string) Response {
	t.Helper()
	if _, err := fmt.Fprintf(c, "%s\n", line); err != nil {
		t.Fatal(err)
	}
	return readResponse(t, r)
}

func readResponse(t *testing.T, r *bufio.Reader) Response {
	t.Helper()
	b, err := r.ReadBytes('\n')
	if err != nil {
		t.Fatalf("reading a response: %v", err)
	}
	var resp Response
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&resp); err != nil {
		t.Fatalf("response %q: %v", b, err)
	}
	return resp
}

// TestControlSession drives one connection through every op and every kind
// of bad input: each line gets exactly one response, in order, and the
// connection survives the bad ones.
func TestControlSession(t *testing.T) {
	rec := newRecorder()
	rec.envdUp.Store(true)
	c, r, done := dialServe(t, rec.system())

	if resp := ask(t, c, r, `{"op":"ping"}`); !resp.OK || resp.Envd == nil || !*resp.Envd {
		t.Fatalf("ping: %+v", resp)
	}
	rec.envdUp.Store(false)
	if resp := ask(t, c, r, `{"op":"ping"}`); !resp.OK || resp.Envd == nil || *resp.Envd {
		t.Fatalf("ping with envd down: %+v", resp)
	}
	id := `{"op":"identity","unixNano":1700000000123456789,"entropy":"` + entropy64 + `","hostname":"sbx1"}`
	if resp := ask(t, c, r, id); !resp.OK || resp.Error != "" {
		t.Fatalf("identity: %+v", resp)
	}
	if resp := ask(t, c, r, `{"op":"sync"}`+"\r"); !resp.OK {
		t.Fatalf("sync (CRLF): %+v", resp)
	}
	rec.failSync.Store(true)
	if resp := ask(t, c, r, `{"op":"sync"}`); resp.OK || !strings.Contains(resp.Error, "disk on fire") {
		t.Fatalf("failing sync: %+v", resp)
	}
	for _, bad := range []string{`garbage`, `{"op":"dance"}`, ``, `{"op":"identity","unixNano":1}`, strings.Repeat("x", MaxRequest+1)} {
		if resp := ask(t, c, r, bad); resp.OK || resp.Error == "" {
			t.Fatalf("%.40q: %+v", bad, resp)
		}
	}
	// Several requests in one write are answered one by one, in order.
	rec.failSync.Store(false)
	fmt.Fprintf(c, "%s\n%s\n%s\n", `{"op":"ping"}`, `{"op":"nope"}`, `{"op":"sync"}`)
	if a, b, s := readResponse(t, r), readResponse(t, r), readResponse(t, r); !a.OK || a.Envd == nil || b.OK || !s.OK {
		t.Fatalf("pipelined: %+v %+v %+v", a, b, s)
	}
	want := []string{"envd?", "envd?", "clock 1700000000123456789", "entropy 64", "hostname sbx1", "sync", "sync", "envd?", "sync"}
	if got := rec.Calls(); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("calls %q, want %q", got, want)
	}
	// poweroff answers first, then powers off.
	if resp := ask(t, c, r, `{"op":"poweroff"}`); !resp.OK {
		t.Fatalf("poweroff: %+v", resp)
	}
	select {
	case <-rec.off:
	case <-time.After(30 * time.Second):
		t.Fatal("poweroff was answered but not done")
	}
	c.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve after the peer closed: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Serve did not return after the peer closed")
	}
}

// TestControlOversized: a line far over MaxRequest, sent in pieces and
// without ever fitting in memory twice, gets one error and the next line
// is served.
func TestControlOversized(t *testing.T) {
	rec := newRecorder()
	c, r, _ := dialServe(t, rec.system())
	go func() {
		chunk := []byte(strings.Repeat("{", 8192))
		for range 64 { // 512 KiB
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
		fmt.Fprintf(c, "\n%s\n", `{"op":"sync"}`)
	}()
	if resp := readResponse(t, r); resp.OK || !strings.Contains(resp.Error, "longer than") {
		t.Fatalf("oversized line: %+v", resp)
	}
	if resp := readResponse(t, r); !resp.OK {
		t.Fatalf("line after the oversized one: %+v", resp)
	}
	// An unterminated last line is answered before the end.
	fmt.Fprintf(c, `{"op":"sync"}`)
	c.(*net.UnixConn).CloseWrite()
	if resp := readResponse(t, r); !resp.OK {
		t.Fatalf("unterminated last line: %+v", resp)
	}
}

// TestReadLineLimit checks readLine's boundaries: exactly MaxRequest bytes
// pass, one more does not.
func TestReadLineLimit(t *testing.T) {
	for _, tc := range []struct {
		n       int
		tooLong bool
	}{{0, false}, {1, false}, {MaxRequest, false}, {MaxRequest + 1, true}, {3 * MaxRequest, true}} {
		in := strings.Repeat("a", tc.n) + "\nnext\n"
		r := bufio.NewReaderSize(strings.NewReader(in), 16)
		line, tooLong, err := readLine(r, MaxRequest)
		if err != nil || tooLong != tc.tooLong || !tooLong && len(line) != tc.n {
			t.Errorf("%d bytes: len %d, tooLong %v, %v", tc.n, len(line), tooLong, err)
		}
		if next, _, err := readLine(r, MaxRequest); err != nil || string(next) != "next" {
			t.Errorf("%d bytes: next line %q, %v", tc.n, next, err)
		}
	}
}
