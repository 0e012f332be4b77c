package processes

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/process"
)

func TestFanoutBackpressure(t *testing.T) {
	f := newFanout()
	f.publish(stdoutEvent([]byte("nobody listens"))) // must not block

	slow, fast := f.subscribe(), f.subscribe()
	for i := range subscriberBuffer {
		f.publish(stdoutEvent([]byte{byte(i)}))
	}
	// Both queues are full: the next publish waits for the slowest subscriber.
	published := make(chan struct{})
	go func() {
		f.publish(stdoutEvent([]byte("next")))
		close(published)
	}()
	for range subscriberBuffer {
		<-fast.ch
	}
	select {
	case <-published:
		t.Fatal("publish did not wait for the slow subscriber")
	case <-time.After(50 * time.Millisecond):
	}
	<-slow.ch // one slot frees up
	select {
	case <-published:
	case <-time.After(5 * time.Second):
		t.Fatal("publish still blocked after the slow subscriber caught up")
	}
	if ev := <-fast.ch; string(ev.GetData().GetStdout()) != "next" {
		t.Errorf("fast subscriber got %v", ev)
	}

	// A subscriber that leaves releases a blocked publish.
	for len(slow.ch) < subscriberBuffer {
		f.publish(stdoutEvent([]byte("fill")))
		<-fast.ch
	}
	go func() { f.publish(stdoutEvent([]byte("after leave"))) }()
	time.Sleep(20 * time.Millisecond)
	f.unsubscribe(slow)
	if ev := <-fast.ch; string(ev.GetData().GetStdout()) != "after leave" {
		t.Errorf("got %v", ev)
	}

	end := &pb.ProcessEvent_EndEvent{Status: "exit status 0", Exited: true}
	f.finish(end)
	late := f.subscribe() // after the end: still sees it
	select {
	case <-f.done:
	default:
		t.Fatal("done not closed after finish")
	}
	if f.end != end || len(late.ch) != 0 {
		t.Errorf("late subscriber: end %v, %d queued", f.end, len(late.ch))
	}
}

func TestLookPath(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "tool")
	if err := os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "data"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, path, dir, want string
		ok                    bool
	}{
		{"tool", "/nonexistent:" + dir, "/", exe, true},
		{"tool", "sub/..:/x", dir, filepath.Join(dir, "tool"), true}, // relative PATH entries are relative to the cwd
		{"data", dir, "/", "", false},                                // not executable
		{"sub", dir, "/", "", false},                                 // a directory
		{"./rel", "", "/", "./rel", true},                            // with a slash: as given
		{"", dir, "/", "", false},
	}
	for _, tc := range tests {
		got, err := lookPath(tc.name, tc.path, tc.dir)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("lookPath(%q, %q, %q) = %q, %v", tc.name, tc.path, tc.dir, got, err)
		}
	}
}

func TestEndEventOfUnstartedProcess(t *testing.T) {
	if end := endEvent(nil, os.ErrClosed); end.GetExitCode() != -1 || end.GetError() == "" {
		t.Errorf("endEvent(nil) = %v", end)
	}
}
