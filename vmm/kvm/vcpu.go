//go:build linux && amd64

package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ErrInterrupted is returned by VCPU.Run when KVM_RUN returned EINTR: a
// signal arrived or immediate_exit was set. Any MMIO or port I/O completion
// pending from the previous exit has been applied by then.
var ErrInterrupted = errors.New("kvm: KVM_RUN interrupted")

// ErrRunArea is returned when the kernel's kvm_run area describes data
// outside itself; it never should.
var ErrRunArea = errors.New("kvm: malformed kvm_run area")

// ExitReason is kvm_run.exit_reason (linux/kvm.h KVM_EXIT_*).
type ExitReason uint32

// Exit reasons the VMM handles or reports (linux/kvm.h).
const (
	ExitUnknown       ExitReason = 0
	ExitException     ExitReason = 1
	ExitIO            ExitReason = 2
	ExitHypercall     ExitReason = 3
	ExitDebug         ExitReason = 4
	ExitHLT           ExitReason = 5
	ExitMMIO          ExitReason = 6
	ExitIRQWindowOpen ExitReason = 7
	ExitShutdown      ExitReason = 8
	ExitFailEntry     ExitReason = 9
	ExitIntr          ExitReason = 10
	ExitNMI           ExitReason = 16
	ExitInternalError ExitReason = 17
	ExitSystemEvent   ExitReason = 24
	ExitIOAPICEOI     ExitReason = 26
)

func (r ExitReason) String() string {
	var n string
	switch r {
	case ExitUnknown:
		n = "UNKNOWN"
	case ExitException:
		n = "EXCEPTION"
	case ExitIO:
		n = "IO"
	case ExitHypercall:
		n = "HYPERCALL"
	case ExitDebug:
		n = "DEBUG"
	case ExitHLT:
		n = "HLT"
	case ExitMMIO:
		n = "MMIO"
	case ExitIRQWindowOpen:
		n = "IRQ_WINDOW_OPEN"
	case ExitShutdown:
		n = "SHUTDOWN"
	case ExitFailEntry:
		n = "FAIL_ENTRY"
	case ExitIntr:
		n = "INTR"
	case ExitNMI:
		n = "NMI"
	case ExitInternalError:
		n = "INTERNAL_ERROR"
	case ExitSystemEvent:
		n = "SYSTEM_EVENT"
	case ExitIOAPICEOI:
		n = "IOAPIC_EOI"
	default:
		return fmt.Sprintf("KVM_EXIT_%d", uint32(r))
	}
	return "KVM_EXIT_" + n
}

// System event types (linux/kvm.h KVM_SYSTEM_EVENT_*).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
)

// Offsets into struct kvm_run (linux/kvm.h); layout_test.go checks them.
const (
	runImmediateExit = 1
	runExitReason    = 8
	runUnion         = 32
	// KVM_EXIT_IO
	runIODirection  = runUnion + 0
	runIOSize       = runUnion + 1
	runIOPort       = runUnion + 2
	runIOCount      = runUnion + 4
	runIODataOffset = runUnion + 8
	// KVM_EXIT_MMIO
	runMMIOPhysAddr = runUnion + 0
	runMMIOData     = runUnion + 8
	runMMIOLen      = runUnion + 16
	runMMIOIsWrite  = runUnion + 20
	// KVM_EXIT_FAIL_ENTRY
	runFailReason = runUnion + 0
	runFailCPU    = runUnion + 8
	// KVM_EXIT_INTERNAL_ERROR
	runInternalSuberror = runUnion + 0
	runInternalNData    = runUnion + 4
	runInternalData     = runUnion + 8
	// KVM_EXIT_SYSTEM_EVENT
	runSystemEventType  = runUnion + 0
	runSystemEventNData = runUnion + 4
	runSystemEventData  = runUnion + 8
	// KVM_EXIT_UNKNOWN
	runHWExitReason = runUnion + 0
)

// kvmExitIOOut is KVM_EXIT_IO_OUT (linux/kvm.h).
const kvmExitIOOut = 1

// VCPU is one virtual CPU: its fd and its mmapped kvm_run area. Run must
// always be called from the same locked OS thread (see the package doc);
// the exit accessors read the kvm_run area and are only meaningful on that
// thread between two Runs. Get/Set state methods may be called from any
// goroutine while the vCPU is not running.
type VCPU struct {
	id  int
	fd  int
	run []byte
}

// ID returns the vCPU id given to KVM_CREATE_VCPU.
func (c *VCPU) ID() int { return c.id }

// FD returns the vCPU file descriptor.
func (c *VCPU) FD() int { return c.fd }

// Close unmaps the kvm_run area and closes the vCPU fd.
func (c *VCPU) Close() error {
	var err error
	if c.run != nil {
		err = unix.Munmap(c.run)
		c.run = nil
	}
	if cerr := unix.Close(c.fd); err == nil {
		err = cerr
	}
	return err
}

// Run enters the guest (KVM_RUN) until the next exit that needs userspace.
// It returns nil on an exit (see ExitReason), ErrInterrupted on EINTR, or
// the ioctl error.
func (c *VCPU) Run() error {
	_, err := ioctl(c.fd, kvmRun, 0)
	if err == nil {
		return nil
	}
	if errors.Is(err, unix.EINTR) || errors.Is(err, unix.EAGAIN) {
		return ErrInterrupted
	}
	return fmt.Errorf("kvm: KVM_RUN vCPU %d: %w", c.id, err)
}

// immediateExitWord is the aligned first 32-bit word of kvm_run, which
// holds request_interrupt_window (byte 0) and immediate_exit (byte 1);
// atomics on it make SetImmediateExit safe from any thread.
func (c *VCPU) immediateExitWord() *uint32 {
	return (*uint32)(unsafe.Pointer(&c.run[0]))
}

// SetImmediateExit sets or clears kvm_run.immediate_exit. While it is set,
// KVM_RUN completes any pending MMIO/PIO and returns EINTR without entering
// the guest. It may be called from any thread: together with a signal to
// the vCPU thread it is how a running vCPU is kicked out of the guest.
func (c *VCPU) SetImmediateExit(on bool) {
	const mask = 0xFF << (runImmediateExit * 8)
	if on {
		atomic.OrUint32(c.immediateExitWord(), 1<<(runImmediateExit*8))
	} else {
		atomic.AndUint32(c.immediateExitWord(), ^uint32(mask))
	}
}

// ExitReason returns the reason of the last exit.
func (c *VCPU) ExitReason() ExitReason {
	return ExitReason(binary.LittleEndian.Uint32(c.run[runExitReason:]))
}

// IOExit describes a KVM_EXIT_IO: Count accesses of Size bytes each to
// Port. Data aliases the kvm_run area (len = Size*Count): for Out it holds
// what the guest wrote; for an In the VMM fills it before the next Run.
type IOExit struct {
	Port  uint16
	Size  int
	Count int
	Out   bool
	Data  []byte
}

// IO returns the port I/O exit the vCPU stopped on.
func (c *VCPU) IO() (IOExit, error) {
	e := IOExit{
		Out:   c.run[runIODirection] == kvmExitIOOut,
		Size:  int(c.run[runIOSize]),
		Port:  binary.LittleEndian.Uint16(c.run[runIOPort:]),
		Count: int(binary.LittleEndian.Uint32(c.run[runIOCount:])),
	}
	off := binary.LittleEndian.Uint64(c.run[runIODataOffset:])
	n := uint64(e.Size) * uint64(e.Count)
	if e.Size == 0 || off > uint64(len(c.run)) || n > uint64(len(c.run))-off {
		return e, fmt.Errorf("%w: io exit size %d count %d offset %d", ErrRunArea, e.Size, e.Count, off)
	}
	e.Data = c.run[off : off+n]
	return e, nil
}

// MMIOExit describes a KVM_EXIT_MMIO. Data aliases kvm_run.mmio.data and
// holds exactly len valid bytes (1, 2, 4 or 8): for a write what the guest
// stored, for a read the buffer the VMM fills before the next Run.
type MMIOExit struct {
	Addr  uint64
	Data  []byte
	Write bool
}

// MMIO returns the MMIO exit the vCPU stopped on.
func (c *VCPU) MMIO() (MMIOExit, error) {
	n := binary.LittleEndian.Uint32(c.run[runMMIOLen:])
	e := MMIOExit{
		Addr:  binary.LittleEndian.Uint64(c.run[runMMIOPhysAddr:]),
		Write: c.run[runMMIOIsWrite] != 0,
	}
	if n == 0 || n > 8 {
		return e, fmt.Errorf("%w: mmio exit of %d bytes at %#x", ErrRunArea, n, e.Addr)
	}
	e.Data = c.run[runMMIOData : runMMIOData+int(n)]
	return e, nil
}

// FailEntry returns kvm_run.fail_entry after KVM_EXIT_FAIL_ENTRY: the
// hardware VM-entry failure reason and the host CPU.
func (c *VCPU) FailEntry() (reason uint64, cpu uint32) {
	return binary.LittleEndian.Uint64(c.run[runFailReason:]), binary.LittleEndian.Uint32(c.run[runFailCPU:])
}

// HardwareExitReason returns kvm_run.hw.hardware_exit_reason after
// KVM_EXIT_UNKNOWN.
func (c *VCPU) HardwareExitReason() uint64 {
	return binary.LittleEndian.Uint64(c.run[runHWExitReason:])
}

// InternalError returns kvm_run.internal after KVM_EXIT_INTERNAL_ERROR: the
// suberror (KVM_INTERNAL_ERROR_*) and its data words.
func (c *VCPU) InternalError() (suberror uint32, data []uint64) {
	return c.runWords(runInternalSuberror, runInternalNData, runInternalData)
}

// SystemEvent returns kvm_run.system_event after KVM_EXIT_SYSTEM_EVENT.
func (c *VCPU) SystemEvent() (typ uint32, data []uint64) {
	return c.runWords(runSystemEventType, runSystemEventNData, runSystemEventData)
}

func (c *VCPU) runWords(kindOff, nOff, dataOff int) (uint32, []uint64) {
	kind := binary.LittleEndian.Uint32(c.run[kindOff:])
	n := int(binary.LittleEndian.Uint32(c.run[nOff:]))
	n = min(n, 16) // both unions hold at most 16 words
	data := make([]uint64, n)
	for i := range data {
		data[i] = binary.LittleEndian.Uint64(c.run[dataOff+8*i:])
	}
	return kind, data
}

// getPtr and setPtr issue a vCPU state ioctl on a fixed-size struct.
func (c *VCPU) getPtr(req uintptr, p unsafe.Pointer, name string) error {
	if _, err := ioctlPtr(c.fd, req, p); err != nil {
		return fmt.Errorf("kvm: %s vCPU %d: %w", name, c.id, err)
	}
	return nil
}

// GetRegs reads the general-purpose registers.
func (c *VCPU) GetRegs() (*Regs, error) {
	r := &Regs{}
	return r, c.getPtr(kvmGetRegs, unsafe.Pointer(r), "KVM_GET_REGS")
}

// SetRegs writes the general-purpose registers.
func (c *VCPU) SetRegs(r *Regs) error {
	return c.getPtr(kvmSetRegs, unsafe.Pointer(r), "KVM_SET_REGS")
}

// GetSregs reads the special registers.
func (c *VCPU) GetSregs() (*Sregs, error) {
	s := &Sregs{}
	return s, c.getPtr(kvmGetSregs, unsafe.Pointer(s), "KVM_GET_SREGS")
}

// SetSregs writes the special registers.
func (c *VCPU) SetSregs(s *Sregs) error {
	return c.getPtr(kvmSetSregs, unsafe.Pointer(s), "KVM_SET_SREGS")
}

// GetFPU reads the legacy FPU/SSE state.
func (c *VCPU) GetFPU() (*FPU, error) {
	f := &FPU{}
	return f, c.getPtr(kvmGetFPU, unsafe.Pointer(f), "KVM_GET_FPU")
}

// SetFPU writes the legacy FPU/SSE state.
func (c *VCPU) SetFPU(f *FPU) error {
	return c.getPtr(kvmSetFPU, unsafe.Pointer(f), "KVM_SET_FPU")
}

// GetXSave reads the XSAVE area. size is VM.XSaveSize(): above 4096 bytes
// KVM_GET_XSAVE2 is used, else KVM_GET_XSAVE.
func (c *VCPU) GetXSave(size int) ([]byte, error) {
	size = max(size, XSaveLegacySize)
	buf := make([]byte, size)
	req, name := uintptr(kvmGetXSave), "KVM_GET_XSAVE"
	if size > XSaveLegacySize {
		req, name = kvmGetXSave2, "KVM_GET_XSAVE2"
	}
	return buf, c.getPtr(req, unsafe.Pointer(&buf[0]), name)
}

// SetXSave writes an XSAVE area obtained from GetXSave. The kernel reads
// as many bytes as KVM_CAP_XSAVE2 reports, so x must be at least that long.
func (c *VCPU) SetXSave(x []byte) error {
	if len(x) < XSaveLegacySize {
		return fmt.Errorf("kvm: KVM_SET_XSAVE vCPU %d: area of %d bytes, need %d", c.id, len(x), XSaveLegacySize)
	}
	return c.getPtr(kvmSetXSave, unsafe.Pointer(&x[0]), "KVM_SET_XSAVE")
}

// GetXCRs reads the extended control registers (XCR0).
func (c *VCPU) GetXCRs() (*XCRs, error) {
	x := &XCRs{}
	return x, c.getPtr(kvmGetXCRs, unsafe.Pointer(x), "KVM_GET_XCRS")
}

// SetXCRs writes the extended control registers.
func (c *VCPU) SetXCRs(x *XCRs) error {
	return c.getPtr(kvmSetXCRs, unsafe.Pointer(x), "KVM_SET_XCRS")
}

// GetLAPIC reads the in-kernel local APIC registers.
func (c *VCPU) GetLAPIC() (*LAPICState, error) {
	l := &LAPICState{}
	return l, c.getPtr(kvmGetLAPIC, unsafe.Pointer(l), "KVM_GET_LAPIC")
}

// SetLAPIC writes the in-kernel local APIC registers.
func (c *VCPU) SetLAPIC(l *LAPICState) error {
	return c.getPtr(kvmSetLAPIC, unsafe.Pointer(l), "KVM_SET_LAPIC")
}

// GetVCPUEvents reads pending/injected events.
func (c *VCPU) GetVCPUEvents() (*VCPUEvents, error) {
	e := &VCPUEvents{}
	return e, c.getPtr(kvmGetVCPUEvents, unsafe.Pointer(e), "KVM_GET_VCPU_EVENTS")
}

// SetVCPUEvents writes pending/injected events; e.Flags selects the
// optional fields that apply.
func (c *VCPU) SetVCPUEvents(e *VCPUEvents) error {
	return c.getPtr(kvmSetVCPUEvents, unsafe.Pointer(e), "KVM_SET_VCPU_EVENTS")
}

// GetMPState reads the multiprocessing state (KVM_MP_STATE_*).
func (c *VCPU) GetMPState() (MPState, error) {
	var m MPState
	return m, c.getPtr(kvmGetMPState, unsafe.Pointer(&m), "KVM_GET_MP_STATE")
}

// SetMPState writes the multiprocessing state.
func (c *VCPU) SetMPState(m MPState) error {
	return c.getPtr(kvmSetMPState, unsafe.Pointer(&m), "KVM_SET_MP_STATE")
}

// GetDebugRegs reads DR0..3, DR6, DR7.
func (c *VCPU) GetDebugRegs() (*DebugRegs, error) {
	d := &DebugRegs{}
	return d, c.getPtr(kvmGetDebugRegs, unsafe.Pointer(d), "KVM_GET_DEBUGREGS")
}

// SetDebugRegs writes DR0..3, DR6, DR7.
func (c *VCPU) SetDebugRegs(d *DebugRegs) error {
	return c.getPtr(kvmSetDebugRegs, unsafe.Pointer(d), "KVM_SET_DEBUGREGS")
}

// GetTSCKHz returns the guest TSC frequency in kHz (KVM_GET_TSC_KHZ).
func (c *VCPU) GetTSCKHz() (uint32, error) {
	n, err := ioctl(c.fd, kvmGetTSCKHz, 0)
	if err != nil {
		return 0, fmt.Errorf("kvm: KVM_GET_TSC_KHZ vCPU %d: %w", c.id, err)
	}
	return uint32(n), nil
}

// SetTSCKHz sets the guest TSC frequency (KVM_SET_TSC_KHZ); it fails on
// hosts without TSC scaling when khz differs from the host's.
func (c *VCPU) SetTSCKHz(khz uint32) error {
	if _, err := ioctl(c.fd, kvmSetTSCKHz, uintptr(khz)); err != nil {
		return fmt.Errorf("kvm: KVM_SET_TSC_KHZ %d vCPU %d: %w", khz, c.id, err)
	}
	return nil
}

// SetCPUID2 sets the CPUID the guest sees (KVM_SET_CPUID2). KVM allows it
// only before the vCPU first runs (or with identical contents after).
func (c *VCPU) SetCPUID2(entries []CPUIDEntry) error {
	if len(entries) > maxCPUIDEntries {
		return fmt.Errorf("kvm: KVM_SET_CPUID2 vCPU %d: %d entries, at most %d", c.id, len(entries), maxCPUIDEntries)
	}
	esz := int(unsafe.Sizeof(CPUIDEntry{}))
	buf := make([]byte, sizeofCPUID2Header+len(entries)*esz)
	binary.LittleEndian.PutUint32(buf, uint32(len(entries)))
	if len(entries) > 0 {
		copy(buf[sizeofCPUID2Header:], unsafe.Slice((*byte)(unsafe.Pointer(&entries[0])), len(entries)*esz))
	}
	return c.getPtr(kvmSetCPUID2, unsafe.Pointer(&buf[0]), "KVM_SET_CPUID2")
}

// GetCPUID2 reads back the CPUID set with SetCPUID2 (KVM_GET_CPUID2).
func (c *VCPU) GetCPUID2() ([]CPUIDEntry, error) {
	esz := int(unsafe.Sizeof(CPUIDEntry{}))
	buf := make([]byte, sizeofCPUID2Header+maxCPUIDEntries*esz)
	binary.LittleEndian.PutUint32(buf, maxCPUIDEntries)
	if err := c.getPtr(kvmGetCPUID2, unsafe.Pointer(&buf[0]), "KVM_GET_CPUID2"); err != nil {
		return nil, err
	}
	n := min(int(binary.LittleEndian.Uint32(buf)), maxCPUIDEntries)
	entries := unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[sizeofCPUID2Header])), n)
	return append([]CPUIDEntry(nil), entries...), nil
}

// MSRError reports the first MSR KVM refused in KVM_GET_MSRS or
// KVM_SET_MSRS (both stop at the first failure).
type MSRError struct {
	Op    string // "KVM_GET_MSRS" or "KVM_SET_MSRS"
	VCPU  int
	Index uint32
	Done  int // entries processed before the failure
}

func (e *MSRError) Error() string {
	return fmt.Sprintf("kvm: %s vCPU %d: MSR %#x refused after %d entries", e.Op, e.VCPU, e.Index, e.Done)
}

// maxIOMSRs is MAX_IO_MSRS - 1 (arch/x86/kvm/x86.c, msr_io() rejects
// nmsrs >= MAX_IO_MSRS = 256): the most entries one KVM_GET/SET_MSRS takes.
const maxIOMSRs = 255

// msrIoctl runs KVM_GET_MSRS or KVM_SET_MSRS over entries in chunks of
// maxIOMSRs and returns how many leading entries succeeded.
func (c *VCPU) msrIoctl(req uintptr, name string, entries []MSREntry) (int, error) {
	done := 0
	for done < len(entries) {
		chunk := entries[done:min(len(entries), done+maxIOMSRs)]
		n, err := c.msrIoctlChunk(req, name, chunk)
		done += n
		if err != nil || n < len(chunk) {
			return done, err
		}
	}
	return done, nil
}

func (c *VCPU) msrIoctlChunk(req uintptr, name string, entries []MSREntry) (int, error) {
	esz := int(unsafe.Sizeof(MSREntry{}))
	buf := make([]byte, sizeofMSRsHeader+len(entries)*esz)
	binary.LittleEndian.PutUint32(buf, uint32(len(entries)))
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&entries[0])), len(entries)*esz)
	copy(buf[sizeofMSRsHeader:], raw)
	n, err := ioctlPtr(c.fd, req, unsafe.Pointer(&buf[0]))
	if err != nil {
		return 0, fmt.Errorf("kvm: %s vCPU %d: %w", name, c.id, err)
	}
	copy(raw, buf[sizeofMSRsHeader:])
	return min(int(n), len(entries)), nil
}

// GetMSRs reads the MSRs with the given indices. It fails with *MSRError
// if KVM refuses one of them.
func (c *VCPU) GetMSRs(indices []uint32) ([]MSREntry, error) {
	entries := make([]MSREntry, len(indices))
	for i, idx := range indices {
		entries[i].Index = idx
	}
	n, err := c.msrIoctl(kvmGetMSRs, "KVM_GET_MSRS", entries)
	if err != nil {
		return nil, err
	}
	if n != len(entries) {
		return nil, &MSRError{Op: "KVM_GET_MSRS", VCPU: c.id, Index: entries[n].Index, Done: n}
	}
	return entries, nil
}

// ProbeMSRs returns the subset of indices that KVM_GET_MSRS accepts on this
// vCPU, in order. It issues one ioctl per refused MSR plus one.
func (c *VCPU) ProbeMSRs(indices []uint32) ([]uint32, error) {
	var ok []uint32
	rest := indices
	for len(rest) > 0 {
		entries := make([]MSREntry, len(rest))
		for i, idx := range rest {
			entries[i].Index = idx
		}
		n, err := c.msrIoctl(kvmGetMSRs, "KVM_GET_MSRS", entries)
		if err != nil {
			return nil, err
		}
		ok = append(ok, rest[:n]...)
		if n == len(rest) {
			break
		}
		rest = rest[n+1:] // skip the refused one
	}
	return ok, nil
}

// SetMSRs writes MSRs. It fails with *MSRError if KVM refuses one.
func (c *VCPU) SetMSRs(entries []MSREntry) error {
	in := append([]MSREntry(nil), entries...)
	n, err := c.msrIoctl(kvmSetMSRs, "KVM_SET_MSRS", in)
	if err != nil {
		return err
	}
	if n != len(in) {
		return &MSRError{Op: "KVM_SET_MSRS", VCPU: c.id, Index: in[n].Index, Done: n}
	}
	return nil
}
