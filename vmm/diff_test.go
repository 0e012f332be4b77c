//go:build linux && amd64

package vmm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/memory"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
)

// hostPage is a guest-physical page the test guest never touches; the
// test writes it from the host (a VMM-side write KVM does not log).
const hostPage = 20 << 20

// TestDiffSnapshot: full snapshot, the guest goes on (a command, a disk
// read the device writes into guest memory from its own thread) and the
// host writes a page, then a diff snapshot: a few pages, not the RAM.
// Base + diff restores into a VM with exactly the memory of that moment
// (equal to a full snapshot taken at the same pause) whose guest carries
// on from there; the merge of base and diff is that full snapshot; a
// diff on the wrong base is refused; a diff of the restored VM applies to
// the same base again.
func TestDiffSnapshot(t *testing.T) {
	const memSize = 32 << 20
	disk := filepath.Join(t.TempDir(), "disk.img")
	content := writeDisk(t, disk, 2048, "diff-test")
	addDisk := func(t testing.TB, vm *VM) {
		if _, err := vm.AddBlock("vda", blk.Config{Path: disk}); err != nil {
			t.Fatal(err)
		}
	}
	vm, con := bootGuest(t, guestOpts{mem: memSize, track: true, devices: addDisk})
	con.waitFor(t, "ready\n")
	expect(t, vm, con, "p", "pong 1\n")
	s0, m0 := snapshotGuest(t, vm)
	if err := vm.Resume(); err != nil {
		t.Fatal(err)
	}
	expect(t, vm, con, "3R", regexp.QuoteMeta(readLine(content, 3)))
	expect(t, vm, con, "p", "pong 3\n")
	if _, err := vm.Memory().WriteAt([]byte("written by the host"), hostPage+8); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s1, m1 := filepath.Join(dir, "diff.state"), filepath.Join(dir, "diff.mem")
	pages, err := vm.SnapshotDiff(s1, m1)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(m1)
	if err != nil {
		t.Fatal(err)
	}
	alloc := memory.AllocatedBytes(fi)
	t.Logf("diff snapshot: %d dirty pages, %d KiB allocated of %d MiB", pages, alloc>>10, memSize>>20)
	if fi.Size() != memSize || pages == 0 || pages > 64 || alloc > int64(pages)*memory.PageSize+64<<10 {
		t.Fatalf("diff memory file: size %d, %d pages, %d bytes allocated; want %d bytes with a few pages", fi.Size(), pages, alloc, memSize)
	}
	usedRing := usedRingAddr(t, vm, "vda")
	for _, gpa := range []uint64{hostPage, usedRing &^ (memory.PageSize - 1)} {
		if !hasData(t, m1, int64(gpa)) {
			t.Errorf("diff lacks the page at %#x, which the VMM wrote", gpa)
		}
	}
	// A full snapshot of the same paused moment, and the merge.
	s2, m2 := filepath.Join(dir, "full.state"), filepath.Join(dir, "full.mem")
	if err := vm.Snapshot(s2, m2); err != nil {
		t.Fatal(err)
	}
	vm.Close()
	s3, m3 := filepath.Join(dir, "merged.state"), filepath.Join(dir, "merged.mem")
	if err := snapshot.Merge(m0, s1, m1, s3, m3); err != nil {
		t.Fatal(err)
	}
	full, merged := readFile(t, m2), readFile(t, m3)
	if !bytes.Equal(full, merged) {
		t.Fatal("base merged with diff differs from a full snapshot of the same moment")
	}
	st2, err := snapshot.ReadFile(s2)
	if err != nil {
		t.Fatal(err)
	}
	st3, err := snapshot.ReadFile(s3)
	if err != nil {
		t.Fatal(err)
	}
	if st3.Diff != nil || st3.MemoryID != st2.MemoryID || st2.MemoryID == 0 {
		t.Fatalf("merged state: diff %v, memory ID %#x; full snapshot's %#x", st3.Diff, st3.MemoryID, st2.MemoryID)
	}

	// Wrong bases and wrong entry points are refused.
	if v, err := RestoreDiff(Config{}, s1, m2, m1); !errors.Is(err, snapshot.ErrWrongBase) || !strings.Contains(err.Error(), "content ID") {
		closeIf(v)
		t.Fatalf("RestoreDiff onto the wrong base = %v, want ErrWrongBase", err)
	}
	if v, err := Restore(Config{}, s1, m1); !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "RestoreDiff") {
		closeIf(v)
		t.Fatalf("Restore of a diff = %v, want ErrIncompatible", err)
	}
	if v, err := RestoreDiff(Config{}, s0, m0, m1); !errors.Is(err, ErrIncompatible) {
		closeIf(v)
		t.Fatalf("RestoreDiff of a full snapshot = %v, want ErrIncompatible", err)
	}
	if err := snapshot.Merge(m2, s1, m1, s3, m3); !errors.Is(err, snapshot.ErrWrongBase) {
		t.Fatalf("Merge onto the wrong base = %v", err)
	}

	// The merged full snapshot restores and carries on.
	mv, mcon := restoreGuest(t, s3, m3, nil, addDisk)
	expect(t, mv, mcon, "p", "pong 4\n")
	mv.Close()

	// Base + diff: the memory of the diff's moment, and the guest carries
	// on from there (its command count, and the sectors the device read
	// into its buffer after the base, which it now writes back plus one).
	con2 := newConsole()
	rv, err := RestoreDiff(Config{Console: con2, TrackDirty: true}, s1, m0, m1)
	if err != nil {
		t.Fatal(err)
	}
	defer rv.Close()
	got := make([]byte, memSize)
	if _, err := rv.Memory().ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, full) {
		t.Fatal("memory restored from base + diff differs from the full snapshot of the same moment")
	}
	addDisk(t, rv)
	if err := rv.Start(); err != nil {
		t.Fatal(err)
	}
	expect(t, rv, con2, "5W", "blk write 5 status=0\n")
	b := readFile(t, disk)
	want := bytes.Clone(content[3*512 : 3*512+4096])
	for i := range want {
		want[i]++
	}
	if !bytes.Equal(b[5*512:5*512+4096], want) {
		t.Fatal("the restored guest's disk buffer is not what the device read after the base")
	}
	expect(t, rv, con2, "p", "pong 5\n")

	// A diff of the restored VM is against the same base.
	if err := rv.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	s4, m4 := filepath.Join(dir, "diff2.state"), filepath.Join(dir, "diff2.mem")
	pages2, err := rv.SnapshotDiff(s4, m4)
	if err != nil {
		t.Fatal(err)
	}
	if pages2 < pages {
		t.Errorf("second diff has %d pages, fewer than the %d of the diff it was restored from", pages2, pages)
	}
	rv.Close()
	con3 := newConsole()
	rv2, err := RestoreDiff(Config{Console: con3}, s4, m0, m4)
	if err != nil {
		t.Fatal(err)
	}
	defer rv2.Close()
	addDisk(t, rv2)
	if err := rv2.Start(); err != nil {
		t.Fatal(err)
	}
	expect(t, rv2, con3, "p", "pong 6\n")
	send(t, rv2, "q")
	mustClean(t, rv2, con3)
	checkOutput(t, con3.String(), "bye 7\n")
}

// TestSnapshotDiffNeedsTracking: diffs need Config.TrackDirty and a base.
func TestSnapshotDiffNeedsTracking(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mem: 16 << 20})
	con.waitFor(t, "ready\n")
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if _, err := vm.SnapshotDiff(filepath.Join(dir, "s"), filepath.Join(dir, "m")); !errors.Is(err, ErrState) {
		t.Fatalf("SnapshotDiff without tracking = %v, want ErrState", err)
	}
	tv, tcon := bootGuest(t, guestOpts{mem: 16 << 20, track: true})
	tcon.waitFor(t, "ready\n")
	if err := tv.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := tv.SnapshotDiff(filepath.Join(dir, "s"), filepath.Join(dir, "m")); !errors.Is(err, ErrState) || !strings.Contains(err.Error(), "base") {
		t.Fatalf("SnapshotDiff before a full snapshot = %v, want ErrState", err)
	}
}

func closeIf(v *VM) {
	if v != nil {
		v.Close()
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// hasData reports whether the file has data (not a hole) at off.
func hasData(t *testing.T, path string, off int64) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	return err == nil && got == off
}

// usedRingAddr returns the guest-physical address of queue 0's used ring
// of the named virtio device, from its saved state.
func usedRingAddr(t *testing.T, vm *VM, name string) uint64 {
	t.Helper()
	for _, d := range vm.VirtioDevices() {
		if d.Name() != name {
			continue
		}
		data, err := d.SaveState()
		if err != nil {
			t.Fatal(err)
		}
		var st virtioState
		if err := json.Unmarshal(data, &st); err != nil {
			t.Fatal(err)
		}
		if len(st.Transport.Queues) == 0 || !st.Transport.Queues[0].Ready {
			t.Fatalf("%s has no ready queue", name)
		}
		return st.Transport.Queues[0].DeviceAddr
	}
	t.Fatalf("no virtio device %s", name)
	return 0
}
