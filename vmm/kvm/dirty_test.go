//go:build linux && amd64

package kvm

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestDirtyLogIoctls exercises the dirty-log ioctls on a real slot: the
// log of a slot without KVM_MEM_LOG_DIRTY_PAGES is refused, that of a
// logging slot reads back, and with manual protection it can be cleared.
// (The vmm package's diff-snapshot tests check that guest writes show up.)
func TestDirtyLogIoctls(t *testing.T) {
	s := openKVM(t)
	vm, err := s.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	manual, err := vm.EnableManualDirtyLogProtect()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("manual dirty-log protection: %v", manual)
	const size = 1 << 20
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	addr := uint64(uintptr(unsafe.Pointer(&mem[0])))
	if err := vm.SetUserMemoryRegion(&UserspaceMemoryRegion{Slot: 0, MemorySize: size / 2, UserspaceAddr: addr}); err != nil {
		t.Fatal(err)
	}
	if err := vm.SetUserMemoryRegion(&UserspaceMemoryRegion{Slot: 1, Flags: MemLogDirtyPages,
		GuestPhysAddr: size / 2, MemorySize: size / 2, UserspaceAddr: addr + size/2}); err != nil {
		t.Fatal(err)
	}
	words := DirtyBitmapWords(size / 2)
	if words != 2 {
		t.Fatalf("DirtyBitmapWords(%d) = %d, want 2", size/2, words)
	}
	bm := make([]uint64, words)
	if err := vm.GetDirtyLog(0, bm); err == nil {
		t.Error("KVM_GET_DIRTY_LOG on a slot without dirty logging succeeded")
	}
	if err := vm.GetDirtyLog(5, bm); err == nil {
		t.Error("KVM_GET_DIRTY_LOG on a missing slot succeeded")
	}
	for i := range bm {
		bm[i] = ^uint64(0)
	}
	if err := vm.GetDirtyLog(1, bm); err != nil {
		t.Fatal(err)
	}
	for i, w := range bm {
		if w != 0 {
			t.Errorf("word %d of a slot no vCPU wrote = %#x", i, w)
		}
	}
	if manual {
		bm[0] = 0xff
		if err := vm.ClearDirtyLog(1, 0, 128, bm); err != nil {
			t.Fatal(err)
		}
		if err := vm.ClearDirtyLog(1, 3, 64, bm); err == nil {
			t.Error("KVM_CLEAR_DIRTY_LOG at a first page not a multiple of 64 succeeded")
		}
	} else if err := vm.ClearDirtyLog(1, 0, 128, bm); err == nil {
		t.Error("KVM_CLEAR_DIRTY_LOG without manual protection succeeded")
	}
	if err := vm.ClearDirtyLog(1, 0, 200, bm); err == nil {
		t.Error("ClearDirtyLog with too short a bitmap succeeded")
	}
}
