//go:build linux && amd64

package kvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VM is one KVM virtual machine (a VM fd). Its methods may be called from
// any goroutine.
type VM struct {
	sys *System
	fd  int
}

// FD returns the VM file descriptor.
func (vm *VM) FD() int { return vm.fd }

// System returns the handle the VM was created from.
func (vm *VM) System() *System { return vm.sys }

// Close closes the VM fd. The kernel destroys the VM once its vCPU fds are
// closed too; that teardown is slow (tens of milliseconds), so callers keep
// it off latency-sensitive paths.
func (vm *VM) Close() error { return unix.Close(vm.fd) }

// CheckExtension is KVM_CHECK_EXTENSION on the VM fd, which some
// capabilities (e.g. KVM_CAP_XSAVE2) answer per VM.
func (vm *VM) CheckExtension(cap int) (int, error) {
	n, err := ioctl(vm.fd, kvmCheckExtension, uintptr(cap))
	if err != nil {
		return 0, fmt.Errorf("kvm: KVM_CHECK_EXTENSION(%d) on VM: %w", cap, err)
	}
	return int(n), nil
}

// XSaveSize returns the size of the buffer KVM_GET_XSAVE2 fills for this
// VM's vCPUs: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) when the kernel has it,
// else the 4096 bytes of struct kvm_xsave.
func (vm *VM) XSaveSize() int {
	n, err := vm.CheckExtension(CapXSave2)
	if err != nil || n < XSaveLegacySize {
		return XSaveLegacySize
	}
	return n
}

// SetUserMemoryRegion installs, changes or (with MemorySize 0) deletes a
// memory slot (KVM_SET_USER_MEMORY_REGION). On the development hosts the
// first slot costs ~0.05 ms before KVM_CREATE_IRQCHIP and ~7 ms after it,
// so callers register memory first.
func (vm *VM) SetUserMemoryRegion(r *UserspaceMemoryRegion) error {
	if _, err := ioctlPtr(vm.fd, kvmSetUserMemoryRegion, unsafe.Pointer(r)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_USER_MEMORY_REGION slot %d gpa %#x size %#x: %w",
			r.Slot, r.GuestPhysAddr, r.MemorySize, err)
	}
	return nil
}

// SetTSSAddr sets the guest-physical address of the three pages KVM needs
// for the real-mode TSS on Intel hosts (KVM_SET_TSS_ADDR).
func (vm *VM) SetTSSAddr(addr uint64) error {
	if _, err := ioctl(vm.fd, kvmSetTSSAddr, uintptr(addr)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_TSS_ADDR %#x: %w", addr, err)
	}
	return nil
}

// SetIdentityMapAddr sets the guest-physical address of the page KVM uses
// for its real-mode identity page table on Intel hosts
// (KVM_SET_IDENTITY_MAP_ADDR).
func (vm *VM) SetIdentityMapAddr(addr uint64) error {
	if _, err := ioctlPtr(vm.fd, kvmSetIdentityMapAddr, unsafe.Pointer(&addr)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_IDENTITY_MAP_ADDR %#x: %w", addr, err)
	}
	return nil
}

// CreateIRQChip creates the in-kernel PIC pair, IOAPIC and per-vCPU local
// APICs (KVM_CREATE_IRQCHIP). It must precede CreateVCPU.
func (vm *VM) CreateIRQChip() error {
	if _, err := ioctl(vm.fd, kvmCreateIRQChip, 0); err != nil {
		return fmt.Errorf("kvm: KVM_CREATE_IRQCHIP: %w", err)
	}
	return nil
}

// CreatePIT2 creates the in-kernel i8254 PIT (KVM_CREATE_PIT2); flags is a
// combination of PITSpeakerDummy.
func (vm *VM) CreatePIT2(flags uint32) error {
	cfg := PITConfig{Flags: flags}
	if _, err := ioctlPtr(vm.fd, kvmCreatePIT2, unsafe.Pointer(&cfg)); err != nil {
		return fmt.Errorf("kvm: KVM_CREATE_PIT2: %w", err)
	}
	return nil
}

// IRQLine drives input gsi of the in-kernel irqchip (KVM_IRQ_LINE): GSIs
// 0..15 reach both the PICs and the IOAPIC, 16..23 only the IOAPIC.
func (vm *VM) IRQLine(gsi uint32, high bool) error {
	l := irqLevel{IRQ: gsi}
	if high {
		l.Level = 1
	}
	if _, err := ioctlPtr(vm.fd, kvmIRQLine, unsafe.Pointer(&l)); err != nil {
		return fmt.Errorf("kvm: KVM_IRQ_LINE gsi %d level %d: %w", gsi, l.Level, err)
	}
	return nil
}

// RegisterIRQFD makes every write to eventfd efd pulse gsi (KVM_IRQFD).
func (vm *VM) RegisterIRQFD(efd int, gsi uint32) error {
	a := irqfd{FD: uint32(efd), GSI: gsi}
	if _, err := ioctlPtr(vm.fd, kvmIRQFD, unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("kvm: KVM_IRQFD fd %d gsi %d: %w", efd, gsi, err)
	}
	return nil
}

// UnregisterIRQFD undoes RegisterIRQFD.
func (vm *VM) UnregisterIRQFD(efd int, gsi uint32) error {
	a := irqfd{FD: uint32(efd), GSI: gsi, Flags: irqfdFlagDeassign}
	if _, err := ioctlPtr(vm.fd, kvmIRQFD, unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("kvm: KVM_IRQFD deassign fd %d gsi %d: %w", efd, gsi, err)
	}
	return nil
}

// IOEventFD describes a guest write that KVM turns into an eventfd signal
// instead of a userspace exit (KVM_IOEVENTFD).
type IOEventFD struct {
	// FD is the eventfd to signal.
	FD int
	// Addr is the guest-physical MMIO address, or the port when PIO.
	Addr uint64
	// Len is the access width that matches: 1, 2, 4 or 8 (0: any).
	Len uint32
	// PIO selects the port I/O space instead of MMIO.
	PIO bool
	// Datamatch, when HasDatamatch, restricts the match to writes of
	// exactly this value.
	Datamatch    uint64
	HasDatamatch bool
}

func (e *IOEventFD) raw(deassign bool) ioeventfd {
	a := ioeventfd{Addr: e.Addr, Len: e.Len, FD: int32(e.FD), Datamatch: e.Datamatch}
	if e.PIO {
		a.Flags |= ioeventfdFlagPIO
	}
	if e.HasDatamatch {
		a.Flags |= ioeventfdFlagDatamatch
	}
	if deassign {
		a.Flags |= ioeventfdFlagDeassign
	}
	return a
}

// RegisterIOEventFD installs e.
func (vm *VM) RegisterIOEventFD(e *IOEventFD) error {
	a := e.raw(false)
	if _, err := ioctlPtr(vm.fd, kvmIOEventFD, unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("kvm: KVM_IOEVENTFD addr %#x len %d: %w", e.Addr, e.Len, err)
	}
	return nil
}

// UnregisterIOEventFD removes e.
func (vm *VM) UnregisterIOEventFD(e *IOEventFD) error {
	a := e.raw(true)
	if _, err := ioctlPtr(vm.fd, kvmIOEventFD, unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("kvm: KVM_IOEVENTFD deassign addr %#x: %w", e.Addr, err)
	}
	return nil
}

// GetIRQChip reads the state of interrupt controller id (IRQChipPICMaster,
// IRQChipPICSlave or IRQChipIOAPIC).
func (vm *VM) GetIRQChip(id uint32) (*IRQChip, error) {
	c := &IRQChip{ChipID: id}
	if _, err := ioctlPtr(vm.fd, kvmGetIRQChip, unsafe.Pointer(c)); err != nil {
		return nil, fmt.Errorf("kvm: KVM_GET_IRQCHIP %d: %w", id, err)
	}
	return c, nil
}

// SetIRQChip writes the state of the interrupt controller c.ChipID.
func (vm *VM) SetIRQChip(c *IRQChip) error {
	if _, err := ioctlPtr(vm.fd, kvmSetIRQChip, unsafe.Pointer(c)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_IRQCHIP %d: %w", c.ChipID, err)
	}
	return nil
}

// GetPIT2 reads the in-kernel PIT state.
func (vm *VM) GetPIT2() (*PITState2, error) {
	p := &PITState2{}
	if _, err := ioctlPtr(vm.fd, kvmGetPIT2, unsafe.Pointer(p)); err != nil {
		return nil, fmt.Errorf("kvm: KVM_GET_PIT2: %w", err)
	}
	return p, nil
}

// SetPIT2 writes the in-kernel PIT state.
func (vm *VM) SetPIT2(p *PITState2) error {
	if _, err := ioctlPtr(vm.fd, kvmSetPIT2, unsafe.Pointer(p)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_PIT2: %w", err)
	}
	return nil
}

// GetClock reads the VM's kvmclock base (KVM_GET_CLOCK).
func (vm *VM) GetClock() (*ClockData, error) {
	c := &ClockData{}
	if _, err := ioctlPtr(vm.fd, kvmGetClock, unsafe.Pointer(c)); err != nil {
		return nil, fmt.Errorf("kvm: KVM_GET_CLOCK: %w", err)
	}
	return c, nil
}

// SetClock sets the VM's kvmclock base (KVM_SET_CLOCK). Only Clock (and
// Realtime when Flags has KVM_CLOCK_REALTIME) are used by the kernel.
func (vm *VM) SetClock(c *ClockData) error {
	if _, err := ioctlPtr(vm.fd, kvmSetClock, unsafe.Pointer(c)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_CLOCK: %w", err)
	}
	return nil
}

// CreateVCPU creates vCPU id (which is also its initial APIC id) and maps
// its kvm_run area.
func (vm *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctl(vm.fd, kvmCreateVCPU, uintptr(id))
	if err != nil {
		return nil, fmt.Errorf("kvm: KVM_CREATE_VCPU %d: %w", id, err)
	}
	run, err := unix.Mmap(int(fd), 0, vm.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(int(fd))
		return nil, fmt.Errorf("kvm: mmap kvm_run of vCPU %d: %w", id, err)
	}
	return &VCPU{id: id, fd: int(fd), run: run}, nil
}
