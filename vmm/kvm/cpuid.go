//go:build linux && amd64

package kvm

import "math/bits"

// CPUID leaves and bits touched by normalisation (Intel SDM vol. 2A, CPUID;
// arch/x86/include/uapi/asm/kvm_para.h; the PVM uapi header pvm_para.h).
const (
	leafFeatures        = 0x1
	leafCacheParams     = 0x4
	leafExtTopology     = 0xB
	leafV2ExtTopology   = 0x1F
	leafHypervisorBase  = 0x40000000 // KVM_CPUID_SIGNATURE
	leafPVMFeatures     = 0x40000002 // KVM_CPUID_VENDOR_FEATURES
	leafAddressSizes    = 0x80000008
	featECXHypervisor   = 1 << 31 // CPUID.1:ECX[31], "running under a hypervisor"
	featEDXHTT          = 1 << 28 // CPUID.1:EDX[28], multi-threading / >1 logical CPU
	pvmSignature        = 0x4d5650
	topoLevelSMT        = 1 // CPUID.B:ECX[15:8] level type
	topoLevelCore       = 2
	pvmMaxPhysAddrBits  = 43 // PVM guests address at most 2^43 bytes physical
	maxAPICIDInLeaf1EBX = 0xFF
)

// IsPVM reports whether a CPUID table (normally SupportedCPUID) comes from
// a PVM host — KVM running guests in hardware user mode without VT-x/SVM —
// which announces itself with EBX = "PVM" (0x4d5650) in leaf 0x40000002
// (KVM_CPUID_VENDOR_FEATURES). See System.PVM for the complete check.
func IsPVM(entries []CPUIDEntry) bool {
	for _, e := range entries {
		if e.Function == leafPVMFeatures && e.EBX == pvmSignature {
			return true
		}
	}
	return false
}

// Topology is the guest CPU topology that normalisation writes into CPUID:
// one package of VCPUs cores with one thread each.
type Topology struct {
	// VCPUs is the number of vCPUs in the VM (1..255).
	VCPUs int
	// APICID is the APIC id of the vCPU the table is for (its index).
	APICID int
	// PVM clamps the physical-address width to 43 bits and makes sure
	// the PVM signature leaf is present.
	PVM bool
}

// NormalizeCPUID derives the CPUID table of one vCPU from the host's
// supported table: it sets the APIC id and logical-processor count in leaf
// 1, the hypervisor bit, the cache-sharing and core counts of leaf 4, the
// x2APIC topology leaves 0xB and 0x1F, and on PVM hosts clamps the
// physical-address bits of leaf 0x80000008 to 43 and adds the PVM
// signature leaf 0x40000002 if the host table lacks it. It makes the XSAVE
// leaf 0xD agree with the feature flags (see normalizeXSave). Leaves
// 0x40000000 and up (KVM signature and paravirt features) pass through
// unchanged. The input is not modified.
func NormalizeCPUID(supported []CPUIDEntry, t Topology) []CPUIDEntry {
	n := max(t.VCPUs, 1)
	coreBits := uint32(bits.Len(uint(n - 1))) // width of the core-id field
	apic := uint32(t.APICID)
	out := make([]CPUIDEntry, 0, len(supported)+2)
	topoSeen := map[uint32]bool{}
	for _, e := range supported {
		switch e.Function {
		case leafFeatures:
			e.EBX = e.EBX&0x0000FFFF | uint32(min(n, maxAPICIDInLeaf1EBX))<<16 | (apic&0xFF)<<24
			e.ECX |= featECXHypervisor
			if n > 1 {
				e.EDX |= featEDXHTT
			} else {
				e.EDX &^= featEDXHTT
			}
		case leafCacheParams:
			if e.EAX&0x1F == 0 { // cache type 0: no more caches
				break
			}
			level := (e.EAX >> 5) & 0x7
			e.EAX &= 0x3FFF
			e.EAX |= uint32(n-1) << 26 // addressable core ids per package - 1
			if level >= 3 {
				e.EAX |= uint32(n-1) << 14 // L3 shared by all cores
			}
		case leafExtTopology, leafV2ExtTopology:
			topoSeen[e.Function] = true
			if e.Index > 2 {
				continue // rebuilt below
			}
			e = topologyEntry(e.Function, e.Index, n, coreBits, apic)
		case leafAddressSizes:
			if t.PVM && e.EAX&0xFF > pvmMaxPhysAddrBits {
				e.EAX = e.EAX&^0xFF | pvmMaxPhysAddrBits
			}
		}
		out = append(out, e)
	}
	out = normalizeXSave(out)
	if t.PVM {
		out = addPVMLeaf(out)
	}
	// Leaf 0xB is what guests use to enumerate x2APIC topology; make sure
	// subleaves 0..2 exist even if the host table lacked some.
	if topoSeen[leafExtTopology] {
		have := map[uint32]bool{}
		for _, e := range out {
			if e.Function == leafExtTopology {
				have[e.Index] = true
			}
		}
		for sub := uint32(0); sub <= 2; sub++ {
			if !have[sub] {
				out = append(out, topologyEntry(leafExtTopology, sub, n, coreBits, apic))
			}
		}
	}
	return out
}

// addPVMLeaf makes sure a PVM guest finds the PVM signature: leaf
// 0x40000000 announces leaves up to 0x40000002 and leaf 0x40000002 carries
// EBX = "PVM". Guest kernels detect PVM through exactly these two leaves.
func addPVMLeaf(entries []CPUIDEntry) []CPUIDEntry {
	if IsPVM(entries) {
		return entries
	}
	for i := range entries {
		if entries[i].Function == leafHypervisorBase && entries[i].EAX < leafPVMFeatures {
			entries[i].EAX = leafPVMFeatures
		}
	}
	return append(entries, CPUIDEntry{Function: leafPVMFeatures, EBX: pvmSignature})
}

// topologyEntry builds subleaf sub of leaf 0xB/0x1F for a package of n
// single-threaded cores (Intel SDM vol. 2A, "Extended Topology
// Enumeration Leaf").
func topologyEntry(leaf, sub uint32, n int, coreBits, apic uint32) CPUIDEntry {
	e := CPUIDEntry{Function: leaf, Index: sub, Flags: CPUIDFlagSignificantIndex, EDX: apic}
	switch sub {
	case 0: // SMT level: one thread per core
		e.EAX, e.EBX, e.ECX = 0, 1, topoLevelSMT<<8|sub
	case 1: // core level: n cores per package
		e.EAX, e.EBX, e.ECX = coreBits, uint32(n), topoLevelCore<<8|sub
	default: // invalid level terminates the enumeration
		e.ECX = sub
	}
	return e
}

// FindCPUID returns the entry for function/index, or nil.
func FindCPUID(entries []CPUIDEntry, function, index uint32) *CPUIDEntry {
	for i := range entries {
		e := &entries[i]
		if e.Function != function {
			continue
		}
		if e.Flags&CPUIDFlagSignificantIndex != 0 && e.Index != index {
			continue
		}
		return e
	}
	return nil
}
