//go:build linux && amd64

package kvm

import (
	"slices"
	"testing"
)

// component is one XSAVE state component's CPUID.(0xD, i) entry.
type component struct {
	i                uint32
	size, offset, cx uint32
}

// xsaveHost builds a host CPUID table with the given feature flags and
// XSAVE enumeration.
func xsaveHost(l1ECX, l7EBX, l7ECX, l7EDX uint32, xcr0 uint64, sub1EAX uint32, comps ...component) []CPUIDEntry {
	t := []CPUIDEntry{
		{Function: 1, ECX: l1ECX},
		{Function: 7, Index: 0, Flags: CPUIDFlagSignificantIndex, EBX: l7EBX, ECX: l7ECX, EDX: l7EDX},
		// EBX/ECX as a host reports them before the guest set XCR0.
		{Function: 0xD, Index: 0, Flags: CPUIDFlagSignificantIndex, EAX: uint32(xcr0), EBX: 576, ECX: 0x1000, EDX: uint32(xcr0 >> 32)},
		{Function: 0xD, Index: 1, Flags: CPUIDFlagSignificantIndex, EAX: sub1EAX, EBX: 0x1000},
	}
	for _, c := range comps {
		t = append(t, CPUIDEntry{Function: 0xD, Index: c.i, Flags: CPUIDFlagSignificantIndex, EAX: c.size, EBX: c.offset, ECX: c.cx})
	}
	return t
}

const (
	l1XSaveAVX = featECXXSave | 1<<28
	sub1XSaveC = 1 << 1
)

// TestNormalizeXSave: whatever the host reports, leaf 0xD announces only
// state the guest's feature flags use, its sizes match those components,
// and the vCPU's starting XCR0 is what leaf 0xD announces.
func TestNormalizeXSave(t *testing.T) {
	avx := component{2, 256, 576, 0}
	for _, tc := range []struct {
		name      string
		in        []CPUIDEntry
		xcr0      uint64   // sub-leaf 0 EDX:EAX after normalization
		size      uint32   // sub-leaf 0 EBX and ECX
		compacted uint32   // sub-leaf 1 EBX
		subLeaves []uint32 // sub-leaves 2.. left, in order
		leaf7EDX  uint32
		guestXCR0 uint64
	}{{
		// The L1 of scripts/nested-kvm.sh (QEMU -cpu EPYC under TCG),
		// as the L2 guest dumped it: EBX sized for x87/SSE.
		name: "AVX, no compacted format",
		in:   xsaveHost(l1XSaveAVX, 0, 0, 0, 0x7, 0x5, avx),
		xcr0: 0x7, size: 832, compacted: 0, subLeaves: []uint32{2}, guestXCR0: 0x7,
	}, {
		name: "AVX with XSAVEC",
		in:   xsaveHost(l1XSaveAVX, 0, 0, 0, 0x7, 0xf, avx),
		xcr0: 0x7, size: 832, compacted: 832, subLeaves: []uint32{2}, guestXCR0: 0x7,
	}, {
		// This project's PVM host: leaf 0xD names AVX and PKRU, leaf 1
		// has neither XSAVE nor AVX, leaf 7 no PKU.
		name: "PVM: no XSAVE",
		in:   xsaveHost(0x81202000, 0x1800002, 0x4, 0xa8000000, 0x207, 0, avx, component{9, 8, 2432, 0}),
		xcr0: 0x3, size: 576, compacted: 0, subLeaves: nil, leaf7EDX: 0xa8000000, guestXCR0: 0,
	}, {
		// -cpu max: AVX-512 and PKRU; the standard size is the 2696
		// bytes the guest computed there.
		name: "AVX-512 and PKRU, XSAVEC",
		in: xsaveHost(l1XSaveAVX, 1<<16, 1<<3, 0, 0x2e7, sub1XSaveC, avx,
			component{5, 64, 1088, 0}, component{6, 512, 1152, 0}, component{7, 1024, 1664, 0}, component{9, 8, 2688, 0}),
		xcr0: 0x2e7, size: 2696, compacted: 576 + 256 + 64 + 512 + 1024 + 8, subLeaves: []uint32{2, 5, 6, 7, 9}, guestXCR0: 0x2e7,
	}, {
		name: "64-byte aligned component in the compacted format",
		in:   xsaveHost(l1XSaveAVX, 0, 1<<3, 0, 0x207, sub1XSaveC, component{2, 256, 576, 0}, component{9, 8, 832, 2}),
		xcr0: 0x207, size: 840, compacted: 832 + 8, subLeaves: []uint32{2, 9}, guestXCR0: 0x207,
	}, {
		name: "AVX-512 state without the AVX512F flag",
		in: xsaveHost(l1XSaveAVX, 0, 0, 0, 0xe7, 0, avx,
			component{5, 64, 1088, 0}, component{6, 512, 1152, 0}, component{7, 1024, 1664, 0}),
		xcr0: 0x7, size: 832, subLeaves: []uint32{2}, guestXCR0: 0x7,
	}, {
		// KVM reports AMX in leaf 7 but its tile state only once the VMM
		// asked for the dynamic-state permission.
		name: "AMX flags without tile state",
		in:   xsaveHost(l1XSaveAVX, 0, 0, 1<<22|1<<24|1<<25|1<<4, 0x7, 0, avx),
		xcr0: 0x7, size: 832, subLeaves: []uint32{2}, leaf7EDX: 1 << 4, guestXCR0: 0x7,
	}, {
		name: "tile state without the AMX flag",
		in:   xsaveHost(l1XSaveAVX, 0, 0, 0, 0x60007, 0, avx, component{17, 64, 2752, 0}, component{18, 8192, 2816, 2}),
		xcr0: 0x7, size: 832, subLeaves: []uint32{2}, guestXCR0: 0x7,
	}, {
		name: "supervisor component kept",
		in:   xsaveHost(l1XSaveAVX, 0, 0, 0, 0x7, 0xf, avx, component{11, 16, 0, 1}),
		xcr0: 0x7, size: 832, compacted: 832, subLeaves: []uint32{2, 11}, guestXCR0: 0x7,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			orig := slices.Clone(tc.in)
			out := NormalizeCPUID(tc.in, Topology{VCPUs: 1})
			if !slices.Equal(tc.in, orig) {
				t.Error("input modified")
			}
			s0, s1 := FindCPUID(out, 0xD, 0), FindCPUID(out, 0xD, 1)
			if got := uint64(s0.EDX)<<32 | uint64(s0.EAX); got != tc.xcr0 {
				t.Errorf("sub-leaf 0 EDX:EAX = %#x, want %#x", got, tc.xcr0)
			}
			if s0.EBX != tc.size || s0.ECX != tc.size {
				t.Errorf("sub-leaf 0 EBX %d ECX %d, want %d", s0.EBX, s0.ECX, tc.size)
			}
			if s1.EBX != tc.compacted {
				t.Errorf("sub-leaf 1 EBX %d, want %d", s1.EBX, tc.compacted)
			}
			if o := FindCPUID(orig, 0xD, 1); s1.EAX != o.EAX || s1.ECX != o.ECX || s1.EDX != o.EDX {
				t.Errorf("sub-leaf 1 changed beyond EBX: %+v", s1)
			}
			var subs []uint32
			for _, e := range out {
				if e.Function == 0xD && e.Index >= 2 {
					subs = append(subs, e.Index)
				}
			}
			if !slices.Equal(subs, tc.subLeaves) {
				t.Errorf("sub-leaves %v, want %v", subs, tc.subLeaves)
			}
			if e := FindCPUID(out, 7, 0); e.EDX != tc.leaf7EDX {
				t.Errorf("leaf 7 EDX %#x, want %#x", e.EDX, tc.leaf7EDX)
			}
			if got := GuestXCR0(out); got != tc.guestXCR0 {
				t.Errorf("GuestXCR0 = %#x, want %#x", got, tc.guestXCR0)
			}
		})
	}
	if out := NormalizeCPUID([]CPUIDEntry{{Function: 1, ECX: l1XSaveAVX}}, Topology{VCPUs: 1}); GuestXCR0(out) != 0 || len(out) != 1 {
		t.Errorf("a table without leaf 0xD: %+v, GuestXCR0 %#x", out, GuestXCR0(out))
	}
}
