//go:build linux && amd64

package vmm

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
)

var (
	// ErrStopped is returned by Wait when the VM was stopped by the host
	// (Stop or Close) rather than by the guest.
	ErrStopped = errors.New("vmm: VM stopped by the host")
	// ErrState is returned when an operation does not fit the VM's
	// lifecycle state (for example Snapshot on a running VM).
	ErrState = errors.New("vmm: operation not valid in this VM state")
	// ErrTripleFault is wrapped by the ExitError of KVM_EXIT_SHUTDOWN.
	ErrTripleFault = errors.New("vmm: guest triple fault (KVM_EXIT_SHUTDOWN)")
	// ErrInternal is wrapped by the ExitError of KVM_EXIT_INTERNAL_ERROR.
	ErrInternal = errors.New("vmm: KVM internal error")
	// ErrEntryFailed is wrapped by the ExitError of KVM_EXIT_FAIL_ENTRY.
	ErrEntryFailed = errors.New("vmm: VM entry failed")
	// ErrHalted is wrapped by the ExitError of KVM_EXIT_HLT, which only a
	// VM without an in-kernel local APIC can produce.
	ErrHalted = errors.New("vmm: guest halted with no interrupt controller to wake it")
	// ErrGuestCrash is wrapped by the ExitError of a crash system event.
	ErrGuestCrash = errors.New("vmm: guest reported a crash")
	// ErrUnexpectedExit is wrapped by the ExitError of any exit reason the
	// VMM does not handle.
	ErrUnexpectedExit = errors.New("vmm: unexpected vCPU exit")
	// ErrIncompatible is returned by Restore for a snapshot this VMM or
	// host cannot restore (memory layout, vCPU count, devices).
	ErrIncompatible = errors.New("vmm: snapshot is incompatible")
	// ErrNoResources is returned when MMIO space or IRQs run out.
	ErrNoResources = errors.New("vmm: out of MMIO space or interrupt lines")
)

// ExitError is why a vCPU stopped the VM: the exit, its details and the
// vCPU registers at that point.
type ExitError struct {
	VCPU   int
	Reason kvm.ExitReason
	// Detail holds the exit's own data (suberror, hardware reason, ...).
	Detail string
	// Regs and Sregs are nil when they could not be read.
	Regs  *kvm.Regs
	Sregs *kvm.Sregs
	// Err is the sentinel classifying the exit (ErrTripleFault, ...).
	Err error
}

func (e *ExitError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%v: vCPU %d %v", e.Err, e.VCPU, e.Reason)
	if e.Detail != "" {
		fmt.Fprintf(&b, " (%s)", e.Detail)
	}
	if r := e.Regs; r != nil {
		fmt.Fprintf(&b, ": rip=%#x rsp=%#x rflags=%#x rax=%#x rbx=%#x rcx=%#x rdx=%#x rsi=%#x rdi=%#x",
			r.RIP, r.RSP, r.RFLAGS, r.RAX, r.RBX, r.RCX, r.RDX, r.RSI, r.RDI)
	}
	if s := e.Sregs; s != nil {
		fmt.Fprintf(&b, " cr0=%#x cr2=%#x cr3=%#x cr4=%#x efer=%#x cs=%#x(l=%d db=%d dpl=%d) ss=%#x gdt=%#x/%#x idt=%#x/%#x",
			s.CR0, s.CR2, s.CR3, s.CR4, s.EFER, s.CS.Selector, s.CS.L, s.CS.DB, s.CS.DPL, s.SS.Selector,
			s.GDT.Base, s.GDT.Limit, s.IDT.Base, s.IDT.Limit)
	}
	return b.String()
}

func (e *ExitError) Unwrap() error { return e.Err }
