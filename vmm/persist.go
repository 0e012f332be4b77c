//go:build linux && amd64

package vmm

import (
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/memory"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
)

// Snapshot saves a paused VM: vCPU state (gathered on each vCPU's own
// thread: registers, special registers, FPU, XSAVE, XCRs, local APIC,
// MSRs including the KVM paravirtual range, events, MP state, debug
// registers, TSC frequency, CPUID), VM state (the three irqchips, the PIT,
// kvmclock) and the state of every Stateful device go to statePath; guest
// RAM goes to memPath as a sparse file, whose content identity the state
// file records. Both files are written atomically. The VM stays paused.
// On a VM with Config.TrackDirty the memory file becomes the base of
// later diff snapshots (SnapshotDiff).
func (vm *VM) Snapshot(statePath, memPath string) error {
	st, err := vm.captureState()
	if err != nil {
		return err
	}
	if t := vm.dirty; t != nil {
		t.mu.Lock()
		defer t.mu.Unlock()
		t.hasBase = false
	}
	if st.MemoryID, err = vm.mem.DumpID(memPath); err != nil {
		return err
	}
	if err := snapshot.WriteFile(statePath, st); err != nil {
		return err
	}
	if t := vm.dirty; t != nil {
		return vm.resetBase(t, st.MemoryID)
	}
	return nil
}

// captureState gathers the snapshot.State of a paused VM.
func (vm *VM) captureState() (*snapshot.State, error) {
	vm.mu.Lock()
	paused := vm.st == statePaused && vm.allParkedLocked()
	stateful := maps.Clone(vm.stateful)
	vm.mu.Unlock()
	if !paused {
		return nil, fmt.Errorf("%w: Snapshot needs a paused VM", ErrState)
	}
	st := &snapshot.State{MemSize: vm.mem.Size()}
	for _, r := range vm.mem.Regions() {
		st.Regions = append(st.Regions, snapshot.Region{GuestAddr: r.GuestAddr, Size: r.Size, Offset: r.Offset})
	}
	for i := range st.VM.IRQChips {
		c, err := vm.kvm.GetIRQChip(uint32(i))
		if err != nil {
			return nil, err
		}
		st.VM.IRQChips[i] = *c
	}
	pit, err := vm.kvm.GetPIT2()
	if err != nil {
		return nil, err
	}
	st.VM.PIT = *pit
	clock, err := vm.kvm.GetClock()
	if err != nil {
		return nil, err
	}
	st.VM.Clock = *clock

	xsaveSize := vm.kvm.XSaveSize()
	st.VCPUs = make([]snapshot.VCPUState, len(vm.runners))
	err = vm.onEachVCPU(func(r *vcpuRunner) error {
		return saveVCPU(vm.sys, r.cpu, xsaveSize, &st.VCPUs[r.index])
	})
	if err != nil {
		return nil, fmt.Errorf("vmm: saving vCPU state: %w", err)
	}

	for _, n := range slices.Sorted(maps.Keys(stateful)) {
		data, err := stateful[n].SaveState()
		if err != nil {
			return nil, fmt.Errorf("vmm: saving device %s: %w", n, err)
		}
		st.Devices = append(st.Devices, snapshot.DeviceState{Name: n, Data: data})
	}
	return st, nil
}

// saveVCPU reads every state ioctl of c into s.
func saveVCPU(sys *kvm.System, c *kvm.VCPU, xsaveSize int, s *snapshot.VCPUState) (err error) {
	s.ID = uint32(c.ID())
	if s.CPUID, err = c.GetCPUID2(); err != nil {
		return err
	}
	if s.TSCKHz, err = c.GetTSCKHz(); err != nil {
		return err
	}
	regs, err := c.GetRegs()
	if err != nil {
		return err
	}
	s.Regs = *regs
	sregs, err := c.GetSregs()
	if err != nil {
		return err
	}
	s.Sregs = *sregs
	fpu, err := c.GetFPU()
	if err != nil {
		return err
	}
	s.FPU = *fpu
	if s.XSave, err = c.GetXSave(xsaveSize); err != nil {
		return err
	}
	xcrs, err := c.GetXCRs()
	if err != nil {
		return err
	}
	s.XCRs = *xcrs
	lapic, err := c.GetLAPIC()
	if err != nil {
		return err
	}
	s.LAPIC = *lapic
	indices, err := sys.SnapshotMSRs()
	if err != nil {
		return err
	}
	if s.MSRs, err = c.GetMSRs(indices); err != nil {
		return err
	}
	ev, err := c.GetVCPUEvents()
	if err != nil {
		return err
	}
	// KVM_GET_VCPU_EVENTS fills these fields but KVM_SET_VCPU_EVENTS only
	// applies them when flagged.
	ev.Flags |= kvm.VCPUEventValidNMIPending | kvm.VCPUEventValidSIPIVector
	s.Events = *ev
	if s.MPState, err = c.GetMPState(); err != nil {
		return err
	}
	dr, err := c.GetDebugRegs()
	if err != nil {
		return err
	}
	s.DebugRegs = *dr
	return nil
}

// Restore builds a VM from a state file and a memory file and leaves it
// ready to Start. The memory file is mapped MAP_PRIVATE, so any number of
// VMs restored from it share its pages copy-on-write and never modify it.
// cfg.MemoryBytes and cfg.VCPUs are ignored: the snapshot decides. Devices
// beyond the built-in serial port and i8042 must be added (under the
// names they were saved with; virtio devices with AddVirtio, which puts
// them where they were) before Start, which fails if the snapshot holds
// state for a device that was not added.
func Restore(cfg Config, statePath, memPath string) (*VM, error) {
	st, err := snapshot.ReadFile(statePath)
	if err != nil {
		return nil, err
	}
	return RestoreState(cfg, st, memPath)
}

// RestoreState is Restore from an already decoded state file.
func RestoreState(cfg Config, st *snapshot.State, memPath string) (*VM, error) {
	if err := checkRestorable(st, false); err != nil {
		return nil, err
	}
	p, err := Prepare(cfg, memPath, st.MemSize, len(st.VCPUs))
	if err != nil {
		return nil, err
	}
	vm, err := p.restore(st, false, func(vm *VM) error {
		if vm.dirty == nil {
			return nil
		}
		id := st.MemoryID
		if id == 0 { // a state file from before memory IDs
			var err error
			if id, err = memory.FileID(memPath); err != nil {
				return err
			}
		}
		vm.dirty.mu.Lock()
		defer vm.dirty.mu.Unlock()
		return vm.resetBase(vm.dirty, id)
	})
	if err != nil {
		p.Close()
		return nil, err
	}
	return vm, nil
}

// Prepared is the part of a restore that does not depend on the
// snapshot's state, done ahead of time: the memory file mapped
// copy-on-write, the KVM VM with its memory slots (the expensive first
// slot included), irqchip, PIT and vCPUs. A pool of idle VMM processes
// keeps one each, so that a restore pays only for applying state.
// A Prepared is used once.
type Prepared struct {
	mu   sync.Mutex
	vm   *VM
	used bool
}

// Prepare builds a VM shell for snapshots of memSize bytes of RAM and
// vcpus vCPUs whose memory file is memPath (MAP_PRIVATE: the file is
// never modified). Restore then turns it into a restored VM.
func Prepare(cfg Config, memPath string, memSize uint64, vcpus int) (*Prepared, error) {
	if err := memory.CheckSize(memSize); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	if vcpus < 1 || vcpus > boot.MaxVCPUs {
		return nil, fmt.Errorf("%w: %d vCPUs, want 1..%d", ErrIncompatible, vcpus, boot.MaxVCPUs)
	}
	mem, err := memory.MapFile(memPath, memSize)
	if err != nil {
		return nil, err
	}
	vm, err := build(cfg, mem, vcpus)
	if err != nil {
		mem.Close()
		return nil, err
	}
	return &Prepared{vm: vm}, nil
}

// Fits reports whether st can be restored into p: same RAM size and vCPU
// count. The memory file must be the one st was saved with; p cannot
// check that.
func (p *Prepared) Fits(st *snapshot.State) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.vm != nil && p.fits(st)
}

func (p *Prepared) fits(st *snapshot.State) bool {
	return st.MemSize == p.vm.mem.Size() && len(st.VCPUs) == len(p.vm.runners)
}

// Restore applies st to the prepared VM and returns it, ready for its
// devices (AddVirtio) and Start. On error the prepared VM is spent: Close
// it. A VM prepared with Config.TrackDirty takes the snapshot's memory
// file as the base of its diff snapshots when the state file records the
// file's identity (every full snapshot of this VMM does).
func (p *Prepared) Restore(st *snapshot.State) (*VM, error) {
	return p.restore(st, false, func(vm *VM) error {
		if vm.dirty == nil || st.MemoryID == 0 {
			return nil
		}
		vm.dirty.mu.Lock()
		defer vm.dirty.mu.Unlock()
		return vm.resetBase(vm.dirty, st.MemoryID)
	})
}

// restore is Restore with memory set up by prepareMem (diff pages, dirty
// tracking) before the state is applied; a diff snapshot is accepted only
// here, from RestoreDiff.
func (p *Prepared) restore(st *snapshot.State, diff bool, prepareMem func(*VM) error) (*VM, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.used {
		return nil, fmt.Errorf("%w: prepared VM already used or closed", ErrState)
	}
	p.used = true
	if err := checkRestorable(st, diff); err != nil {
		return nil, err
	}
	if !p.fits(st) {
		return nil, fmt.Errorf("%w: snapshot has %d bytes of RAM and %d vCPUs, the prepared VM %d and %d",
			ErrIncompatible, st.MemSize, len(st.VCPUs), p.vm.mem.Size(), len(p.vm.runners))
	}
	if err := prepareMem(p.vm); err != nil {
		return nil, err
	}
	if err := p.vm.restoreState(st); err != nil {
		return nil, err
	}
	vm := p.vm
	p.vm = nil
	return vm, nil
}

// Close releases a prepared VM that Restore did not hand out.
func (p *Prepared) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.vm == nil {
		return nil
	}
	vm := p.vm
	p.vm = nil
	p.used = true
	return vm.Close()
}

// checkRestorable rejects snapshots this VMM cannot rebuild, and diff
// snapshots unless diff (RestoreDiff) says the diff is being applied.
func checkRestorable(st *snapshot.State, diff bool) error {
	if st.Diff != nil && !diff {
		return fmt.Errorf("%w: a diff snapshot (base %#016x): restore it with RestoreDiff onto its base memory file, or snapshot.Merge it first",
			ErrIncompatible, st.Diff.BaseID)
	}
	if err := memory.CheckSize(st.MemSize); err != nil {
		return fmt.Errorf("%w: %w", ErrIncompatible, err)
	}
	layout := memory.Layout(st.MemSize)
	if len(layout) != len(st.Regions) {
		return fmt.Errorf("%w: %d memory regions, this VMM lays out %d", ErrIncompatible, len(st.Regions), len(layout))
	}
	for i, r := range layout {
		s := st.Regions[i]
		if s.GuestAddr != r.GuestAddr || s.Size != r.Size || s.Offset != r.Offset {
			return fmt.Errorf("%w: memory region %d is %+v, this VMM lays out %+v", ErrIncompatible, i, s, r)
		}
	}
	if len(st.VCPUs) > boot.MaxVCPUs {
		return fmt.Errorf("%w: %d vCPUs, at most %d", ErrIncompatible, len(st.VCPUs), boot.MaxVCPUs)
	}
	for i, c := range st.VCPUs {
		if c.ID != uint32(i) {
			return fmt.Errorf("%w: vCPU %d has id %d", ErrIncompatible, i, c.ID)
		}
	}
	return nil
}

// restoreState applies the VM-wide state in the order measured to work on
// the development hosts — after the vCPUs exist: irqchips, clock; the PIT
// state follows on the PIT's own goroutine as soon as the PIT exists —
// attaches the built-in devices with their saved state and has each
// vCPU's thread apply its state.
func (vm *VM) restoreState(st *snapshot.State) error {
	for i := range st.VM.IRQChips {
		if err := vm.kvm.SetIRQChip(&st.VM.IRQChips[i]); err != nil {
			return err
		}
	}
	pit := st.VM.PIT
	vm.sendPITInit(func() error { return vm.kvm.SetPIT2(&pit) })
	// Only the clock value: with KVM_CLOCK_REALTIME the kernel would jump
	// the guest clock forward by the time since the snapshot; the guest
	// gets its new identity (clock included) after restore instead.
	if err := vm.kvm.SetClock(&kvm.ClockData{Clock: st.VM.Clock.Clock}); err != nil {
		return err
	}
	vm.mu.Lock()
	vm.fromSnapshot = true
	vm.restored = make(map[string][]byte, len(st.Devices))
	for _, d := range st.Devices {
		vm.restored[d.Name] = d.Data
	}
	vm.mu.Unlock()
	if err := vm.attachBuiltins(); err != nil {
		return err
	}
	xsaveSize := vm.kvm.XSaveSize()
	for i, r := range vm.runners {
		r.setup = restoreSetup(&st.VCPUs[i], xsaveSize)
	}
	vm.mu.Lock()
	vm.bootReady = true
	vm.mu.Unlock()
	// The vCPUs take their state now, before devices are added: see
	// launch.
	vm.launch()
	return vm.setupResult()
}

// restoreSetup returns the first-run setup of a restored vCPU. The order
// is the one measured to work: CPUID (only once, before the first run),
// SREGS, REGS, FPU, XSAVE, XCRS, LAPIC, MSRS, VCPU_EVENTS, MP_STATE,
// DEBUGREGS. The TSC frequency is set first if it differs from the host's.
func restoreSetup(s *snapshot.VCPUState, xsaveSize int) func(*kvm.VCPU) error {
	return func(c *kvm.VCPU) error {
		if err := c.SetCPUID2(s.CPUID); err != nil {
			return err
		}
		if s.TSCKHz != 0 {
			cur, err := c.GetTSCKHz()
			if err != nil {
				return err
			}
			if cur != s.TSCKHz {
				if err := c.SetTSCKHz(s.TSCKHz); err != nil {
					return fmt.Errorf("%w: guest TSC runs at %d kHz, host at %d kHz: %w", ErrIncompatible, s.TSCKHz, cur, err)
				}
			}
		}
		sregs, regs, fpu := s.Sregs, s.Regs, s.FPU
		if err := c.SetSregs(&sregs); err != nil {
			return err
		}
		if err := c.SetRegs(&regs); err != nil {
			return err
		}
		if err := c.SetFPU(&fpu); err != nil {
			return err
		}
		xsave := s.XSave
		if len(xsave) < xsaveSize {
			// The kernel reads KVM_CAP_XSAVE2 bytes; the tail stays in
			// its init state.
			xsave = append(slices.Clip(xsave), make([]byte, xsaveSize-len(xsave))...)
		}
		if err := c.SetXSave(xsave); err != nil {
			return err
		}
		xcrs, lapic := s.XCRs, s.LAPIC
		if err := c.SetXCRs(&xcrs); err != nil {
			return err
		}
		if err := c.SetLAPIC(&lapic); err != nil {
			return err
		}
		if err := c.SetMSRs(kvmOrderMSRs(s.MSRs)); err != nil {
			return err
		}
		ev, dr := s.Events, s.DebugRegs
		if err := c.SetVCPUEvents(&ev); err != nil {
			return err
		}
		if err := c.SetMPState(s.MPState); err != nil {
			return err
		}
		return c.SetDebugRegs(&dr)
	}
}

// kvmOrderMSRs returns entries with IA32_TSC_DEADLINE last (see
// kvm.OrderMSRsForRestore); snapshots written by this VMM already have
// that order, this keeps a hand-edited one correct.
func kvmOrderMSRs(entries []kvm.MSREntry) []kvm.MSREntry {
	if len(entries) == 0 || entries[len(entries)-1].Index == kvm.MSRIA32TSCDeadline {
		return entries
	}
	out := make([]kvm.MSREntry, 0, len(entries))
	var deadline []kvm.MSREntry
	for _, e := range entries {
		if e.Index == kvm.MSRIA32TSCDeadline {
			deadline = append(deadline, e)
			continue
		}
		out = append(out, e)
	}
	return append(out, deadline...)
}
