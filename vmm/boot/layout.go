// Package boot puts a Linux kernel into guest memory and describes the CPU
// state it starts in. It loads an uncompressed vmlinux (ELF64) or the
// protected-mode part of a bzImage, then prepares one of two entry paths:
//
//   - the Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): a
//     zero page (struct boot_params) with the setup header, the command
//     line pointer and an e820 map, identity-mapped long-mode page tables
//     and a GDT built here, and the BSP entering the kernel in 64-bit mode
//     with RSI pointing at the zero page;
//   - PVH (xen/include/public/arch-x86/hvm/start_info.h), when the vmlinux
//     carries a XEN_ELFNOTE_PHYS32_ENTRY note: an hvm_start_info with the
//     command line and memory map, and the BSP entering in 32-bit protected
//     mode with paging off and EBX pointing at the start info.
//
// It also writes an Intel MultiProcessor Specification 1.4 table so the
// kernel finds the APs and the IOAPIC, and places an initrd if given.
//
// Nothing here touches KVM: the result is guest memory contents plus
// register values for package vmm to apply.
package boot

import "github.com/cubicle-dev/cubicle/vmm/memory"

// Guest-physical addresses of the boot structures, all in the first MiB
// (the same places Firecracker uses, which Linux tolerates everywhere).
const (
	GDTAddr        = 0x500   // boot GDT (5 descriptors)
	IDTAddr        = 0x520   // empty boot IDT
	PVHModlistAddr = 0x5000  // PVH struct hvm_modlist_entry of the initrd
	StartInfoAddr  = 0x6000  // PVH struct hvm_start_info
	PVHMemmapAddr  = 0x6040  // PVH memory map entries
	ZeroPageAddr   = 0x7000  // struct boot_params
	BootStackTop   = 0x8ff0  // initial RSP
	PML4Addr       = 0x9000  // long-mode page tables: PML4,
	PDPTAddr       = 0xA000  // one PDPT,
	PDAddr         = 0xB000  // and four page directories (2 MiB pages)
	CmdlineAddr    = 0x20000 // kernel command line
	EBDAStart      = 0x9FC00 // extended BIOS data area: holds the MP table
	MPTableAddr    = EBDAStart
	LegacyHoleEnd  = 0x100000 // end of the VGA/BIOS hole, start of high memory
	HighMemStart   = LegacyHoleEnd
	identityMapped = 4 << 30 // the boot page tables map the first 4 GiB
	// CmdlineMax is the longest command line accepted (x86
	// COMMAND_LINE_SIZE is 2048 including the terminating NUL).
	CmdlineMax = 2047
	// MaxVCPUs is the most vCPUs the MP table (which must fit in the 1 KiB
	// of EBDA that Linux scans) describes.
	MaxVCPUs = 32
)

// Physical addresses of the interrupt controllers (Intel SDM and the
// 82093AA IOAPIC datasheet defaults; KVM emulates them there).
const (
	IOAPICAddr = 0xFEC00000
	LAPICAddr  = 0xFEE00000
)

// E820 memory types (arch/x86/include/asm/e820/types.h).
const (
	E820RAM      = 1
	E820Reserved = 2
)

// E820Entry is one entry of the memory map given to the guest.
type E820Entry struct {
	Addr uint64
	Size uint64
	Type uint32
}

// MemoryMap returns the e820 map of a guest with the given RAM regions:
// conventional memory below the EBDA, the EBDA reserved, and each RAM
// region from 1 MiB up (the MMIO hole below 4 GiB is left out, so the
// kernel treats it as device space).
func MemoryMap(regions []memory.Region) []E820Entry {
	m := []E820Entry{
		{Addr: 0, Size: EBDAStart, Type: E820RAM},
		{Addr: EBDAStart, Size: 0xA0000 - EBDAStart, Type: E820Reserved},
	}
	for _, r := range regions {
		start, end := r.GuestAddr, r.End()
		start = max(start, HighMemStart)
		if end > start {
			m = append(m, E820Entry{Addr: start, Size: end - start, Type: E820RAM})
		}
	}
	return m
}
