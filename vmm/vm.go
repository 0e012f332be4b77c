//go:build linux && amd64

package vmm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/devices"
	"github.com/cubicle-dev/cubicle/vmm/devices/i8042"
	"github.com/cubicle-dev/cubicle/vmm/devices/serial"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/memory"
	"golang.org/x/sys/unix"
)

// Fixed guest-physical addresses of the machine model.
const (
	// TSSAddr is where KVM keeps the three pages of its real-mode TSS on
	// Intel hosts (KVM_SET_TSS_ADDR); it lies in the MMIO hole, just below
	// the BIOS area, as in QEMU and Firecracker.
	TSSAddr = 0xfffbd000
	// MMIOBase..MMIOLimit is the window AllocateMMIO hands out for device
	// MMIO (virtio-mmio transports), inside the 32-bit MMIO hole below the
	// IOAPIC.
	MMIOBase  = 0xD000_0000
	MMIOLimit = boot.IOAPICAddr
	// FirstDeviceIRQ..LastDeviceIRQ are the GSIs AllocateIRQ hands out:
	// IOAPIC pins above the legacy ISA devices (PIT 0, keyboard 1,
	// cascade 2, COM2 3, COM1 4), below the 24th pin.
	FirstDeviceIRQ = 5
	LastDeviceIRQ  = 23
	// KickSignal interrupts a vCPU thread's KVM_RUN (SIGRTMIN+1; glibc
	// reserves 32 and 33). The Go runtime ignores it unless someone
	// subscribes to it with os/signal, which nothing in cubicle does.
	KickSignal = unix.Signal(35)
	// Names under which the built-in devices keep their snapshot state.
	SerialDeviceName = "serial0"
	I8042DeviceName  = "i8042"
)

// Config describes a VM.
type Config struct {
	// MemoryBytes is the guest RAM size (New only; a restored VM has its
	// snapshot's size).
	MemoryBytes uint64
	// VCPUs is the number of vCPUs (New only; 0 means 1).
	VCPUs int
	// Console receives the guest's serial output; nil discards it.
	Console io.Writer
	// Logger receives diagnostics; nil discards them.
	Logger *slog.Logger
	// KVM is a shared /dev/kvm handle; nil opens one for this VM.
	KVM *kvm.System
	// TrackDirty turns on dirty-page tracking (KVM dirty logging on every
	// memory slot, and the VMM's own writes) so that the VM can take diff
	// snapshots (SnapshotDiff) against its last full snapshot or the
	// snapshot it was restored from.
	TrackDirty bool
}

// lifecycle states, guarded by VM.mu.
type state int

const (
	stateCreated state = iota // built, not started
	stateRunning
	statePaused
	stateStopped // stop requested or happened; terminal
)

func (s state) String() string {
	return [...]string{"created", "running", "paused", "stopped"}[s]
}

// VM is one virtual machine. Its methods are safe for concurrent use.
type VM struct {
	// Set by build, read-only afterwards.
	log     *slog.Logger
	sys     *kvm.System
	ownSys  bool
	kvm     *kvm.VM
	mem     *memory.Memory
	pid     int
	pio     *devices.Bus // lock-free lookups, see devices.Bus
	mmio    *devices.Bus
	serial  *serial.Serial
	i8042   *i8042.Device
	runners []*vcpuRunner
	dirty   *dirtyTracker // nil unless Config.TrackDirty
	done    chan struct{} // closed when every vCPU thread has exited
	console *consoleWriter

	// firstExit is closed when a vCPU's KVM_RUN first returns with an exit
	// of the guest's own (see FirstExit).
	firstExit     chan struct{}
	firstExitOnce sync.Once

	// The PIT is created on its own goroutine (see build): it takes one
	// follow-up through pitInit (restored state, or nil) and reports on
	// pitDone. pitOnce and pitWait make both happen exactly once; pitErr
	// is written inside pitWait.
	pitInit chan func() error
	pitDone chan error
	pitOnce sync.Once
	pitWait sync.Once
	pitErr  error

	// setupDone carries each vCPU thread's initial-state result (set by
	// launch under mu); setupOnce and setupErr collect them once.
	setupDone chan error
	setupOnce sync.Once
	setupErr  error

	// mu guards the fields below and the runners' parked, exited and
	// jobs; cond (on mu) is broadcast on every change of them.
	mu   sync.Mutex
	cond *sync.Cond
	st   state
	// stopErr is why the VM stopped (valid once stopSet): nil for a guest
	// reset, ErrStopped for the host, or an *ExitError.
	stopErr  error
	stopSet  bool
	stateful map[string]devices.Stateful
	pausable []devices.Pausable
	restored map[string][]byte // device state from a snapshot, not yet claimed
	lines    map[uint32]*irqLine
	nextMMIO uint64
	nextIRQ  uint32
	virtio   []*VirtioDevice
	// cmdlineExtra holds the virtio devices' command-line fragments,
	// which LoadKernel appends to the kernel command line.
	cmdlineExtra []string
	initrd       []byte // for LoadKernel (LoadInitrdFile)
	bootReady    bool   // a kernel is loaded or state restored
	fromSnapshot bool   // state was restored from a snapshot
	preparing    bool   // LoadKernel is filling in the VM
	launched     bool   // launch has started the vCPU threads
	starting     bool   // Start was called
	closed       bool
}

// New creates a VM with cfg.MemoryBytes of RAM, cfg.VCPUs vCPUs, the
// in-kernel irqchip and PIT, a serial port and an i8042. Load a kernel
// and Start it.
func New(cfg Config) (*VM, error) {
	if err := memory.CheckSize(cfg.MemoryBytes); err != nil {
		return nil, err
	}
	n := max(cfg.VCPUs, 1)
	if n > boot.MaxVCPUs {
		return nil, fmt.Errorf("vmm: %d vCPUs, at most %d", n, boot.MaxVCPUs)
	}
	mem, err := memory.New(cfg.MemoryBytes)
	if err != nil {
		return nil, err
	}
	vm, err := build(cfg, mem, n)
	if err != nil {
		mem.Close()
		return nil, err
	}
	return vm, nil
}

// build creates the KVM VM around mem in the order that keeps creation
// cheap: memory slots before the irqchip (the first slot costs ~0.05 ms
// before KVM_CREATE_IRQCHIP and ~7 ms after it on the development hosts),
// then irqchip, PIT and vCPUs.
func build(cfg Config, mem *memory.Memory, vcpus int) (_ *VM, err error) {
	vm := &VM{
		log:       cfg.Logger,
		sys:       cfg.KVM,
		mem:       mem,
		pid:       unix.Getpid(),
		pio:       devices.NewBus(),
		mmio:      devices.NewBus(),
		done:      make(chan struct{}),
		console:   &consoleWriter{},
		firstExit: make(chan struct{}),
		stateful:  map[string]devices.Stateful{},
		lines:     map[uint32]*irqLine{},
		nextMMIO:  MMIOBase,
		nextIRQ:   FirstDeviceIRQ,
	}
	vm.cond = sync.NewCond(&vm.mu)
	if vm.log == nil {
		vm.log = slog.New(slog.DiscardHandler)
	}
	if vm.sys == nil {
		if vm.sys, err = kvm.Open(); err != nil {
			return nil, err
		}
		vm.ownSys = true
	}
	defer func() {
		if err != nil {
			vm.release()
		}
	}()
	if vm.kvm, err = vm.sys.CreateVM(); err != nil {
		return nil, err
	}
	if err = vm.kvm.SetTSSAddr(TSSAddr); err != nil {
		return nil, err
	}
	var slotFlags uint32
	if cfg.TrackDirty {
		t := &dirtyTracker{since: make([]uint64, mem.BitmapWords())}
		// Before the first slot: KVM_GET_DIRTY_LOG then only reports and
		// KVM_CLEAR_DIRTY_LOG resets, as Firecracker uses it.
		if t.manual, err = vm.kvm.EnableManualDirtyLogProtect(); err != nil {
			return nil, err
		}
		mem.EnableWriteTracking()
		vm.dirty = t
		slotFlags = kvm.MemLogDirtyPages
	}
	for i, r := range mem.Regions() {
		if err = vm.kvm.SetUserMemoryRegion(&kvm.UserspaceMemoryRegion{
			Slot:          uint32(i),
			Flags:         slotFlags,
			GuestPhysAddr: r.GuestAddr,
			MemorySize:    r.Size,
			UserspaceAddr: uint64(mem.HostAddr(r.Offset)),
		}); err != nil {
			return nil, err
		}
	}
	if err = vm.kvm.CreateIRQChip(); err != nil {
		return nil, err
	}
	// KVM_CREATE_PIT2 starts a kernel thread for the PIT and waits for
	// it: 0.1 to several ms on the development hosts, the longest step of
	// a restore. It runs alongside vCPU creation and setup; Start waits for
	// it (pitInit then applies restored PIT state) before any vCPU runs.
	vm.pitInit = make(chan func() error, 1)
	vm.pitDone = make(chan error, 1)
	go func() {
		err := vm.kvm.CreatePIT2(kvm.PITSpeakerDummy)
		init := <-vm.pitInit
		if err == nil && init != nil {
			err = init()
		}
		vm.pitDone <- err
	}()
	for i := range vcpus {
		cpu, err := vm.kvm.CreateVCPU(i)
		if err != nil {
			return nil, err
		}
		vm.runners = append(vm.runners, &vcpuRunner{vm: vm, cpu: cpu, index: i})
	}
	vm.SetConsole(cfg.Console)
	vm.serial = serial.New(vm.console, vm.line(serial.COM1IRQ), vm.log)
	vm.i8042 = i8042.New(vm.guestReset)
	return vm, nil
}

// sendPITInit hands the PIT goroutine what to do once the PIT exists.
// Only the first call counts.
func (vm *VM) sendPITInit(f func() error) {
	vm.pitOnce.Do(func() { vm.pitInit <- f })
}

// waitPIT waits for the PIT goroutine and returns its result.
func (vm *VM) waitPIT() error {
	if vm.pitDone == nil {
		return nil // never started
	}
	vm.sendPITInit(nil)
	vm.pitWait.Do(func() { vm.pitErr = <-vm.pitDone })
	return vm.pitErr
}

// attachBuiltins puts the serial port and the i8042 on the port bus.
func (vm *VM) attachBuiltins() error {
	if err := vm.AddPIODevice(SerialDeviceName, serial.COM1Base, serial.Size, vm.serial); err != nil {
		return err
	}
	return vm.AddPIODevice(I8042DeviceName, i8042.Base, i8042.Size, vm.i8042)
}

// LoadKernelFile loads the kernel at path; see LoadKernel.
func (vm *VM) LoadKernelFile(path, cmdline string, proto boot.Protocol) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("vmm: kernel: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("vmm: kernel: %w", err)
	}
	return vm.LoadKernel(f, st.Size(), cmdline, proto)
}

// LoadKernel copies a vmlinux or bzImage into guest memory, writes the
// boot structures for proto and prepares the vCPUs' initial state. The
// command-line fragments of the virtio devices added so far are appended
// to cmdline.
func (vm *VM) LoadKernel(r io.ReaderAt, size int64, cmdline string, proto boot.Protocol) error {
	vm.mu.Lock()
	ok := vm.st == stateCreated && !vm.bootReady && !vm.preparing
	vm.preparing = ok
	st := vm.st
	cmdline = fullCmdline(cmdline, vm.cmdlineExtra)
	vm.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: LoadKernel on a %v VM (kernel loaded: %v)", ErrState, st, vm.bootReady)
	}
	err := vm.loadKernel(r, size, cmdline, proto)
	vm.mu.Lock()
	vm.preparing = false
	vm.bootReady = err == nil
	vm.mu.Unlock()
	return err
}

// LoadInitrdFile reads an initial ramdisk that LoadKernel then places in
// guest memory and announces to the kernel. Call it before LoadKernel.
func (vm *VM) LoadInitrdFile(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("vmm: initrd: %w", err)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.st != stateCreated || vm.bootReady || vm.preparing {
		return fmt.Errorf("%w: LoadInitrdFile after LoadKernel or on a %v VM", ErrState, vm.st)
	}
	vm.initrd = b
	return nil
}

func (vm *VM) loadKernel(r io.ReaderAt, size int64, cmdline string, proto boot.Protocol) error {
	k, err := boot.LoadKernel(vm.mem, r, size)
	if err != nil {
		return err
	}
	vm.mu.Lock()
	initrd := vm.initrd
	vm.initrd = nil
	vm.mu.Unlock()
	bs, err := boot.Setup(vm.mem, k, boot.Config{Cmdline: cmdline, VCPUs: len(vm.runners), Protocol: proto, Initrd: initrd})
	if err != nil {
		return err
	}
	supported, err := vm.sys.SupportedCPUID()
	if err != nil {
		return err
	}
	pvm := vm.sys.PVM()
	for _, r := range vm.runners {
		cpuid := kvm.NormalizeCPUID(supported, kvm.Topology{VCPUs: len(vm.runners), APICID: r.index, PVM: pvm})
		r.setup = bootSetup(r.index, cpuid, bs)
	}
	return vm.attachBuiltins()
}

// bootSetup returns the first-run setup of a freshly booted vCPU: CPUID,
// XCR0 (kvm.GuestXCR0 says why), boot MSRs, LINT0/LINT1 wiring of its
// local APIC and, for the bootstrap processor, the entry registers.
// Application processors keep the wait-for-SIPI state KVM gives them.
func bootSetup(index int, cpuid []kvm.CPUIDEntry, bs *boot.BootState) func(*kvm.VCPU) error {
	return func(c *kvm.VCPU) error {
		if err := c.SetCPUID2(cpuid); err != nil {
			return err
		}
		if xcr0 := kvm.GuestXCR0(cpuid); xcr0 != 0 {
			if err := c.SetXCRs(&kvm.XCRs{NrXCRs: 1, XCRs: [16]kvm.XCR{{XCR: 0, Value: xcr0}}}); err != nil {
				return err
			}
		}
		if err := c.SetMSRs(kvm.BootMSRs()); err != nil {
			return err
		}
		l, err := c.GetLAPIC()
		if err != nil {
			return err
		}
		l.Set32(kvm.LAPICRegLVT0, l.Get32(kvm.LAPICRegLVT0)&^kvm.LAPICModeMask|kvm.LAPICModeExt)
		l.Set32(kvm.LAPICRegLVT1, l.Get32(kvm.LAPICRegLVT1)&^kvm.LAPICModeMask|kvm.LAPICModeNMI)
		if err := c.SetLAPIC(l); err != nil {
			return err
		}
		if index != 0 {
			return nil
		}
		s, err := c.GetSregs()
		if err != nil {
			return err
		}
		bs.ApplySregs(s)
		if err := c.SetSregs(s); err != nil {
			return err
		}
		regs := bs.Regs
		if err := c.SetRegs(&regs); err != nil {
			return err
		}
		return c.SetFPU(bs.FPU())
	}
}

// RegisterIOEventFD makes KVM signal an eventfd for matching guest writes
// instead of exiting to the VMM (virtio queue notifications); the access
// then never reaches the bus.
func (vm *VM) RegisterIOEventFD(e *kvm.IOEventFD) error { return vm.kvm.RegisterIOEventFD(e) }

// UnregisterIOEventFD undoes RegisterIOEventFD.
func (vm *VM) UnregisterIOEventFD(e *kvm.IOEventFD) error { return vm.kvm.UnregisterIOEventFD(e) }

// Memory returns guest RAM, for devices that read and write it.
func (vm *VM) Memory() *memory.Memory { return vm.mem }

// PVM reports whether the VM runs on a PVM host (see kvm.System.PVM).
func (vm *VM) PVM() bool { return vm.sys.PVM() }

// VCPUs returns the number of vCPUs.
func (vm *VM) VCPUs() int { return len(vm.runners) }

// SerialInput queues host bytes for the guest's COM1 and returns how many
// fit in its receive FIFO.
func (vm *VM) SerialInput(p []byte) int { return vm.serial.Input(p) }

// AddPIODevice puts dev on ports [port, port+size). See AddMMIODevice for
// naming and state.
func (vm *VM) AddPIODevice(name string, port, size uint16, dev devices.PIODevice) error {
	return vm.addDevice(vm.pio, name, uint64(port), uint64(size), dev)
}

// AddMMIODevice puts dev at guest-physical [addr, addr+size). Devices can
// only be added before Start. name identifies the device in snapshots: if
// dev implements devices.Stateful its state is saved under name, and on a
// restored VM the state saved under name is loaded into dev here. If dev
// implements devices.Pausable it is paused and resumed with the vCPUs.
func (vm *VM) AddMMIODevice(name string, addr, size uint64, dev devices.MMIODevice) error {
	if addr < memory.MMIOHoleStart || addr+size > MMIOLimit || addr+size < addr {
		return fmt.Errorf("vmm: MMIO device %s at [%#x, +%#x) is outside [%#x, %#x), the part of the MMIO hole below the IOAPIC",
			name, addr, size, memory.MMIOHoleStart, uint64(MMIOLimit))
	}
	return vm.addDevice(vm.mmio, name, addr, size, dev)
}

func (vm *VM) addDevice(bus *devices.Bus, name string, base, size uint64, dev devices.MMIODevice) error {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.st != stateCreated {
		return fmt.Errorf("%w: adding device %s to a %v VM", ErrState, name, vm.st)
	}
	s, isStateful := dev.(devices.Stateful)
	if isStateful {
		if name == "" {
			return fmt.Errorf("vmm: stateful device at %#x needs a name", base)
		}
		if _, dup := vm.stateful[name]; dup {
			return fmt.Errorf("vmm: two devices named %q", name)
		}
		if data, ok := vm.restored[name]; ok {
			if err := s.RestoreState(data); err != nil {
				return fmt.Errorf("vmm: restoring device %s: %w", name, err)
			}
			delete(vm.restored, name)
		}
	}
	if err := bus.Insert(name, base, size, dev); err != nil {
		return err
	}
	if isStateful {
		vm.stateful[name] = s
	}
	if p, ok := dev.(devices.Pausable); ok {
		vm.pausable = append(vm.pausable, p)
	}
	return nil
}

// AllocateMMIO reserves size bytes (rounded up to a page) of device MMIO
// space. Allocation is deterministic: a VM restored from a snapshot hands
// out the same addresses when devices are added in the same order.
func (vm *VM) AllocateMMIO(size uint64) (uint64, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.allocateMMIOLocked(size)
}

func (vm *VM) allocateMMIOLocked(size uint64) (uint64, error) {
	size = (size + memory.PageSize - 1) &^ (memory.PageSize - 1)
	if size == 0 || size > MMIOLimit-vm.nextMMIO {
		return 0, fmt.Errorf("%w: %#x bytes of MMIO", ErrNoResources, size)
	}
	a := vm.nextMMIO
	vm.nextMMIO += size
	return a, nil
}

// AllocateIRQ reserves an interrupt line (GSI) for a device, in a
// deterministic order like AllocateMMIO.
func (vm *VM) AllocateIRQ() (uint32, error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.allocateIRQLocked()
}

func (vm *VM) allocateIRQLocked() (uint32, error) {
	if vm.nextIRQ > LastDeviceIRQ {
		return 0, fmt.Errorf("%w: all IRQs %d..%d taken", ErrNoResources, FirstDeviceIRQ, LastDeviceIRQ)
	}
	g := vm.nextIRQ
	vm.nextIRQ++
	return g, nil
}

// InterruptLine returns the line for gsi (0..23).
func (vm *VM) InterruptLine(gsi uint32) (devices.InterruptLine, error) {
	if gsi > LastDeviceIRQ {
		return nil, fmt.Errorf("vmm: GSI %d out of range 0..%d", gsi, LastDeviceIRQ)
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.line(gsi), nil
}

// line returns the irqLine for gsi, creating it. Callers hold mu or are
// building the VM.
func (vm *VM) line(gsi uint32) *irqLine {
	l, ok := vm.lines[gsi]
	if !ok {
		l = &irqLine{vm: vm.kvm, gsi: gsi}
		vm.lines[gsi] = l
	}
	return l
}

// launch starts the vCPU threads (once): each applies its initial state
// and reports to setupResult, then waits for Start. A restored VM launches
// them during the restore, so that its vCPUs (local APICs included) hold
// their restored state before any device can raise an interrupt: one
// delivered earlier would be overwritten by KVM_SET_LAPIC and lost.
func (vm *VM) launch() {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.launched || vm.st != stateCreated {
		return
	}
	vm.launched = true
	vm.setupDone = make(chan error, len(vm.runners))
	var wg sync.WaitGroup
	for _, r := range vm.runners {
		wg.Add(1)
		go r.run(vm.setupDone, &wg)
	}
	go func() {
		wg.Wait()
		close(vm.done)
	}()
}

// setupResult waits for every launched vCPU to apply its initial state
// and returns the first error.
func (vm *VM) setupResult() error {
	vm.setupOnce.Do(func() {
		vm.mu.Lock()
		ch := vm.setupDone
		vm.mu.Unlock()
		if ch == nil {
			vm.setupErr = fmt.Errorf("%w: vCPU threads not started", ErrState)
			return
		}
		for range vm.runners {
			if err := <-ch; err != nil && vm.setupErr == nil {
				vm.setupErr = err
			}
		}
	})
	return vm.setupErr
}

// Start runs the vCPUs. Each vCPU's thread first applies its initial state
// (boot registers or restored state, the latter already during the
// restore); Start returns once all have done so, with the first error if
// any failed (the VM is then stopped).
func (vm *VM) Start() error {
	vm.mu.Lock()
	if vm.st != stateCreated || !vm.bootReady || vm.preparing || vm.starting {
		defer vm.mu.Unlock()
		return fmt.Errorf("%w: Start on a %v VM (kernel or snapshot loaded: %v, starting: %v)", ErrState, vm.st, vm.bootReady, vm.starting)
	}
	for name := range vm.restored {
		vm.mu.Unlock()
		return fmt.Errorf("%w: snapshot has state for device %q, which this VM does not have", ErrIncompatible, name)
	}
	vm.starting = true
	vm.mu.Unlock()

	vm.launch()
	first := vm.setupResult()
	if err := vm.waitPIT(); err != nil && first == nil {
		first = err
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if first != nil {
		vm.stopLocked(first)
		return first
	}
	if vm.st == stateCreated {
		vm.st = stateRunning
	}
	vm.cond.Broadcast()
	return nil
}

// Pause stops all vCPUs and then the Pausable devices. It returns when
// every vCPU has parked (with any pending MMIO/PIO access completed) or
// when ctx ends.
func (vm *VM) Pause(ctx context.Context) error {
	vm.mu.Lock()
	if vm.st != stateRunning {
		defer vm.mu.Unlock()
		return fmt.Errorf("%w: Pause on a %v VM", ErrState, vm.st)
	}
	vm.st = statePaused
	vm.kickAllLocked()
	stop := context.AfterFunc(ctx, func() {
		vm.mu.Lock()
		vm.cond.Broadcast()
		vm.mu.Unlock()
	})
	defer stop()
	for !vm.allParkedLocked() {
		if err := ctx.Err(); err != nil {
			vm.mu.Unlock()
			return fmt.Errorf("vmm: pause: %w", err)
		}
		if vm.st != statePaused {
			vm.mu.Unlock()
			return fmt.Errorf("%w: VM stopped while pausing", ErrState)
		}
		vm.cond.Wait()
	}
	pausable := append([]devices.Pausable(nil), vm.pausable...)
	vm.mu.Unlock()
	for _, p := range pausable {
		if err := p.Pause(); err != nil {
			return fmt.Errorf("vmm: pausing device: %w", err)
		}
	}
	return nil
}

func (vm *VM) allParkedLocked() bool {
	for _, r := range vm.runners {
		if !r.parked && !r.exited {
			return false
		}
	}
	return true
}

// Resume resumes the Pausable devices and then the vCPUs.
func (vm *VM) Resume() error {
	vm.mu.Lock()
	if vm.st != statePaused {
		defer vm.mu.Unlock()
		return fmt.Errorf("%w: Resume on a %v VM", ErrState, vm.st)
	}
	pausable := append([]devices.Pausable(nil), vm.pausable...)
	vm.mu.Unlock()
	for _, p := range pausable {
		if err := p.Resume(); err != nil {
			return fmt.Errorf("vmm: resuming device: %w", err)
		}
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.st == statePaused {
		vm.st = stateRunning
		vm.cond.Broadcast()
	}
	return nil
}

// Stop asks the vCPUs to stop and returns at once; Wait reports
// ErrStopped unless the VM had already stopped for another reason.
func (vm *VM) Stop() {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	vm.stopLocked(ErrStopped)
}

// guestReset is the i8042's reset callback: a clean, guest-requested end.
func (vm *VM) guestReset() {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	vm.log.Debug("vmm: guest requested reset")
	vm.stopLocked(nil)
}

// stopLocked records why the VM stops (the first reason wins) and kicks
// every vCPU out of the guest.
func (vm *VM) stopLocked(reason error) {
	if !vm.stopSet {
		vm.stopSet = true
		vm.stopErr = reason
	}
	if vm.st == stateStopped {
		return
	}
	neverLaunched := !vm.launched
	vm.st = stateStopped
	vm.kickAllLocked()
	vm.cond.Broadcast()
	if neverLaunched {
		close(vm.done) // no vCPU thread was ever started
	}
}

// kickAllLocked makes every vCPU leave KVM_RUN soon: immediate_exit makes
// the next entry return at once, the signal interrupts a current one.
func (vm *VM) kickAllLocked() {
	for _, r := range vm.runners {
		r.cpu.SetImmediateExit(true)
		if tid := r.tid.Load(); tid != 0 {
			_ = unix.Tgkill(vm.pid, int(tid), KickSignal)
		}
	}
}

// FirstExit is closed once a vCPU has run guest code: when KVM_RUN first
// returns with an exit the guest caused (a port or MMIO access, a halt,
// ...), as opposed to a kick. For a restored VM it marks the point where
// the restored vCPU is running again.
func (vm *VM) FirstExit() <-chan struct{} { return vm.firstExit }

// SetConsole redirects the guest's serial output to w (nil discards it);
// a VM prepared before its sandbox was known gets its console this way.
func (vm *VM) SetConsole(w io.Writer) { vm.console.set(w) }

// State returns the VM's lifecycle state: "created", "running", "paused"
// or "stopped".
func (vm *VM) State() string {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.st.String()
}

// Done is closed when all vCPU threads have exited.
func (vm *VM) Done() <-chan struct{} { return vm.done }

// Wait blocks until the VM has stopped and returns why: nil when the guest
// reset or powered off the machine, ErrStopped after Stop, an *ExitError
// when a vCPU hit a fatal exit. It returns ctx's error if ctx ends first.
func (vm *VM) Wait(ctx context.Context) error {
	select {
	case <-vm.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return vm.stopErr
}

// Close stops the VM, waits for its vCPU threads and releases everything:
// vCPU and VM fds, eventfds, guest memory, the KVM handle if the VM opened
// it. Destroying a KVM VM takes tens of milliseconds; callers on a
// latency-sensitive path close in the background.
func (vm *VM) Close() error {
	vm.mu.Lock()
	if vm.closed {
		vm.mu.Unlock()
		return nil
	}
	vm.closed = true
	vm.stopLocked(ErrStopped)
	virtio := vm.virtio
	vm.virtio = nil
	vm.mu.Unlock()
	<-vm.done
	// Device workers use guest memory: stop them before it goes.
	var errs []error
	for _, d := range virtio {
		errs = append(errs, d.close())
	}
	return errors.Join(append(errs, vm.release())...)
}

// release frees the KVM and memory resources of a VM whose vCPU threads
// are not running.
func (vm *VM) release() error {
	errs := []error{vm.waitPIT()}
	for _, r := range vm.runners {
		errs = append(errs, r.cpu.Close())
	}
	for _, l := range vm.lines {
		errs = append(errs, l.close())
	}
	if vm.kvm != nil {
		errs = append(errs, vm.kvm.Close())
	}
	if vm.ownSys && vm.sys != nil {
		errs = append(errs, vm.sys.Close())
	}
	errs = append(errs, vm.mem.Close())
	return errors.Join(errs...)
}

// consoleWriter is the serial port's output: an io.Writer that can be
// pointed elsewhere at any time (SetConsole).
type consoleWriter struct {
	w atomic.Pointer[io.Writer]
}

func (c *consoleWriter) set(w io.Writer) {
	if w == nil {
		w = io.Discard
	}
	c.w.Store(&w)
}

func (c *consoleWriter) Write(p []byte) (int, error) { return (*c.w.Load()).Write(p) }
