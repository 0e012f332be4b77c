package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFullDisk keeps the database writable on a full filesystem: with the
// data directory's filesystem (a small tmpfs the test mounts) filled from
// outside, sandbox records can still be deleted (a kill) and written, and
// once space is back the reserve is made again.
func TestFullDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=16m"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	ctx := context.Background()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if fi, err := os.Stat(filepath.Join(dir, reserveFile)); err != nil || fi.Size() != reserveSize {
		t.Fatalf("reserve file: %v %v", fi, err)
	}
	const n = 40
	for i := range n {
		if err := s.PutSandbox(ctx, Sandbox{ID: fmt.Sprintf("sb%02d", i), Metadata: map[string]string{"pad": string(bytes.Repeat([]byte("x"), 2000))}}); err != nil {
			t.Fatal(err)
		}
	}
	// Fill the filesystem.
	f, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	for err == nil {
		_, err = f.Write(make([]byte, 64<<10))
	}
	for err = nil; err == nil; _, err = f.Write(make([]byte, 512)) {
	}
	f.Close()
	if !errors.Is(err, unix.ENOSPC) {
		t.Fatalf("filling the filesystem: %v", err)
	}
	for i := range n {
		if err := s.DeleteSandbox(ctx, fmt.Sprintf("sb%02d", i)); err != nil {
			t.Fatalf("delete %d on a full disk: %v", i, err)
		}
	}
	if err := s.PutSandbox(ctx, Sandbox{ID: "late"}); err != nil {
		t.Fatalf("put on a full disk: %v", err)
	}
	recs, err := s.ListSandboxes(ctx)
	if err != nil || len(recs) != 1 || recs[0].ID != "late" {
		t.Fatalf("records after the deletes: %v %v", recs, err)
	}
	if !s.reserveGone.Load() {
		t.Fatal("the writes on a full disk did not need the reserve: the test did not fill the disk")
	}
	// Space back: the next write makes the reserve again.
	os.Remove(filepath.Join(dir, "filler"))
	if err := s.DeleteSandbox(ctx, "late"); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, reserveFile)); err != nil || fi.Size() != reserveSize || s.reserveGone.Load() {
		t.Fatalf("reserve after space came back: %v %v", fi, err)
	}
}
