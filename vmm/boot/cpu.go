package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/memory"
)

// Boot GDT selectors. The Linux boot protocol requires __BOOT_CS = 0x10
// and __BOOT_DS = 0x18 (arch/x86/include/asm/segment.h); PVH uses the
// 32-bit code segment at 0x08.
const (
	SelectorCode32 = 0x08
	SelectorCode64 = 0x10
	SelectorData   = 0x18
	SelectorTSS    = 0x20
)

// Descriptor access/flag words (bits 8..15 and 20..23 of the high dword,
// packed as in the Intel SDM vol. 3, figure 3-8): G, D/B, L, P, DPL, S, type.
const (
	descCode32 = 0xc09b // G=1 D=1 P=1 S=1 type=execute/read, accessed
	descCode64 = 0xa09b // G=1 L=1 P=1 S=1 type=execute/read, accessed
	descData   = 0xc093 // G=1 B=1 P=1 S=1 type=read/write, accessed
	descTSS    = 0x808b // G=1 P=1 S=0 type=busy 64-bit TSS
)

// Control-register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
const (
	cr0PE    = 1 << 0
	cr0ET    = 1 << 4
	cr0NW    = 1 << 29
	cr0CD    = 1 << 30
	cr0PG    = 1 << 31
	cr4PAE   = 1 << 5
	eferLME  = 1 << 8
	eferLMA  = 1 << 10
	rflagsRS = 1 << 1 // bit 1 of RFLAGS is reserved and always set
)

// Page-table entry bits (Intel SDM vol. 3, 4.5).
const (
	ptePresent  = 1 << 0
	pteWritable = 1 << 1
	ptePageSize = 1 << 7
)

// gdtEntries is the number of descriptors in the boot GDT.
const gdtEntries = 5

// bootGDT returns the boot GDT: null, 32-bit code, 64-bit code, data, TSS,
// each flat over 4 GiB.
func bootGDT() [gdtEntries]uint64 {
	return [gdtEntries]uint64{
		0,
		descriptor(descCode32, 0, 0xfffff),
		descriptor(descCode64, 0, 0xfffff),
		descriptor(descData, 0, 0xfffff),
		descriptor(descTSS, 0, 0xfffff),
	}
}

// descriptor encodes a segment descriptor (Intel SDM vol. 3, 3.4.5).
func descriptor(flags uint16, base, limit uint32) uint64 {
	return uint64(base&0xff000000)<<32 |
		uint64(flags&0xf0ff)<<40 |
		uint64(limit&0x000f0000)<<32 |
		uint64(base&0x00ffffff)<<16 |
		uint64(limit&0x0000ffff)
}

// segment unpacks a GDT descriptor into KVM's segment-register form.
func segment(sel uint16) kvm.Segment {
	d := bootGDT()[sel/8]
	base := uint64(d>>16&0xffffff) | (d>>56&0xff)<<24
	limit := uint32(d&0xffff) | uint32(d>>48&0xf)<<16
	flags := uint16(d >> 40 & 0xf0ff)
	s := kvm.Segment{
		Base:     base,
		Selector: sel,
		Type:     uint8(flags & 0xf),
		S:        uint8(flags >> 4 & 1),
		DPL:      uint8(flags >> 5 & 3),
		Present:  uint8(flags >> 7 & 1),
		AVL:      uint8(flags >> 12 & 1),
		L:        uint8(flags >> 13 & 1),
		DB:       uint8(flags >> 14 & 1),
		G:        uint8(flags >> 15 & 1),
	}
	if s.G == 1 {
		limit = limit<<12 | 0xfff
	}
	s.Limit = limit
	return s
}

func writeGDT(mem *memory.Memory) error {
	b := make([]byte, 8*gdtEntries+8) // GDT followed by one empty IDT entry
	for i, d := range bootGDT() {
		binary.LittleEndian.PutUint64(b[8*i:], d)
	}
	if _, err := mem.WriteAt(b[:8*gdtEntries], GDTAddr); err != nil {
		return fmt.Errorf("boot: GDT: %w", err)
	}
	if _, err := mem.WriteAt(b[8*gdtEntries:], IDTAddr); err != nil {
		return fmt.Errorf("boot: IDT: %w", err)
	}
	return nil
}

// writePageTables identity-maps the first 4 GiB with 2 MiB pages: the
// kernel, the zero page and the command line are covered wherever they
// are, and so are the IOAPIC and local APIC pages below 4 GiB.
func writePageTables(mem *memory.Memory) error {
	const pds = identityMapped >> 30
	le := binary.LittleEndian
	b := make([]byte, (2+pds)*memory.PageSize)
	le.PutUint64(b[0:], PDPTAddr|ptePresent|pteWritable)
	for i := range uint64(pds) {
		le.PutUint64(b[memory.PageSize+8*i:], (PDAddr+i*memory.PageSize)|ptePresent|pteWritable)
		for j := range uint64(512) {
			addr := (i*512 + j) << 21
			le.PutUint64(b[(2+i)*memory.PageSize+8*j:], addr|ptePresent|pteWritable|ptePageSize)
		}
	}
	if _, err := mem.WriteAt(b, PML4Addr); err != nil {
		return fmt.Errorf("boot: page tables: %w", err)
	}
	return nil
}

func linux64State(k *Kernel) *BootState {
	return &BootState{
		Protocol: ProtocolLinux64,
		Regs: kvm.Regs{
			RIP:    k.Entry,
			RSP:    BootStackTop,
			RBP:    BootStackTop,
			RSI:    ZeroPageAddr,
			RFLAGS: rflagsRS,
		},
		sregs: func(s *kvm.Sregs) {
			setFlatSegments(s, SelectorCode64)
			s.CR0 = s.CR0&^(cr0CD|cr0NW) | cr0PE | cr0ET | cr0PG
			s.CR3 = PML4Addr
			s.CR4 = cr4PAE
			s.EFER = eferLME | eferLMA
		},
	}
}

func pvhState(k *Kernel) *BootState {
	return &BootState{
		Protocol: ProtocolPVH,
		Regs: kvm.Regs{
			RIP:    k.PVHEntry,
			RBX:    StartInfoAddr,
			RFLAGS: rflagsRS,
		},
		sregs: func(s *kvm.Sregs) {
			setFlatSegments(s, SelectorCode32)
			// PVH: TR is a 32-bit busy TSS with base 0 and limit 0x67.
			s.TR.Limit, s.TR.G, s.TR.Type = 0x67, 0, 0xb
			s.CR0 = s.CR0&^(cr0CD|cr0NW|cr0PG) | cr0PE | cr0ET
			s.CR3, s.CR4, s.EFER = 0, 0, 0
		},
	}
}

func setFlatSegments(s *kvm.Sregs, code uint16) {
	s.CS = segment(code)
	data := segment(SelectorData)
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = segment(SelectorTSS)
	s.GDT = kvm.DTable{Base: GDTAddr, Limit: 8*gdtEntries - 1}
	s.IDT = kvm.DTable{Base: IDTAddr, Limit: 7}
}
