//go:build linux && amd64

package microvm

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
