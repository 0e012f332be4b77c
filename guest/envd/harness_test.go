package envd

import (
	"context"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/filesystem/filesystemconnect"
	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/process"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
)

// testEnv is one envd serving on a loopback port, with SDK-like clients (Connect
// protocol, JSON codec) pointed at it.
type testEnv struct {
	t       *testing.T
	srv     *Server
	url     string
	dir     string // default workdir, a fresh temp dir
	token   string // sent as X-Access-Token when non-empty
	process processconnect.ProcessClient
	fs      filesystemconnect.FilesystemClient
	http    *http.Client
}

// newEnv starts envd for one test; cleanup stops it. mutate may adjust Options.
func newEnv(t *testing.T, mutate ...func(*Options)) *testEnv {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("envd tests switch users and chown files: run them as root")
	}
	dir := t.TempDir()
	// t.TempDir's parent is 0700; non-root test users must be able to enter.
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	opts := Options{
		Logger:         slog.New(slog.DiscardHandler),
		DefaultWorkdir: dir,
		RunDir:         t.TempDir(),
		SetClock: func(time.Time) error {
			t.Error("test must not set the host clock")
			return nil
		},
	}
	for _, m := range mutate {
		m(&opts)
	}
	srv, err := NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(15 * time.Second):
			t.Error("Serve did not return after its context ended")
		}
	})
	e := &testEnv{t: t, srv: srv, url: "http://" + ln.Addr().String(), dir: dir}
	e.http = &http.Client{Transport: &tokenTransport{env: e, base: &http.Transport{DisableCompression: true}}}
	e.process = processconnect.NewProcessClient(e.http, e.url, connect.WithProtoJSON())
	e.fs = filesystemconnect.NewFilesystemClient(e.http, e.url, connect.WithProtoJSON())
	return e
}

// tokenTransport adds the env's current access token, as the SDK does.
type tokenTransport struct {
	env  *testEnv
	base http.RoundTripper
}

func (tt *tokenTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if tt.env.token != "" && r.Header.Get(AccessTokenHeader) == "" {
		r = r.Clone(r.Context())
		r.Header.Set(AccessTokenHeader, tt.env.token)
	}
	return tt.base.RoundTrip(r)
}

// as returns a request for msg acting as user (none when empty), as the SDK's
// authenticationHeader builds it.
func as[T any](user string, msg *T) *connect.Request[T] {
	req := connect.NewRequest(msg)
	if user != "" {
		req.Header().Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(user+":")))
	}
	return req
}

// ctx returns a context bounded well below the test timeout.
func (e *testEnv) ctx(d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	e.t.Cleanup(cancel)
	return ctx
}

// do sends a plain HTTP request to envd.
func (e *testEnv) do(method, path string, body io.Reader, hdr map[string]string) *http.Response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.url+path, body)
	if err != nil {
		e.t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	res, err := e.http.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { res.Body.Close() })
	return res
}

// readBody returns a response body as a string.
func readBody(t *testing.T, res *http.Response) string {
	t.Helper()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// result is what a finished process stream delivered.
type result struct {
	pid    uint32
	stdout string
	stderr string
	pty    string
	end    *pb.ProcessEvent_EndEvent
	events int // all events, keepalives included
	alive  int // keepalives
}

// eventStream is a Start or Connect stream.
type eventStream interface {
	Receive() bool
	Err() error
}

// collect drains a process stream until it ends; the first event must be start.
func collect[T interface{ GetEvent() *pb.ProcessEvent }](t *testing.T, s interface {
	eventStream
	Msg() T
}) result {
	t.Helper()
	return drain(t, s, true)
}

// drain reads a process stream until it ends. wantStart says whether the start
// event is still to come (false for a stream whose start was already read).
func drain[T interface{ GetEvent() *pb.ProcessEvent }](t *testing.T, s interface {
	eventStream
	Msg() T
}, wantStart bool) result {
	t.Helper()
	var r result
	// Builders, not string concatenation: outputs run to tens of MB.
	var stdout, stderr, pty strings.Builder
	for s.Receive() {
		ev := s.Msg().GetEvent()
		r.events++
		if wantStart {
			if ev.GetStart() == nil {
				t.Fatalf("first event is %s, want start", eventKind(ev))
			}
			r.pid = ev.GetStart().GetPid()
			wantStart = false
			continue
		}
		switch {
		case ev.GetStart() != nil:
			t.Fatalf("second start event")
		case ev.GetData() != nil:
			d := ev.GetData()
			stdout.Write(d.GetStdout())
			stderr.Write(d.GetStderr())
			pty.Write(d.GetPty())
		case ev.GetEnd() != nil:
			r.end = ev.GetEnd()
		case ev.GetKeepalive() != nil:
			r.alive++
		}
	}
	if err := s.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if r.end == nil {
		t.Fatal("stream ended without an end event")
	}
	r.stdout, r.stderr, r.pty = stdout.String(), stderr.String(), pty.String()
	return r
}

// eventKind names an event's type without dumping its (maybe huge) data.
func eventKind(ev *pb.ProcessEvent) string {
	switch {
	case ev.GetStart() != nil:
		return "start"
	case ev.GetData() != nil:
		return "data"
	case ev.GetEnd() != nil:
		return "end"
	case ev.GetKeepalive() != nil:
		return "keepalive"
	}
	return "empty"
}

// run starts cmd with bash -c, as the SDK's commands.run does (minus -l, which
// would read the host's profile), and collects its events.
func (e *testEnv) run(user, script string, mutate ...func(*pb.StartRequest)) result {
	e.t.Helper()
	req := &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", script}}}
	for _, m := range mutate {
		m(req)
	}
	s, err := e.process.Start(e.ctx(30*time.Second), as(user, req))
	if err != nil {
		e.t.Fatal(err)
	}
	defer s.Close()
	return collect(e.t, s)
}

// startErr starts a process expecting the stream to fail, returning the error.
func (e *testEnv) startErr(user string, req *pb.StartRequest) error {
	e.t.Helper()
	s, err := e.process.Start(e.ctx(10*time.Second), as(user, req))
	if err != nil {
		return err
	}
	defer s.Close()
	for s.Receive() {
		e.t.Fatalf("unexpected event %v", s.Msg())
	}
	return s.Err()
}

// started starts a long-running process in the background and returns its
// stream (first event already read) and pid.
func (e *testEnv) started(user string, req *pb.StartRequest) (*connect.ServerStreamForClient[pb.StartResponse], uint32) {
	e.t.Helper()
	s, err := e.process.Start(e.ctx(60*time.Second), as(user, req))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { s.Close() })
	if !s.Receive() {
		e.t.Fatalf("no start event: %v", s.Err())
	}
	pid := s.Msg().GetEvent().GetStart().GetPid()
	if pid == 0 {
		e.t.Fatalf("first event %v has no pid", s.Msg())
	}
	e.t.Cleanup(func() {
		// Best effort: the process may be gone already.
		_, _ = e.process.SendSignal(context.Background(), connect.NewRequest(&pb.SendSignalRequest{
			Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, Signal: pb.Signal_SIGNAL_SIGKILL,
		}))
	})
	return s, pid
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	end := time.Now().Add(d)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// code returns the connect code of err (CodeUnknown for non-connect errors).
func code(err error) connect.Code {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Code()
	}
	if err == nil {
		return 0
	}
	return connect.CodeUnknown
}

func pidSel(pid uint32) *pb.ProcessSelector {
	return &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
}

func tagSel(tag string) *pb.ProcessSelector {
	return &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}
}

func ptr[T any](v T) *T { return &v }

// entryNames lists the names of entries, for compact comparisons.
func entryPaths(es []*fspb.EntryInfo) string {
	var out []string
	for _, e := range es {
		out = append(out, e.GetPath())
	}
	return strings.Join(out, ",")
}
