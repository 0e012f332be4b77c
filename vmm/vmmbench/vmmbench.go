//go:build linux && amd64

// Package vmmbench holds the VMM's performance measurements as functions
// that both `go test -bench` (vmm's BenchmarkRestore) and `cubicle bench
// vmm` run: restore latency in process (serial and parallel), across
// processes (a cold `cubicle vmm` against a pooled one), the private
// memory of a VMM process, and the memory slope of many clones alive at
// once. It builds its own snapshots from the test guest, so it needs gcc
// and /dev/kvm. Figures are medians and percentiles, never pass/fail.
package vmmbench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/memory"
	"github.com/cubicle-dev/cubicle/vmm/testguest"
)

// RestoreMemory is the guest size of the restore benchmark (DESIGN.md:
// "VMM restore of a 512 MiB snapshot", target p50 ≤ 5 ms).
const RestoreMemory = 512 << 20

// postPort is the port the test guest writes in its spin loop (the PC
// POST-code port).
const postPort = 0x80

// MakeSnapshot boots the test guest with memBytes of RAM in spin mode (a
// tight loop writing port 0x80), snapshots it into dir and closes it.
func MakeSnapshot(dir string, memBytes uint64) (statePath, memPath string, err error) {
	imgs, err := testguest.Build()
	if err != nil {
		return "", "", err
	}
	vm, err := vmm.New(vmm.Config{MemoryBytes: memBytes})
	if err != nil {
		return "", "", err
	}
	defer vm.Close()
	post := &firstWrite{ch: make(chan struct{})}
	if err := vm.AddPIODevice("post", postPort, 1, post); err != nil {
		return "", "", err
	}
	cmdline := fmt.Sprintf("console=ttyS0 cubicle.mem=%d cubicle.mode=spin", memBytes)
	if err := vm.LoadKernelFile(imgs.ELF, cmdline, boot.ProtocolLinux64); err != nil {
		return "", "", err
	}
	if err := vm.Start(); err != nil {
		return "", "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	select {
	case <-post.ch:
	case <-ctx.Done():
		return "", "", fmt.Errorf("vmmbench: guest never reached its spin loop")
	}
	if err := vm.Pause(ctx); err != nil {
		return "", "", err
	}
	statePath, memPath = filepath.Join(dir, "bench.state"), filepath.Join(dir, "bench.mem")
	if err := vm.Snapshot(statePath, memPath); err != nil {
		return "", "", err
	}
	return statePath, memPath, nil
}

// firstWrite is a one-port device that closes ch on the first write.
type firstWrite struct {
	once sync.Once
	ch   chan struct{}
	n    atomic.Uint64
}

func (f *firstWrite) Read(_ uint64, data []byte) { clear(data) }

func (f *firstWrite) Write(uint64, []byte) {
	f.n.Add(1)
	f.once.Do(func() { close(f.ch) })
}

// DiffFigures is one diff snapshot of a restored guest.
type DiffFigures struct {
	// Pages is the number of pages in the diff; Allocated the diff
	// memory file's disk usage in bytes.
	Pages     int
	Allocated int64
	// Took is how long SnapshotDiff took.
	Took time.Duration
}

// DiffSnapshot restores the snapshot (statePath, memPath) with dirty
// tracking, lets the guest run for runFor, pauses it and takes a diff
// snapshot into dir against that base.
func DiffSnapshot(dir, statePath, memPath string, runFor time.Duration) (*DiffFigures, error) {
	vm, err := vmm.Restore(vmm.Config{TrackDirty: true}, statePath, memPath)
	if err != nil {
		return nil, err
	}
	defer vm.Close()
	post := &firstWrite{ch: make(chan struct{})}
	if err := vm.AddPIODevice("post", postPort, 1, post); err != nil {
		return nil, err
	}
	if err := vm.Start(); err != nil {
		return nil, err
	}
	time.Sleep(runFor)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := vm.Pause(ctx); err != nil {
		return nil, err
	}
	s, m := filepath.Join(dir, "diff.state"), filepath.Join(dir, "diff.mem")
	start := time.Now()
	n, err := vm.SnapshotDiff(s, m)
	took := time.Since(start)
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(m)
	if err != nil {
		return nil, err
	}
	return &DiffFigures{Pages: n, Allocated: memory.AllocatedBytes(fi), Took: took}, nil
}
