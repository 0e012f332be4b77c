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
// # Virtio devices
//
// AddVirtio (and AddBlock, AddRNG, AddVsock, AddNet) puts a virtio device
// model behind a virtio-mmio transport (package virtio/mmio) in the next
// page of the MMIO window from MMIOBase, on the next interrupt line from
// FirstDeviceIRQ, delivered through an irqfd; each queue's QueueNotify
// write is an ioeventfd with the queue index as datamatch, so a
// notification wakes the device's worker without an exit to the VMM.
// LoadKernel announces the devices on the kernel command line
// (virtio_mmio.device=4K@<base>:<irq>), so on a new VM they are added
// before it. A snapshot keeps, under the device's name, its place, the
// transport's state (features, status, queue addresses and ring
// positions) and the model's own state; on a restored VM, AddVirtio under
// that name puts the device back where it was and resumes it, requests
// the guest had posted included. vsock connections do not survive a
// restore: the guest gets a transport reset.
//
//	vm, _ := vmm.New(vmm.Config{MemoryBytes: 256 << 20})
//	_, _ = vm.AddBlock("vda", blk.Config{Path: "rootfs.ext4"})
//	_, _ = vm.AddVsock("vsock0", vsock.Config{GuestCID: 3, UDSPath: "v.sock"})
//	_ = vm.LoadKernelFile("vmlinux", "console=ttyS0", boot.ProtocolPVH)
//
// A restore can be split (Prepare, then Prepared.Restore) so that a pool
// of idle VMM processes pays for mapping the memory file and building the
// KVM VM (memory slot, irqchip, PIT, vCPUs) before the sandbox exists.
// The restore starts the vCPU threads, which apply their saved state at
// once: an interrupt a device raises while it is being restored then finds
// the restored local APIC instead of being overwritten by it.
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
// Device workers (virtio) run on their own goroutines and touch guest
// memory; Pause stops them after the vCPUs, and Close stops them before
// guest memory is unmapped.
//
// Lock order: VM.mu, then a device's own locks (for virtio: the
// transport's, then the model's). VM.mu is never held while a vCPU is in
// KVM_RUN or while a bus access is handled, so devices may call back into
// the VM (the i8042 reset does); it is held while a restored device's
// state is loaded (AddVirtio), which may raise the device's interrupt.
package vmm
