//go:build linux && amd64

// Package vmm is cubicle's virtual machine monitor: it assembles a KVM
// virtual machine from guest memory (package memory), the KVM layer
// (package kvm), a kernel loader (package boot) and device models, runs its
// vCPUs, pauses and resumes them, and saves and restores the whole machine
// as a snapshot (state file, package snapshot, plus memory file).
//
// A VM is built in one of two ways and then started:
//
//	vm, _ := vmm.New(vmm.Config{MemoryBytes: 256 << 20, Console: os.Stdout})
//	_ = vm.LoadKernelFile("vmlinux", "console=ttyS0", boot.ProtocolLinux64)
//	_ = vm.Start()
//
//	vm, _ := vmm.Restore(vmm.Config{Console: os.Stdout}, "vm.state", "vm.mem")
//	_ = vm.Start()
//
// Between construction and Start, more devices can be put on the port-I/O
// and MMIO buses (AddPIODevice, AddMMIODevice) with interrupt lines from
// InterruptLine; every VM has a 16550A UART on COM1 (IRQ 4) and an i8042
// whose reset command ends the VM.
//
// # Threads, ownership and lock order
//
// Each vCPU is owned by one goroutine locked to its OS thread for the
// vCPU's lifetime: only that thread calls KVM_RUN and reads the vCPU's
// kvm_run area, and it also applies and gathers vCPU state (as jobs handed
// to it while it is parked), so every vCPU ioctl happens on the thread
// KVM expects. Device accesses are handled synchronously on the vCPU
// thread that made them.
//
// Other goroutines steer the vCPUs through VM.mu and VM.cond: they set the
// wanted run state, set kvm_run.immediate_exit and send KickSignal to the
// vCPU threads; a vCPU thread re-reads the wanted state whenever KVM_RUN
// returns. A vCPU parks only after a KVM_RUN that returned EINTR, which
// guarantees that an MMIO or port I/O access it stopped on has been
// completed — so a paused VM can be snapshotted without replaying an
// access on restore.
//
// Lock order: VM.mu, then a device's own lock. VM.mu is never held while a
// vCPU is in KVM_RUN or while a device method runs, so devices may call
// back into the VM (the i8042 reset does).
package vmm
