package capacity

import (
	"errors"
	"strings"
	"testing"
)

func TestReserveRelease(t *testing.T) {
	// A host of 4 GiB with 1 GiB kept back and 2 cores at 2 vCPUs each.
	l, err := New(Options{HostMemoryMB: 4096, ReserveMemoryMB: 1024, HostCPUs: 2, CPUOvercommit: 2})
	if err != nil {
		t.Fatal(err)
	}
	sb := Resources{CPUs: 1, MemoryMB: 1024}
	for i, id := range []string{"a", "b", "c"} {
		if err := l.Reserve(id, sb); err != nil {
			t.Fatalf("sandbox %d of 3 GiB: %v", i+1, err)
		}
	}
	err = l.Reserve("d", sb)
	var full *FullError
	if !errors.As(err, &full) || !errors.Is(err, ErrFull) || full.Resource != "memory" {
		t.Fatalf("fourth 1 GiB sandbox on 3 GiB: %v, want a memory FullError", err)
	}
	if want := "host is full: 3.0 of 3.0 GiB memory promised to sandboxes"; !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), "refused 1024 MiB") {
		t.Errorf("message %q, want it to start %q and say what was refused", err, want)
	}
	if err := l.Reserve("a", Resources{}); err == nil || errors.Is(err, ErrFull) {
		t.Errorf("a second reservation for one id: %v", err)
	}
	l.Release("b")
	l.Release("b") // a no-op
	if err := l.Reserve("d", sb); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	// CPUs: 4 vCPUs may be promised, 2 are.
	l.Release("d")
	if err := l.Reserve("e", Resources{CPUs: 3, MemoryMB: 1}); !errors.As(err, &full) || full.Resource != "vCPUs" {
		t.Fatalf("5 of 4 vCPUs: %v, want a vCPUs FullError", err)
	}
	if u := l.Usage(); u.Sandboxes != 2 || u.MemoryMB != 2048 || u.CPUs != 2 {
		t.Errorf("usage %+v, want 2 sandboxes, 2048 MiB, 2 vCPUs", u)
	}
	// Adopted sandboxes count even when they do not fit.
	l.Adopt("old", Resources{CPUs: 8, MemoryMB: 8192})
	if u := l.Usage(); u.CPUs != 10 || u.MemoryMB != 10240 {
		t.Errorf("usage after adopting %+v", u)
	}
}

func TestOvercommit(t *testing.T) {
	l, err := New(Options{HostMemoryMB: 2048, ReserveMemoryMB: 1024, HostCPUs: 1, MemoryOvercommit: 1.5})
	if err != nil {
		t.Fatal(err)
	}
	// 1.5 × (2048 - 1024) = 1536 MiB.
	if err := l.Reserve("a", Resources{CPUs: 1, MemoryMB: 1536}); err != nil {
		t.Fatal(err)
	}
	if err := l.Reserve("b", Resources{CPUs: 1, MemoryMB: 1}); !errors.Is(err, ErrFull) {
		t.Fatalf("past the over-committed memory: %v", err)
	}
	if u := l.Usage(); u.CPUCap != DefaultCPUOvercommit {
		t.Errorf("CPU cap %g on one core, want the default ratio %g", u.CPUCap, DefaultCPUOvercommit)
	}
	for _, bad := range []Options{
		{HostMemoryMB: 1024, ReserveMemoryMB: 1024},
		{HostMemoryMB: 1024, MemoryOvercommit: -1},
		{HostMemoryMB: 1024, DiskPath: "/nonexistent/dir"},
	} {
		if _, err := New(bad); err == nil {
			t.Errorf("New(%+v) accepted", bad)
		}
	}
}

// TestDisk counts disks against the real free space of a directory: a
// disk larger than what is free (less the reserve) is refused, and disks
// admitted but not yet allocated count against it until settled.
func TestDisk(t *testing.T) {
	dir := t.TempDir()
	free, err := freeMB(dir)
	if err != nil {
		t.Fatal(err)
	}
	if free < 64 {
		t.Skipf("only %d MiB free in %s", free, dir)
	}
	l, err := New(Options{HostMemoryMB: 1 << 20, DiskPath: dir, ReserveDiskMB: 16})
	if err != nil {
		t.Fatal(err)
	}
	var full *FullError
	if err = l.Reserve("huge", Resources{DiskMB: int(free)}); !errors.As(err, &full) || full.Resource != "disk" {
		t.Fatalf("a disk of all the free space with a reserve kept: %v, want a disk FullError", err)
	}
	t.Log(err)
	half := int(free-16) / 2
	if err := l.Reserve("a", Resources{DiskMB: half}); err != nil {
		t.Fatal(err)
	}
	// "a" is not allocated yet: another of the same size fits only just,
	// and a third, while both are pending, does not, however free the
	// filesystem still looks.
	if err := l.Reserve("b", Resources{DiskMB: half - 8}); err != nil {
		t.Fatalf("second disk: %v", err)
	}
	if err := l.Reserve("c", Resources{DiskMB: 16}); !errors.Is(err, ErrFull) {
		t.Fatalf("third disk while two are pending: %v", err)
	}
	l.Settle("a") // allocation is not faked here: statfs still says free
	l.Settle("a")
	if u := l.Usage(); u.PendingDiskMB != half-8 {
		t.Errorf("pending %d MiB after settling a, want %d", u.PendingDiskMB, half-8)
	}
	l.Release("b")
	if u := l.Usage(); u.PendingDiskMB != 0 {
		t.Errorf("pending %d MiB after releasing b", u.PendingDiskMB)
	}
}
