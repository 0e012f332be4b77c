//go:build linux && amd64

package kvm

import (
	"fmt"
	"runtime"
	"unsafe"
)

// MemLogDirtyPages is KVM_MEM_LOG_DIRTY_PAGES (linux/kvm.h), the flag of
// UserspaceMemoryRegion that makes KVM log guest writes to the slot.
const MemLogDirtyPages = 1 << 0

// Manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): with it
// enabled, KVM_GET_DIRTY_LOG only reports and KVM_CLEAR_DIRTY_LOG resets.
const (
	dirtyLogManualProtectEnable = 1 << 0 // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
)

// dirtyLog mirrors struct kvm_dirty_log (linux/kvm.h): the union of
// dirty_bitmap and padding2 is a 64-bit field holding the bitmap's address.
type dirtyLog struct {
	Slot     uint32
	Padding1 uint32
	Bitmap   uint64
}

// clearDirtyLog mirrors struct kvm_clear_dirty_log (linux/kvm.h).
type clearDirtyLog struct {
	Slot      uint32
	NumPages  uint32
	FirstPage uint64
	Bitmap    uint64
}

// enableCap mirrors struct kvm_enable_cap (linux/kvm.h).
type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	Pad   [64]uint8
}

const (
	sizeofDirtyLog      = unsafe.Sizeof(dirtyLog{})
	sizeofClearDirtyLog = unsafe.Sizeof(clearDirtyLog{})
	sizeofEnableCap     = unsafe.Sizeof(enableCap{})
)

// DirtyBitmapWords returns the length in uint64 words of the dirty bitmap
// of a slot of size bytes: one bit per 4 KiB page, rounded up to a whole
// word as the kernel copies it.
func DirtyBitmapWords(size uint64) int {
	pages := (size + 4095) / 4096
	return int((pages + 63) / 64)
}

// EnableManualDirtyLogProtect enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on
// the VM when the kernel has it, and reports whether it did. Enabled,
// KVM_GET_DIRTY_LOG no longer resets the log: ClearDirtyLog does. Call it
// before the first memory slot is created.
func (vm *VM) EnableManualDirtyLogProtect() (bool, error) {
	n, err := vm.CheckExtension(CapManualDirtyLogProtect2)
	if err != nil || n&dirtyLogManualProtectEnable == 0 {
		return false, nil
	}
	c := enableCap{Cap: CapManualDirtyLogProtect2}
	c.Args[0] = dirtyLogManualProtectEnable
	if _, err := ioctlPtr(vm.fd, kvmEnableCap, unsafe.Pointer(&c)); err != nil {
		return false, fmt.Errorf("kvm: KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2): %w", err)
	}
	return true, nil
}

// GetDirtyLog fills bitmap (DirtyBitmapWords of the slot's size) with the
// slot's dirty-page bitmap (KVM_GET_DIRTY_LOG): bit i of the result is
// page i of the slot, set if the guest wrote it since the log was last
// reset. Without manual protection this call also resets the log.
func (vm *VM) GetDirtyLog(slot uint32, bitmap []uint64) error {
	if len(bitmap) == 0 {
		return fmt.Errorf("kvm: KVM_GET_DIRTY_LOG slot %d: empty bitmap", slot)
	}
	l := dirtyLog{Slot: slot, Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	if _, err := ioctlPtr(vm.fd, kvmGetDirtyLog, unsafe.Pointer(&l)); err != nil {
		return fmt.Errorf("kvm: KVM_GET_DIRTY_LOG slot %d: %w", slot, err)
	}
	runtime.KeepAlive(bitmap) // the kernel wrote through an address held as an integer
	return nil
}

// ClearDirtyLog resets the log of the pages set in bitmap, for numPages
// pages from firstPage (a multiple of 64) of the slot
// (KVM_CLEAR_DIRTY_LOG; needs manual protection).
func (vm *VM) ClearDirtyLog(slot uint32, firstPage uint64, numPages uint32, bitmap []uint64) error {
	if len(bitmap) == 0 || uint64(len(bitmap))*64 < uint64(numPages) {
		return fmt.Errorf("kvm: KVM_CLEAR_DIRTY_LOG slot %d: bitmap of %d words for %d pages", slot, len(bitmap), numPages)
	}
	c := clearDirtyLog{Slot: slot, NumPages: numPages, FirstPage: firstPage,
		Bitmap: uint64(uintptr(unsafe.Pointer(&bitmap[0])))}
	if _, err := ioctlPtr(vm.fd, kvmClearDirtyLog, unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("kvm: KVM_CLEAR_DIRTY_LOG slot %d pages %d+%d: %w", slot, firstPage, numPages, err)
	}
	runtime.KeepAlive(bitmap) // the kernel wrote through an address held as an integer
	return nil
}
