//go:build linux && amd64

package kvm

// XSAVE state in CPUID (Intel SDM vol. 1, 13.2 "Enumeration of CPU support
// for XSAVE instructions and XSAVE-supported features"; vol. 2A, CPUID leaf
// 0DH).
const (
	leafXSave        = 0xD
	leafExtFeatures  = 0x7
	featECXXSave     = 1 << 26  // CPUID.1:ECX[26]
	xsaveLegacySize  = 512 + 64 // legacy region and XSAVE header: x87 and SSE state
	xsaveCompactEAX  = 1<<1 | 1<<3
	xcr0FPSSE        = 1<<0 | 1<<1
	xcr0XTile        = 1<<17 | 1<<18 // XTILECFG, XTILEDATA (AMX)
	featEDXAMXTile   = 1 << 24       // CPUID.(7,0):EDX[24] AMX-TILE
	featEDXAMXOthers = 1<<22 | 1<<25 // AMX-BF16, AMX-INT8
)

// xcr0Features ties XCR0 user state components to the CPUID feature flag
// that announces the instructions using them. A component whose flag the
// guest does not see is of no use to it, and Linux leaves it out of XCR0
// (fpu__init_system_xstate: "Clear XSAVE features that are disabled in the
// normal CPUID"), so leaf 0xD must not announce it either: its sizes would
// disagree with what the guest enables.
var xcr0Features = []struct {
	components uint64
	leaf       uint32
	reg        byte // 'b', 'c' or 'd': the register of the flag
	bit        uint
}{
	{1 << 2, leafFeatures, 'c', 28},                // YMM: AVX
	{1<<3 | 1<<4, leafExtFeatures, 'b', 14},        // BNDREGS, BNDCSR: MPX
	{1<<5 | 1<<6 | 1<<7, leafExtFeatures, 'b', 16}, // opmask, ZMM_Hi256, Hi16_ZMM: AVX512F
	{1 << 9, leafExtFeatures, 'c', 3},              // PKRU: PKU
	{xcr0XTile, leafExtFeatures, 'd', 24},          // XTILECFG, XTILEDATA: AMX-TILE
}

// normalizeXSave makes CPUID leaf 0xD agree with the feature leaves and
// with itself, in place:
//   - sub-leaf 0 EDX:EAX (the XCR0 bits the guest may set) loses the
//     components whose feature flag is absent, and their sub-leaves go;
//   - AMX is hidden from leaf 7 when leaf 0xD has no tile state (KVM
//     reports it only once the VMM asked for the dynamic-state
//     permission);
//   - sub-leaf 0 ECX (the size for every component) and EBX (the size for
//     the XCR0 the vCPU starts with, see GuestXCR0) and, with XSAVEC or
//     XSAVES, sub-leaf 1 EBX (the compacted size) are computed from the
//     components that remain.
//
// KVM recomputes the EBX values whenever the guest writes XCR0; they are
// set here so that the table is consistent before that too.
func normalizeXSave(entries []CPUIDEntry) []CPUIDEntry {
	sub0 := FindCPUID(entries, leafXSave, 0)
	if sub0 == nil {
		return entries
	}
	mask := uint64(sub0.EDX)<<32 | uint64(sub0.EAX)
	for _, f := range xcr0Features {
		if e := FindCPUID(entries, f.leaf, 0); e == nil || reg(e, f.reg)>>f.bit&1 == 0 {
			mask &^= f.components
		}
	}
	if mask&xcr0XTile != xcr0XTile {
		mask &^= xcr0XTile
		if e := FindCPUID(entries, leafExtFeatures, 0); e != nil {
			e.EDX &^= featEDXAMXTile | featEDXAMXOthers
		}
	}
	out := entries[:0]
	for _, e := range entries {
		// Sub-leaves 2..62 describe one component each; ECX[0] says
		// whether it is a supervisor (IA32_XSS) one, left as it is.
		if e.Function == leafXSave && e.Index >= 2 && e.Index < 63 && e.ECX&1 == 0 && mask>>e.Index&1 == 0 {
			continue
		}
		out = append(out, e)
	}
	entries = out
	sub0 = FindCPUID(entries, leafXSave, 0)
	sub0.EAX, sub0.EDX = uint32(mask), uint32(mask>>32)
	std, compact := uint32(xsaveLegacySize), uint32(xsaveLegacySize)
	for i := uint32(2); i < 63; i++ {
		if mask>>i&1 == 0 {
			continue
		}
		e := FindCPUID(entries, leafXSave, i)
		if e == nil {
			continue
		}
		std = max(std, e.EBX+e.EAX)
		if e.ECX&2 != 0 { // 64-byte aligned in the compacted format
			compact = (compact + 63) &^ 63
		}
		compact += e.EAX
	}
	sub0.EBX, sub0.ECX = std, std
	if sub1 := FindCPUID(entries, leafXSave, 1); sub1 != nil {
		if sub1.EAX&xsaveCompactEAX != 0 {
			sub1.EBX = compact
		} else {
			sub1.EBX = 0
		}
	}
	return entries
}

// GuestXCR0 returns the XCR0 a vCPU with this (normalized) CPUID table
// starts with: every user state component leaf 0xD announces, which is
// what Linux enables. Zero means the guest has no XSAVE and XCR0 is left
// alone.
//
// Architecturally XCR0 starts at 1 (x87 only) and the guest's XSETBV sets
// it. Starting with the guest's value keeps KVM's view of XCR0 — from which
// it computes the XSAVE sizes in leaf 0xD — right even when the guest's
// XSETBV does not reach KVM: QEMU before 8.2 emulates nested SVM without
// the XSETBV intercept, so a guest of KVM inside it found leaf 0xD sized for
// x87 and SSE only and turned XSAVE off ("XSAVE consistency problem: size
// 832 != kernel_size 576").
func GuestXCR0(entries []CPUIDEntry) uint64 {
	l1 := FindCPUID(entries, leafFeatures, 0)
	sub0 := FindCPUID(entries, leafXSave, 0)
	if l1 == nil || l1.ECX&featECXXSave == 0 || sub0 == nil {
		return 0
	}
	return uint64(sub0.EDX)<<32 | uint64(sub0.EAX) | xcr0FPSSE
}

func reg(e *CPUIDEntry, r byte) uint32 {
	switch r {
	case 'b':
		return e.EBX
	case 'c':
		return e.ECX
	default:
		return e.EDX
	}
}
