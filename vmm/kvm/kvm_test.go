//go:build linux && amd64

package kvm

import (
	"errors"
	"slices"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/testenv"
)

func openKVM(t *testing.T) *System {
	t.Helper()
	testenv.RequireKVM(t)
	s, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// newVM returns a VM with an irqchip and one vCPU (no memory: nothing
// runs guest code).
func newVM(t *testing.T, s *System) (*VM, *VCPU) {
	t.Helper()
	vm, err := s.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatal(err)
	}
	if err := vm.CreatePIT2(PITSpeakerDummy); err != nil {
		t.Fatal(err)
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cpu.Close() })
	sup, err := s.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if err := cpu.SetCPUID2(NormalizeCPUID(sup, Topology{VCPUs: 1, PVM: s.PVM()})); err != nil {
		t.Fatal(err)
	}
	return vm, cpu
}

func TestSystem(t *testing.T) {
	s := openKVM(t)
	if s.VCPUMmapSize() < 4096 {
		t.Errorf("vCPU mmap size %d", s.VCPUMmapSize())
	}
	c, err := s.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	sig := FindCPUID(c, leafHypervisorBase, 0)
	if sig == nil || sig.EBX != 0x4b4d564b || sig.ECX != 0x564b4d56 || sig.EDX != 0x4d {
		t.Errorf("leaf 0x40000000 is not KVM's signature: %+v", sig)
	}
	c[0].EAX = 0xdeadbeef
	if c2, _ := s.SupportedCPUID(); c2[0].EAX == 0xdeadbeef {
		t.Error("SupportedCPUID returned the cached slice itself")
	}
	msrs, err := s.MSRIndexList()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(msrs, MSRIA32TSC) || !slices.Contains(msrs, 0x4b564d01) {
		t.Errorf("MSR index list lacks IA32_TSC or MSR_KVM_SYSTEM_TIME_NEW: %#x", msrs)
	}
	snap, err := s.SnapshotMSRs()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []uint32{MSRIA32TSC, MSRKVMParavirtFirst, 0x4b564d01, MSRLSTAR} {
		if !slices.Contains(snap, want) {
			t.Errorf("snapshot MSRs lack %#x: %#x", want, snap)
		}
	}
	if i := slices.Index(snap, MSRIA32TSCDeadline); i >= 0 && i != len(snap)-1 {
		t.Errorf("IA32_TSC_DEADLINE at %d of %d, want last", i, len(snap))
	}
	// Every MSR in the list must survive a read and write-back on a
	// fresh vCPU: that is what a restore does.
	_, cpu := newVM(t, s)
	e, err := cpu.GetMSRs(snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := cpu.SetMSRs(e); err != nil {
		t.Fatal(err)
	}
	var me *MSRError
	if _, err := cpu.GetMSRs([]uint32{MSRIA32TSC, 0xdead0000}); !errors.As(err, &me) || me.Index != 0xdead0000 || me.Done != 1 {
		t.Errorf("GetMSRs of a bogus MSR = %v, want *MSRError at 0xdead0000 after 1", err)
	}
}

func TestNormalizeCPUID(t *testing.T) {
	in := []CPUIDEntry{
		{Function: 1, EBX: 0xAB00_0800, EDX: featEDXHTT},
		{Function: 4, Index: 0, Flags: 1, EAX: 0xFC00_4121}, // L1d, garbage sharing bits
		{Function: 4, Index: 1, Flags: 1, EAX: 0xFC00_4163}, // L3
		{Function: 4, Index: 2, Flags: 1, EAX: 0},           // terminator
		{Function: 0xB, Index: 0, Flags: 1, EDX: 7},         // host topology
		{Function: 0x40000000, EAX: 0x40000001, EBX: 0x4b4d564b},
		{Function: 0x40000001, EAX: 0x01007efb},
		{Function: 0x80000008, EAX: 0x3930},
	}
	orig := slices.Clone(in)
	out := NormalizeCPUID(in, Topology{VCPUs: 4, APICID: 2, PVM: true})
	if !slices.Equal(in, orig) {
		t.Error("input modified")
	}
	l1 := FindCPUID(out, 1, 0)
	if l1.EBX>>24 != 2 || l1.EBX>>16&0xff != 4 || l1.EBX&0xffff != 0x0800 || l1.ECX&featECXHypervisor == 0 || l1.EDX&featEDXHTT == 0 {
		t.Errorf("leaf 1 = %+v", l1)
	}
	if c := FindCPUID(out, 4, 0); c.EAX>>26 != 3 || c.EAX>>14&0xfff != 0 || c.EAX&0x3fff != 0x0121 {
		t.Errorf("leaf 4.0 = %#x", c.EAX)
	}
	if c := FindCPUID(out, 4, 1); c.EAX>>26 != 3 || c.EAX>>14&0xfff != 3 {
		t.Errorf("leaf 4.1 (L3) = %#x", c.EAX)
	}
	for sub, want := range []CPUIDEntry{
		{EAX: 0, EBX: 1, ECX: 1 << 8, EDX: 2},
		{EAX: 2, EBX: 4, ECX: 2<<8 | 1, EDX: 2},
		{EAX: 0, EBX: 0, ECX: 2, EDX: 2},
	} {
		e := FindCPUID(out, 0xB, uint32(sub))
		if e == nil || e.EAX != want.EAX || e.EBX != want.EBX || e.ECX != want.ECX || e.EDX != want.EDX {
			t.Errorf("leaf 0xB.%d = %+v, want %+v", sub, e, want)
		}
	}
	if e := FindCPUID(out, 0x80000008, 0); e.EAX&0xff != 43 || e.EAX&^0xff != 0x3900 {
		t.Errorf("PVM physical address bits: %#x", e.EAX)
	}
	if !IsPVM(out) || FindCPUID(out, 0x40000000, 0).EAX != 0x40000002 {
		t.Error("PVM signature leaf missing")
	}
	if e := FindCPUID(out, 0x40000001, 0); e.EAX != 0x01007efb {
		t.Errorf("KVM feature leaf not passed through: %#x", e.EAX)
	}

	one := NormalizeCPUID(in, Topology{VCPUs: 1})
	if FindCPUID(one, 1, 0).EDX&featEDXHTT != 0 || IsPVM(one) {
		t.Error("single vCPU kept HTT or gained the PVM leaf")
	}
	if e := FindCPUID(one, 0x80000008, 0); e.EAX&0xff != 0x30 {
		t.Errorf("non-PVM physical address bits changed: %#x", e.EAX)
	}
}

// TestVCPUStateRoundTrip reads every state ioctl, writes it back into a
// second VM and reads it again.
func TestVCPUStateRoundTrip(t *testing.T) {
	s := openKVM(t)
	vm1, a := newVM(t, s)
	vm2, b := newVM(t, s)

	regs, err := a.GetRegs()
	if err != nil {
		t.Fatal(err)
	}
	regs.RAX, regs.R15, regs.RIP = 0x1111, 0x2222, 0x100000
	if err := a.SetRegs(regs); err != nil {
		t.Fatal(err)
	}
	check := func(name string, get func(*VCPU) (any, error), set func(*VCPU, any) error) {
		t.Helper()
		v, err := get(a)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if err := set(b, v); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		w, err := get(b)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !equalState(v, w) {
			t.Errorf("%s changed across set/get:\n%+v\n%+v", name, v, w)
		}
	}
	check("regs", func(c *VCPU) (any, error) { return c.GetRegs() }, func(c *VCPU, v any) error { return c.SetRegs(v.(*Regs)) })
	check("sregs", func(c *VCPU) (any, error) { return c.GetSregs() }, func(c *VCPU, v any) error { return c.SetSregs(v.(*Sregs)) })
	check("fpu", func(c *VCPU) (any, error) { return c.GetFPU() }, func(c *VCPU, v any) error { return c.SetFPU(v.(*FPU)) })
	check("xsave", func(c *VCPU) (any, error) { return c.GetXSave(vm1.XSaveSize()) }, func(c *VCPU, v any) error { return c.SetXSave(v.([]byte)) })
	check("xcrs", func(c *VCPU) (any, error) { return c.GetXCRs() }, func(c *VCPU, v any) error { return c.SetXCRs(v.(*XCRs)) })
	check("lapic", func(c *VCPU) (any, error) { return c.GetLAPIC() }, func(c *VCPU, v any) error { return c.SetLAPIC(v.(*LAPICState)) })
	check("events", func(c *VCPU) (any, error) { return c.GetVCPUEvents() }, func(c *VCPU, v any) error { return c.SetVCPUEvents(v.(*VCPUEvents)) })
	check("mpstate", func(c *VCPU) (any, error) { return c.GetMPState() }, func(c *VCPU, v any) error { return c.SetMPState(v.(MPState)) })
	check("debugregs", func(c *VCPU) (any, error) { return c.GetDebugRegs() }, func(c *VCPU, v any) error { return c.SetDebugRegs(v.(*DebugRegs)) })
	if got, _ := b.GetRegs(); got.RAX != 0x1111 || got.R15 != 0x2222 {
		t.Errorf("registers did not carry over: %+v", got)
	}
	cpuid, err := a.GetCPUID2()
	if err != nil || len(cpuid) == 0 {
		t.Fatalf("GetCPUID2 = %d entries, %v", len(cpuid), err)
	}
	khz, err := a.GetTSCKHz()
	if err != nil || khz == 0 {
		t.Fatalf("GetTSCKHz = %d, %v", khz, err)
	}
	if err := b.SetTSCKHz(khz); err != nil {
		t.Errorf("SetTSCKHz(host frequency): %v", err)
	}

	for id := uint32(0); id < NumIRQChips; id++ {
		c, err := vm1.GetIRQChip(id)
		if err != nil {
			t.Fatal(err)
		}
		if err := vm2.SetIRQChip(c); err != nil {
			t.Fatal(err)
		}
		c2, _ := vm2.GetIRQChip(id)
		if *c2 != *c {
			t.Errorf("irqchip %d changed", id)
		}
	}
	pit, err := vm1.GetPIT2()
	if err != nil {
		t.Fatal(err)
	}
	if err := vm2.SetPIT2(pit); err != nil {
		t.Fatal(err)
	}
	clock, err := vm1.GetClock()
	if err != nil {
		t.Fatal(err)
	}
	if err := vm2.SetClock(&ClockData{Clock: clock.Clock}); err != nil {
		t.Fatal(err)
	}
	if c2, _ := vm2.GetClock(); c2.Clock < clock.Clock {
		t.Errorf("clock went back: %d < %d", c2.Clock, clock.Clock)
	}
}

func equalState(a, b any) bool {
	switch x := a.(type) {
	case *Regs:
		return *x == *b.(*Regs)
	case *Sregs:
		return *x == *b.(*Sregs)
	case *FPU:
		return *x == *b.(*FPU)
	case []byte:
		return slices.Equal(x, b.([]byte))
	case *XCRs:
		return *x == *b.(*XCRs)
	case *LAPICState:
		// The timer current-count register (0x390) is live.
		y := b.(*LAPICState)
		xa, ya := *x, *y
		xa.Set32(0x390, 0)
		ya.Set32(0x390, 0)
		return xa == ya
	case *VCPUEvents:
		return *x == *b.(*VCPUEvents)
	case MPState:
		return x == b.(MPState)
	case *DebugRegs:
		return *x == *b.(*DebugRegs)
	}
	return false
}

// TestImmediateExit: with immediate_exit set, KVM_RUN returns EINTR
// without entering the guest (the VM has no memory at all).
func TestImmediateExit(t *testing.T) {
	s := openKVM(t)
	_, cpu := newVM(t, s)
	cpu.SetImmediateExit(true)
	if err := cpu.Run(); !errors.Is(err, ErrInterrupted) {
		t.Fatalf("Run with immediate_exit = %v, want ErrInterrupted", err)
	}
	cpu.SetImmediateExit(false)
	if cpu.run[runImmediateExit] != 0 {
		t.Fatal("immediate_exit still set")
	}
}

func TestEventFDs(t *testing.T) {
	s := openKVM(t)
	vm, _ := newVM(t, s)
	mem, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	slot := UserspaceMemoryRegion{Slot: 0, MemorySize: 1 << 20, UserspaceAddr: uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if err := vm.SetUserMemoryRegion(&slot); err != nil {
		t.Fatal(err)
	}
	overlap := slot
	overlap.Slot = 1
	if err := vm.SetUserMemoryRegion(&overlap); err == nil {
		t.Error("an overlapping slot was accepted")
	}
	slot.MemorySize = 0
	if err := vm.SetUserMemoryRegion(&slot); err != nil {
		t.Errorf("deleting slot 0: %v", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	if err := vm.RegisterIRQFD(efd, 10); err != nil {
		t.Fatal(err)
	}
	if err := vm.RegisterIRQFD(efd, 10); err == nil {
		t.Error("registering the same irqfd twice succeeded")
	}
	if err := vm.UnregisterIRQFD(efd, 10); err != nil {
		t.Fatal(err)
	}
	ev := &IOEventFD{FD: efd, Addr: 0xd0000000, Len: 4, Datamatch: 7, HasDatamatch: true}
	if err := vm.RegisterIOEventFD(ev); err != nil {
		t.Fatal(err)
	}
	if err := vm.UnregisterIOEventFD(ev); err != nil {
		t.Fatal(err)
	}
	if err := vm.UnregisterIOEventFD(ev); err == nil {
		t.Error("unregistering an absent ioeventfd succeeded")
	}
	if err := vm.IRQLine(4, true); err != nil {
		t.Fatal(err)
	}
	if err := vm.IRQLine(4, false); err != nil {
		t.Fatal(err)
	}
}
