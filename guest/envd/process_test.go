package envd

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/process"
)

func TestStart(t *testing.T) {
	e := newEnv(t)
	postInit(t, e, `{"envVars":{"FROM_INIT":"init","SHADOWED":"init"}}`)
	sub := filepath.Join(e.dir, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		user       string
		script     string
		mutate     func(*pb.StartRequest)
		wantOut    string
		wantErr    string
		wantCode   int32
		wantStatus string
	}{
		{name: "stdout", script: "echo hello", wantOut: "hello\n", wantStatus: "exit status 0"},
		{name: "stderr and exit code", script: "echo oops >&2; exit 3", wantErr: "oops\n", wantCode: 3, wantStatus: "exit status 3"},
		{name: "killed by signal", script: "kill -9 $$", wantCode: -1, wantStatus: "signal: killed"},
		{name: "default cwd is the workdir", script: "pwd", wantOut: e.dir + "\n", wantStatus: "exit status 0"},
		{name: "relative cwd resolves against the workdir", script: "pwd",
			mutate:  func(r *pb.StartRequest) { r.Process.Cwd = ptr("sub") },
			wantOut: sub + "\n", wantStatus: "exit status 0"},
		{name: "absolute cwd", script: "pwd",
			mutate:  func(r *pb.StartRequest) { r.Process.Cwd = ptr("/tmp/../tmp") },
			wantOut: "/tmp\n", wantStatus: "exit status 0"},
		{name: "environment order: fixed, then /init, then request",
			script: `echo "$USER $LOGNAME $HOME $E2B_SANDBOX $FROM_INIT $SHADOWED $REQ"`,
			mutate: func(r *pb.StartRequest) {
				r.Process.Envs = map[string]string{"SHADOWED": "request", "REQ": "req"}
			},
			wantOut: "root root /root true init request req\n", wantStatus: "exit status 0"},
		{name: "request env can override PATH used to find the command",
			mutate: func(r *pb.StartRequest) {
				r.Process = &pb.ProcessConfig{Cmd: "envd-test-tool", Envs: map[string]string{"PATH": sub}}
			},
			wantOut: "found via request PATH\n", wantStatus: "exit status 0"},
		{name: "non-root user", user: "nobody", script: "id -u; id -g; echo $HOME $USER",
			mutate:  func(r *pb.StartRequest) { r.Process.Cwd = ptr("/") },
			wantOut: "65534\n65534\n/nonexistent nobody\n", wantStatus: "exit status 0"},
		{name: "stdin disabled reads /dev/null", script: "cat; readlink /proc/self/fd/0",
			mutate:  func(r *pb.StartRequest) { r.Stdin = ptr(false) },
			wantOut: "/dev/null\n", wantStatus: "exit status 0"},
		{name: "own process group", script: `[ "$(ps -o pgid= $$ | tr -d ' ')" = "$$" ] && echo leader`,
			wantOut: "leader\n", wantStatus: "exit status 0"},
	}
	tool := filepath.Join(sub, "envd-test-tool")
	if err := os.WriteFile(tool, []byte("#!/bin/sh\necho found via request PATH\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var mutate []func(*pb.StartRequest)
			if tc.mutate != nil {
				mutate = append(mutate, tc.mutate)
			}
			r := e.run(tc.user, tc.script, mutate...)
			if r.stdout != tc.wantOut || r.stderr != tc.wantErr {
				t.Errorf("stdout %q stderr %q, want %q %q", r.stdout, r.stderr, tc.wantOut, tc.wantErr)
			}
			if r.end.GetExitCode() != tc.wantCode || r.end.GetStatus() != tc.wantStatus {
				t.Errorf("end %v, want code %d status %q", r.end, tc.wantCode, tc.wantStatus)
			}
			if ok := tc.wantStatus == "exit status 0"; ok != (r.end.Error == nil) || (!ok && r.end.GetError() != tc.wantStatus) {
				t.Errorf("end error %v for status %q", r.end.Error, tc.wantStatus)
			}
			if r.end.GetExited() != (tc.wantCode >= 0) {
				t.Errorf("exited = %v", r.end.GetExited())
			}
		})
	}
}

func TestStartErrors(t *testing.T) {
	e := newEnv(t)
	file := filepath.Join(e.dir, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		user string
		req  *pb.StartRequest
		want connect.Code
	}{
		{"unknown user", "no-such-user", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/true"}}, connect.CodeUnauthenticated},
		{"missing cwd", "", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/true", Cwd: ptr("/no/such/dir")}}, connect.CodeInvalidArgument},
		{"cwd is a file", "", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/true", Cwd: &file}}, connect.CodeInvalidArgument},
		{"missing command", "", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "no-such-command-xyz"}}, connect.CodeInvalidArgument},
		{"missing absolute command", "", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/no/such/binary"}}, connect.CodeInvalidArgument},
		{"empty command", "", &pb.StartRequest{Process: &pb.ProcessConfig{}}, connect.CodeInvalidArgument},
		{"no process at all", "", &pb.StartRequest{}, connect.CodeInvalidArgument},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := code(e.startErr(tc.user, tc.req)); got != tc.want {
				t.Errorf("code %v, want %v", got, tc.want)
			}
		})
	}
}

func TestProcessSelectorsNotFound(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(10 * time.Second)
	for name, sel := range map[string]*pb.ProcessSelector{"pid": pidSel(999999), "tag": tagSel("nope")} {
		t.Run(name, func(t *testing.T) {
			_, err := e.process.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: pb.Signal_SIGNAL_SIGKILL}))
			if code(err) != connect.CodeNotFound {
				t.Errorf("SendSignal: %v, want not_found", err)
			}
			_, err = e.process.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}))
			if code(err) != connect.CodeNotFound {
				t.Errorf("SendInput: %v, want not_found", err)
			}
			_, err = e.process.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: sel}))
			if code(err) != connect.CodeNotFound {
				t.Errorf("CloseStdin: %v, want not_found", err)
			}
			_, err = e.process.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: sel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 1, Rows: 1}}}))
			if code(err) != connect.CodeNotFound {
				t.Errorf("Update: %v, want not_found", err)
			}
			s, err := e.process.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: sel}))
			if err == nil {
				for s.Receive() {
				}
				err = s.Err()
			}
			if code(err) != connect.CodeNotFound {
				t.Errorf("Connect: %v, want not_found", err)
			}
		})
	}
}

func TestStdinAndSignals(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(20 * time.Second)

	t.Run("SendInput then CloseStdin", func(t *testing.T) {
		s, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "cat"}}) // stdin unset ⇒ enabled
		for _, chunk := range []string{"Hello,\n", "", "World!"} {
			if _, err := e.process.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: pidSel(pid), Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte(chunk)}}})); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := e.process.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: pidSel(pid)})); err != nil {
			t.Fatal(err)
		}
		r := drain(t, s, false)
		if r.stdout != "Hello,\nWorld!" || r.end.GetExitCode() != 0 {
			t.Errorf("stdout %q end %v", r.stdout, r.end)
		}
	})

	t.Run("StreamInput", func(t *testing.T) {
		s, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "cat"}, Stdin: ptr(true)})
		in := e.process.StreamInput(ctx)
		msgs := []*pb.StreamInputRequest{
			{Event: &pb.StreamInputRequest_Start{Start: &pb.StreamInputRequest_StartEvent{Process: pidSel(pid)}}},
			{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("streamed ")}}}}},
			{Event: &pb.StreamInputRequest_Keepalive{Keepalive: &pb.StreamInputRequest_KeepAlive{}}},
			{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("input")}}}}},
		}
		for _, m := range msgs {
			if err := in.Send(m); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := in.CloseAndReceive(); err != nil {
			t.Fatal(err)
		}
		if _, err := e.process.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: pidSel(pid)})); err != nil {
			t.Fatal(err)
		}
		if r := drain(t, s, false); r.stdout != "streamed input" {
			t.Errorf("stdout %q", r.stdout)
		}
	})

	t.Run("StreamInput without start event", func(t *testing.T) {
		in := e.process.StreamInput(ctx)
		_ = in.Send(&pb.StreamInputRequest{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}}})
		if _, err := in.CloseAndReceive(); code(err) != connect.CodeInvalidArgument {
			t.Errorf("got %v, want invalid_argument", err)
		}
	})

	t.Run("stdin disabled refuses input", func(t *testing.T) {
		_, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "sleep", Args: []string{"30"}}, Stdin: ptr(false)})
		_, err := e.process.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: pidSel(pid), Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}))
		if code(err) != connect.CodeFailedPrecondition {
			t.Errorf("got %v, want failed_precondition", err)
		}
	})

	t.Run("input to a process that does not read gives up with the request", func(t *testing.T) {
		_, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "sleep", Args: []string{"30"}}, Stdin: ptr(true)})
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		big := make([]byte, 4<<20) // far more than a pipe holds
		_, err := e.process.SendInput(short, connect.NewRequest(&pb.SendInputRequest{Process: pidSel(pid), Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: big}}}))
		if code(err) != connect.CodeDeadlineExceeded {
			t.Errorf("got %v, want deadline_exceeded", err)
		}
		// The blocked write let go of stdin: closing it answers at once.
		t0 := time.Now()
		if _, err := e.process.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: pidSel(pid)})); err != nil || time.Since(t0) > time.Second {
			t.Errorf("CloseStdin after an abandoned write: %v after %v", err, time.Since(t0))
		}
	})

	t.Run("SIGTERM reaches the process", func(t *testing.T) {
		s, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", `trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.02; done`}}})
		waitForOutput(t, s, "ready\n")
		if _, err := e.process.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: pidSel(pid), Signal: pb.Signal_SIGNAL_SIGTERM})); err != nil {
			t.Fatal(err)
		}
		if r := drain(t, s, false); r.stdout != "got-term\n" || r.end.GetExitCode() != 7 {
			t.Errorf("stdout %q end %v", r.stdout, r.end)
		}
	})

	t.Run("SIGKILL kills the whole process group", func(t *testing.T) {
		marker := filepath.Join(e.dir, "grandchild.pid")
		s, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", "sleep 60 & echo $! > " + marker + "; echo ready; wait"}}})
		waitForOutput(t, s, "ready\n")
		raw, err := os.ReadFile(marker)
		if err != nil {
			t.Fatal(err)
		}
		var child int
		fmt.Sscan(string(raw), &child)
		if _, err := e.process.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: pidSel(pid), Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
			t.Fatal(err)
		}
		if r := drain(t, s, false); r.end.GetStatus() != "signal: killed" {
			t.Errorf("end %v", r.end)
		}
		waitFor(t, 5*time.Second, "the grandchild to die", func() bool { return !alive(child) })
	})

	t.Run("unspecified signal", func(t *testing.T) {
		_, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "sleep", Args: []string{"30"}}})
		_, err := e.process.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: pidSel(pid)}))
		if code(err) != connect.CodeInvalidArgument {
			t.Errorf("got %v, want invalid_argument", err)
		}
	})
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, _ := strings.Cut(string(b), ") ")
	return !strings.HasPrefix(rest, "Z")
}

// waitForOutput reads a stream until its stdout has grown to want.
func waitForOutput(t *testing.T, s *connect.ServerStreamForClient[pb.StartResponse], want string) {
	t.Helper()
	got := ""
	for !strings.Contains(got, want) && s.Receive() {
		got += string(s.Msg().GetEvent().GetData().GetStdout()) + string(s.Msg().GetEvent().GetData().GetPty())
	}
	if !strings.Contains(got, want) {
		t.Fatalf("output %q, want it to contain %q (err %v)", got, want, s.Err())
	}
}

func TestListTagsAndConnect(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(20 * time.Second)
	cwd := "/tmp"
	s, pid := e.started("", &pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", "read line; for i in 1 2 3; do echo $line-$i; done"}, Cwd: &cwd, Envs: map[string]string{"A": "b"}},
		Tag:     ptr("worker"),
	})

	list, err := e.process.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	var info *pb.ProcessInfo
	for _, p := range list.Msg.GetProcesses() {
		if p.GetPid() == pid {
			info = p
		}
	}
	if info == nil || info.GetTag() != "worker" || info.GetConfig().GetCwd() != "/tmp" || info.GetConfig().GetEnvs()["A"] != "b" ||
		strings.Join(info.GetConfig().GetArgs(), " ") != "-c read line; for i in 1 2 3; do echo $line-$i; done" {
		t.Fatalf("List has %v, want pid %d with its config and tag", list.Msg, pid)
	}

	// Two more subscribers, by tag and by pid: all three get the same output.
	var wg sync.WaitGroup
	results := make([]result, 2)
	for i, sel := range []*pb.ProcessSelector{tagSel("worker"), pidSel(pid)} {
		cs, err := e.process.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: sel}))
		if err != nil {
			t.Fatal(err)
		}
		// Wait for the start event so the subscription is in place before input.
		if !cs.Receive() || cs.Msg().GetEvent().GetStart().GetPid() != pid {
			t.Fatalf("Connect start event: %v %v", cs.Msg(), cs.Err())
		}
		wg.Go(func() {
			defer cs.Close()
			var r result
			for cs.Receive() {
				ev := cs.Msg().GetEvent()
				r.stdout += string(ev.GetData().GetStdout())
				if ev.GetEnd() != nil {
					r.end = ev.GetEnd()
				}
			}
			results[i] = r
		})
	}
	if _, err := e.process.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: tagSel("worker"), Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x\n")}}})); err != nil {
		t.Fatal(err)
	}
	main := drain(t, s, false)
	wg.Wait()
	want := "x-1\nx-2\nx-3\n"
	for i, r := range append(results, main) {
		if r.stdout != want || r.end.GetExitCode() != 0 {
			t.Errorf("subscriber %d: stdout %q end %v", i, r.stdout, r.end)
		}
	}
	waitFor(t, 5*time.Second, "the process to leave the list", func() bool {
		list, err := e.process.List(ctx, connect.NewRequest(&pb.ListRequest{}))
		return err == nil && len(list.Msg.GetProcesses()) == 0
	})
}

func TestDisconnectLeavesProcessRunning(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(20 * time.Second)
	s, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", "echo one; read x; echo two:$x"}}})
	waitForOutput(t, s, "one\n")
	s.Close() // the client goes away; no deadline was set, so the process stays
	time.Sleep(50 * time.Millisecond)
	cs, err := e.process.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: pidSel(pid)}))
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	if !cs.Receive() {
		t.Fatalf("reconnect: %v", cs.Err())
	}
	if _, err := e.process.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: pidSel(pid), Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("y\n")}}})); err != nil {
		t.Fatal(err)
	}
	var out string
	var end *pb.ProcessEvent_EndEvent
	for cs.Receive() {
		out += string(cs.Msg().GetEvent().GetData().GetStdout())
		end = cs.Msg().GetEvent().GetEnd()
	}
	if out != "two:y\n" || end.GetExitCode() != 0 {
		t.Errorf("after reconnect: %q %v", out, end)
	}
}

func TestPTY(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(20 * time.Second)
	s, pid := e.started("", &pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"--norc", "--noprofile", "-i"}, Envs: map[string]string{"PS1": "$ ", "TERM": "xterm-256color"}},
		Pty:     &pb.PTY{Size: &pb.PTY_Size{Cols: 80, Rows: 24}},
	})
	send := func(text string) {
		t.Helper()
		if _, err := e.process.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: pidSel(pid), Input: &pb.ProcessInput{Input: &pb.ProcessInput_Pty{Pty: []byte(text)}}})); err != nil {
			t.Fatal(err)
		}
	}
	send("tty; stty size\n")
	waitForOutput(t, s, "24 80")
	if _, err := e.process.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: pidSel(pid), Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 120, Rows: 40}}})); err != nil {
		t.Fatal(err)
	}
	send("stty size\n")
	waitForOutput(t, s, "40 120")

	// Stdin-style input and CloseStdin make no sense on a PTY.
	_, err := e.process.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: pidSel(pid), Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}))
	if code(err) != connect.CodeFailedPrecondition {
		t.Errorf("stdin input on a PTY: %v", err)
	}
	if _, err := e.process.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: pidSel(pid)})); code(err) != connect.CodeFailedPrecondition {
		t.Errorf("CloseStdin on a PTY: %v", err)
	}
	send("exit 4\n")
	r := drain(t, s, false)
	if r.end.GetExitCode() != 4 {
		t.Errorf("end %v", r.end)
	}
	if r.stdout != "" || r.stderr != "" {
		t.Errorf("PTY output must arrive as pty data, got stdout %q stderr %q", r.stdout, r.stderr)
	}

	// Update on a process without a PTY.
	_, pid2 := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "sleep", Args: []string{"30"}}})
	if _, err := e.process.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: pidSel(pid2), Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 1, Rows: 1}}})); code(err) != connect.CodeFailedPrecondition {
		t.Errorf("Update without PTY: %v", err)
	}
}

func TestPTYOutputIsCompleteAtExit(t *testing.T) {
	e := newEnv(t)
	r := e.run("", "", func(req *pb.StartRequest) {
		req.Process = &pb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", "seq 1 20000"}}
		req.Pty = &pb.PTY{Size: &pb.PTY_Size{Cols: 80, Rows: 24}}
	})
	if lines := strings.Count(r.pty, "\n"); lines != 20000 || !strings.HasSuffix(r.pty, "20000\r\n") {
		t.Errorf("got %d lines ending %q", lines, r.pty[max(0, len(r.pty)-20):])
	}
}

func TestKeepalive(t *testing.T) {
	e := newEnv(t)
	req := as("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "sleep", Args: []string{"2.3"}}})
	req.Header().Set("Keepalive-Ping-Interval", "1")
	s, err := e.process.Start(e.ctx(20*time.Second), req)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if r := collect(t, s); r.alive != 2 {
		t.Errorf("got %d keepalives over 2.3 s at a 1 s period, want 2", r.alive)
	}
	if r := e.run("", "sleep 1.2"); r.alive != 0 {
		t.Errorf("keepalives without the header: %d", r.alive)
	}
}

func TestTimeoutKillsProcess(t *testing.T) {
	e := newEnv(t)
	marker := filepath.Join(e.dir, "child.pid")
	// Connect-Timeout-Ms is what the SDK's timeoutMs sends; connect-go turns it
	// into the handler's deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	start := time.Now()
	s, err := e.process.Start(ctx, as("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", "sleep 60 & echo $! > " + marker + "; wait"}}}))
	if err != nil {
		t.Fatal(err)
	}
	for s.Receive() {
	}
	if c := code(s.Err()); c != connect.CodeDeadlineExceeded {
		t.Errorf("stream ended with %v, want deadline_exceeded", s.Err())
	}
	raw, err := os.ReadFile(marker)
	if err != nil {
		t.Fatal(err)
	}
	var child int
	fmt.Sscan(string(raw), &child)
	waitFor(t, 5*time.Second, "the timed-out process group to die", func() bool { return !alive(child) })
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("kill took %v", d)
	}
}

func TestBackgroundChildDoesNotHoldTheEnd(t *testing.T) {
	e := newEnv(t)
	start := time.Now()
	// The background sleep inherits stdout, so the pipe never reaches EOF while it
	// lives; the end event must still come right after bash exits.
	marker := filepath.Join(e.dir, "bg.pid")
	r := e.run("", "echo before; sleep 30 & echo $! > "+marker+"; echo after")
	if raw, err := os.ReadFile(marker); err == nil {
		var bg int
		fmt.Sscan(string(raw), &bg)
		t.Cleanup(func() { _ = syscall.Kill(bg, syscall.SIGKILL) })
	}
	if r.stdout != "before\nafter\n" || r.end.GetExitCode() != 0 {
		t.Errorf("stdout %q end %v", r.stdout, r.end)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("end event took %v", d)
	}
}

// TestFloodIsBounded checks backpressure: a process writing as fast as it can to a
// client that reads slowly must not make envd buffer its output, and must not slow
// down other requests.
func TestFloodIsBounded(t *testing.T) {
	e := newEnv(t)
	ctx := e.ctx(60 * time.Second)
	s, pid := e.started("", &pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", "yes | head -c 200000000"}}})

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	received := 0
	for i := 0; i < 40 && s.Receive(); i++ {
		received += len(s.Msg().GetEvent().GetData().GetStdout())
		time.Sleep(10 * time.Millisecond) // a slow reader
	}
	// While the flood is blocked on us, other requests are served promptly.
	t0 := time.Now()
	if res := e.do(http.MethodGet, "/health", nil, nil); res.StatusCode != http.StatusNoContent {
		t.Errorf("health during flood: %d", res.StatusCode)
	}
	if _, err := e.process.List(ctx, connect.NewRequest(&pb.ListRequest{})); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > time.Second {
		t.Errorf("requests during flood took %v", d)
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grown := int64(after.HeapInuse) - int64(before.HeapInuse); grown > 32<<20 {
		t.Errorf("heap grew by %d MiB while a slow client read %d KiB of a flood", grown>>20, received>>10)
	}
	if received == 0 || received >= 200000000 {
		t.Errorf("received %d bytes", received)
	}

	// Killing the flooder ends the stream promptly despite the queued output.
	if _, err := e.process.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: pidSel(pid), Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
		t.Fatal(err)
	}
	r := drain(t, s, false)
	if r.end.GetStatus() != "signal: killed" {
		t.Errorf("end %v", r.end)
	}
	// Without backpressure the flood would have written all 200 MB while we read
	// slowly. With it, only what fits in the pipe, the subscriber's queue and the
	// kernel's socket buffers (up to tcp_rmem+tcp_wmem, tens of MB) was produced.
	if total := received + len(r.stdout); total >= 150_000_000 {
		t.Errorf("the flood produced %d bytes while its only reader was slow: no backpressure", total)
	}
}

// TestLargeOutputIsComplete reads a large output at full speed: every byte
// arrives, in order, before the end event.
func TestLargeOutputIsComplete(t *testing.T) {
	e := newEnv(t)
	const size = 20_000_000
	r := e.run("", fmt.Sprintf("head -c %d /dev/zero | tr '\\0' a; echo -n end", size))
	if len(r.stdout) != size+3 || strings.Trim(r.stdout[:size], "a") != "" || !strings.HasSuffix(r.stdout, "end") {
		t.Errorf("got %d bytes, want %d a's then end", len(r.stdout), size)
	}
}

// TestManyConcurrentCommands runs commands in parallel, as agents do.
func TestManyConcurrentCommands(t *testing.T) {
	e := newEnv(t)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Go(func() {
			r := e.run("", fmt.Sprintf("echo %d", i))
			if r.stdout != fmt.Sprintf("%d\n", i) {
				t.Errorf("command %d: %q", i, r.stdout)
			}
		})
	}
	wg.Wait()
}
