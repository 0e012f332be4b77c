//go:build linux && amd64

package microvm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
)

// TestNoFollow: the host reaches a jailed VMM's sockets and console, in a
// directory the jailed uid owns, only as what they are: a socket is
// dialled, but a symbolic link put in its place (to another socket, or to
// a host file as the console) is refused.
func TestNoFollow(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "vmm.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	ctx := context.Background()
	c, err := dialNoFollow(ctx, sock)
	if err != nil {
		t.Fatalf("dialling the socket itself: %v", err)
	}
	b := make([]byte, 2)
	if _, err := c.Read(b); err != nil || string(b) != "hi" {
		t.Errorf("read %q, %v", b, err)
	}
	c.Close()

	link := filepath.Join(dir, "vsock.sock")
	if err := os.Symlink(sock, link); err != nil {
		t.Fatal(err)
	}
	if c, err := dialNoFollow(ctx, link); err == nil {
		c.Close()
		t.Error("dialled through a symbolic link")
	}
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := dialNoFollow(ctx, file); !errors.Is(err, errNotSocket) {
		t.Errorf("dialling a regular file: %v", err)
	}

	console := filepath.Join(dir, "console.log")
	if err := os.Symlink(file, console); err != nil {
		t.Fatal(err)
	}
	if got := tail(console, 100); strings.Contains(got, "secret") {
		t.Errorf("tail followed a symbolic link: %q", got)
	}
	real := filepath.Join(dir, "real.log")
	if err := os.WriteFile(real, []byte("boot ok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := tail(real, 100); got != "boot ok" {
		t.Errorf("tail of the console: %q", got)
	}
}

// TestSweepJails: a new runtime removes the jails (root and cgroups) that
// no sandbox holds and no process runs in, and keeps one a sandbox holds,
// one with a process in it and a young one.
func TestSweepJails(t *testing.T) {
	testenv.RequireRoot(t, "makes cgroups")
	if err := CheckJail(); err != nil {
		t.Skipf("no jails here: %v", err)
	}
	state := t.TempDir()
	r := &Runtime{opts: Options{StateDir: state}, log: slog.New(slog.DiscardHandler)}
	pool := fmt.Sprintf("sweep%d", os.Getpid())
	old := time.Now().Add(-time.Hour)
	jail := func(n int, keep bool, age time.Time) jailer.Handle {
		t.Helper()
		cmd := exec.Command("/bin/sleep", "60")
		root := filepath.Join(state, jailDir, pool, fmt.Sprint(n))
		j, err := jailer.Config{Root: root, Cgroup: fmt.Sprintf("cubicle-vmm-%s-%d", pool, n)}.Apply(cmd)
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			j.Abort()
			t.Fatal(err)
		}
		if err := j.Started(cmd.Process.Pid); err != nil {
			t.Fatal(err)
		}
		h := j.Handle()
		t.Cleanup(func() { h.Kill(); cmd.Wait(); h.Remove() })
		if !keep { // its process gone, as an abandoned pooled VMM's
			cmd.Process.Kill()
			cmd.Wait()
		}
		if err := os.Chtimes(root, age, age); err != nil {
			t.Fatal(err)
		}
		return h
	}
	abandoned := jail(0, false, old)
	held := jail(1, false, old)
	busy := jail(2, true, old)
	young := jail(3, false, time.Now())
	if err := os.Mkdir(filepath.Join(state, "sbx"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := writeJSON(filepath.Join(state, "sbx", recordFile), record{Jail: &held}); err != nil {
		t.Fatal(err)
	}
	r.sweepJails()
	for _, p := range []string{abandoned.Root, abandoned.Memory, abandoned.Pids} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("abandoned jail's %s kept: %v", p, err)
		}
	}
	for name, h := range map[string]jailer.Handle{"held": held, "busy": busy, "young": young} {
		for _, p := range []string{h.Root, h.Memory, h.Pids} {
			if _, err := os.Stat(p); err != nil {
				t.Errorf("%s jail's %s removed: %v", name, p, err)
			}
		}
	}
}
