//go:build linux && amd64

package kvm

import (
	"slices"
	"sync"
)

// MSR indices (Intel SDM vol. 4; arch/x86/include/asm/msr-index.h;
// arch/x86/include/uapi/asm/kvm_para.h; PVM's uapi pvm_para.h).
const (
	MSRIA32TSC          = 0x10
	MSRKVMWallClock     = 0x11 // MSR_KVM_WALL_CLOCK, legacy kvmclock
	MSRKVMSystemTime    = 0x12 // MSR_KVM_SYSTEM_TIME, legacy kvmclock
	MSRIA32SysenterCS   = 0x174
	MSRIA32SysenterESP  = 0x175
	MSRIA32SysenterEIP  = 0x176
	MSRIA32MiscEnable   = 0x1a0
	MSRMTRRDefType      = 0x2ff
	MSRIA32TSCDeadline  = 0x6e0
	MSRSTAR             = 0xc0000081
	MSRLSTAR            = 0xc0000082
	MSRCSTAR            = 0xc0000083
	MSRSyscallMask      = 0xc0000084
	MSRKernelGSBase     = 0xc0000102
	MSRKVMParavirtFirst = 0x4b564d00 // MSR_KVM_WALL_CLOCK_NEW, start of KVM's range
	MSRKVMParavirtLast  = 0x4b564dff // KVM reserves 0x4b564d00..0x4b564dff
	MSRPVMFirst         = 0x4b564df0 // MSR_PVM_LINEAR_ADDRESS_RANGE
	MSRPVMLast          = 0x4b564df7 // MSR_PVM_SWITCH_CR3

	// MiscEnableFastString is IA32_MISC_ENABLE bit 0.
	MiscEnableFastString = 1 << 0
	// MTRRDefTypeEnableWB enables MTRRs (bit 11) with write-back (6) as the
	// default memory type.
	MTRRDefTypeEnableWB = 1<<11 | 6
)

// snapshotMSRCache memoises SnapshotMSRs on a System.
type snapshotMSRCache struct {
	once sync.Once
	list []uint32
	err  error
}

// SnapshotMSRs returns the MSRs a snapshot must save and restore: KVM's
// save list (KVM_GET_MSR_INDEX_LIST), plus those of the KVM paravirtual
// range 0x4b564d00..0x4b564dff (kvmclock, async PF, steal time, PV EOI
// and, on PVM hosts, the PVM MSRs) and the legacy kvmclock MSRs that this
// kernel lets userspace both read and write back, with IA32_TSC_DEADLINE
// moved last because it must be restored after IA32_TSC.
//
// The extra MSRs are probed once per System on a scratch VM (never on a
// guest's vCPU: a write-back probe could have side effects there). The
// write check matters: some PVM builds expose read-only information MSRs
// in the paravirtual range, which a restore could not write.
func (s *System) SnapshotMSRs() ([]uint32, error) {
	s.snapMSRs.once.Do(func() {
		s.snapMSRs.list, s.snapMSRs.err = s.probeSnapshotMSRs()
	})
	if s.snapMSRs.err != nil {
		return nil, s.snapMSRs.err
	}
	return append([]uint32(nil), s.snapMSRs.list...), nil
}

func (s *System) probeSnapshotMSRs() ([]uint32, error) {
	base, err := s.MSRIndexList()
	if err != nil {
		return nil, err
	}
	supported, err := s.SupportedCPUID()
	if err != nil {
		return nil, err
	}
	vm, err := s.CreateVM()
	if err != nil {
		return nil, err
	}
	defer vm.Close()
	if err := vm.CreateIRQChip(); err != nil {
		return nil, err
	}
	cpu, err := vm.CreateVCPU(0)
	if err != nil {
		return nil, err
	}
	defer cpu.Close()
	if err := cpu.SetCPUID2(NormalizeCPUID(supported, Topology{VCPUs: 1, PVM: s.PVM()})); err != nil {
		return nil, err
	}
	inBase := make(map[uint32]bool, len(base))
	want := append([]uint32(nil), base...)
	for _, i := range base {
		inBase[i] = true
	}
	want = append(want, MSRKVMWallClock, MSRKVMSystemTime)
	for i := uint32(MSRKVMParavirtFirst); i <= MSRKVMParavirtLast; i++ {
		want = append(want, i)
	}
	slices.Sort(want)
	want = slices.Compact(want)
	readable, err := cpu.ProbeMSRs(want)
	if err != nil {
		return nil, err
	}
	var out []uint32
	for _, idx := range readable {
		if inBase[idx] {
			out = append(out, idx)
			continue
		}
		e, err := cpu.GetMSRs([]uint32{idx})
		if err == nil && cpu.SetMSRs(e) == nil {
			out = append(out, idx)
		}
	}
	return OrderMSRsForRestore(out), nil
}

// OrderMSRsForRestore returns indices with IA32_TSC_DEADLINE moved after
// everything else: KVM interprets the deadline against the guest TSC, so
// it is written once IA32_TSC holds its restored value.
func OrderMSRsForRestore(indices []uint32) []uint32 {
	out := make([]uint32, 0, len(indices))
	deadline := false
	for _, i := range indices {
		if i == MSRIA32TSCDeadline {
			deadline = true
			continue
		}
		out = append(out, i)
	}
	if deadline {
		out = append(out, MSRIA32TSCDeadline)
	}
	return out
}

// BootMSRs are the MSR values a vCPU starts a kernel with: SYSENTER/SYSCALL
// MSRs cleared, fast strings on, MTRRs on with write-back default (as a
// firmware would leave them).
func BootMSRs() []MSREntry {
	return []MSREntry{
		{Index: MSRIA32SysenterCS},
		{Index: MSRIA32SysenterESP},
		{Index: MSRIA32SysenterEIP},
		{Index: MSRSTAR},
		{Index: MSRCSTAR},
		{Index: MSRKernelGSBase},
		{Index: MSRSyscallMask},
		{Index: MSRLSTAR},
		{Index: MSRIA32TSC},
		{Index: MSRIA32MiscEnable, Data: MiscEnableFastString},
		{Index: MSRMTRRDefType, Data: MTRRDefTypeEnableWB},
	}
}
