package envd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/cubicle-dev/cubicle/guest/envd/gen/process"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process/processconnect"
)

// The test binary re-executes itself as envd's main: in a new PID namespace it is
// PID 1, so Run takes the init path for real.
const (
	helperEnv     = "ENVD_TEST_HELPER_ADDR" // address the helper serves on
	helperExitEnv = "ENVD_TEST_HELPER_EXIT" // exit code of the serving child after a clean stop
)

func TestMain(m *testing.M) {
	if addr := os.Getenv(helperEnv); addr != "" {
		os.Exit(helperMain(addr))
	}
	os.Exit(m.Run())
}

// helperMain is what `cubicle envd` does, with a twist for the test: the serving
// child exits with $ENVD_TEST_HELPER_EXIT after a clean shutdown.
func helperMain(addr string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err := Run(ctx, Options{Addr: addr, Logger: slog.New(slog.NewTextHandler(os.Stderr, nil)), RunDir: "-"})
	var exit *ExitError
	switch {
	case errors.As(err, &exit):
		return exit.Code
	case err != nil:
		fmt.Fprintln(os.Stderr, "helper:", err)
		return 1
	}
	n, _ := strconv.Atoi(os.Getenv(helperExitEnv))
	return n
}

func TestRunAsPID1(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("a PID namespace needs root")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+addr, helperExitEnv+"=3")
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := cmd.Start(); err != nil {
		if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EINVAL) {
			t.Skipf("cannot create a PID namespace here: %v", err)
		}
		t.Fatal(err)
	}
	initPID := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	base := "http://" + addr
	waitFor(t, 10*time.Second, "envd under init to serve", func() bool {
		res, err := http.Get(base + "/health")
		if err == nil {
			res.Body.Close()
		}
		return err == nil && res.StatusCode == http.StatusNoContent
	})

	// The server is a child of init, not init itself.
	server := childrenOf(t, initPID)
	if len(server) != 1 {
		t.Fatalf("init has children %v, want exactly the server", server)
	}

	// A command whose background child outlives it: the orphan is re-parented to
	// init, which must reap it when it exits, leaving no zombie.
	client := processconnect.NewProcessClient(http.DefaultClient, base, connect.WithProtoJSON())
	s, err := client.Start(context.Background(), connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/sh", Args: []string{"-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"}},
	}))
	if err != nil {
		t.Fatal(err)
	}
	var out string
	for s.Receive() {
		out += string(s.Msg().GetEvent().GetData().GetStdout())
	}
	if err := s.Err(); err != nil {
		t.Fatal(err)
	}
	s.Close()
	orphanNS, _ := strconv.Atoi(strings.TrimSpace(out))
	if orphanNS == 0 {
		t.Fatalf("no orphan pid in %q", out)
	}
	waitFor(t, 5*time.Second, "the orphan to be re-parented to init", func() bool {
		return len(childrenOf(t, initPID)) == 2
	})
	waitFor(t, 5*time.Second, "init to reap the orphan", func() bool {
		kids := childrenOf(t, initPID)
		return len(kids) == 1 && kids[0] == server[0]
	})

	// SIGTERM to init reaches the server, which shuts down; init exits with the
	// server's status.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 3 {
			t.Errorf("init exited with %v, want status 3 from the server", err)
		}
		exited <- err // for the cleanup
	case <-time.After(15 * time.Second):
		t.Fatal("init did not exit after SIGTERM")
	}
}

// childrenOf lists the host pids of pid's children (zombies included).
func childrenOf(t *testing.T, pid int) []int {
	t.Helper()
	var kids []int
	matches, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, m := range matches {
		f, err := os.Open(m)
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(f)
		f.Close()
		_, rest, ok := strings.Cut(string(b), ") ")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) < 2 {
			continue
		}
		if ppid, _ := strconv.Atoi(fields[1]); ppid == pid {
			child, _ := strconv.Atoi(filepath.Base(filepath.Dir(m)))
			kids = append(kids, child)
		}
	}
	return kids
}
