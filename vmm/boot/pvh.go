package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/cubicle-dev/cubicle/vmm/memory"
)

// struct hvm_start_info and struct hvm_memmap_table_entry
// (xen/include/public/arch-x86/hvm/start_info.h, version 1).
const (
	StartInfoMagic   = 0x336ec578 // XEN_HVM_START_MAGIC_VALUE
	startInfoVersion = 1
	startInfoSize    = 56
	siMagic          = 0
	siVersion        = 4
	siNrModules      = 12
	siModlistPaddr   = 16
	siCmdlinePaddr   = 24
	siMemmapPaddr    = 40
	siMemmapEntries  = 48
	memmapEntrySize  = 24
	modlistEntrySize = 32 // struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved
	maxPVHMemmap     = (ZeroPageAddr - PVHMemmapAddr) / memmapEntrySize
)

// writeStartInfo fills struct hvm_start_info at StartInfoAddr and its
// memory map at PVHMemmapAddr. The map uses the e820 type numbers, as the
// PVH ABI specifies. An initrd is the one module, listed at
// PVHModlistAddr.
func writeStartInfo(mem *memory.Memory, e820 []E820Entry, rd initrd) error {
	if len(e820) > maxPVHMemmap {
		return fmt.Errorf("boot: %d memory map entries, room for %d", len(e820), maxPVHMemmap)
	}
	le := binary.LittleEndian
	si := make([]byte, startInfoSize)
	le.PutUint32(si[siMagic:], StartInfoMagic)
	le.PutUint32(si[siVersion:], startInfoVersion)
	le.PutUint64(si[siCmdlinePaddr:], CmdlineAddr)
	le.PutUint64(si[siMemmapPaddr:], PVHMemmapAddr)
	le.PutUint32(si[siMemmapEntries:], uint32(len(e820)))
	mm := make([]byte, len(e820)*memmapEntrySize)
	for i, e := range e820 {
		o := i * memmapEntrySize
		le.PutUint64(mm[o:], e.Addr)
		le.PutUint64(mm[o+8:], e.Size)
		le.PutUint32(mm[o+16:], e.Type)
	}
	if rd.size > 0 {
		le.PutUint32(si[siNrModules:], 1)
		le.PutUint64(si[siModlistPaddr:], PVHModlistAddr)
		mod := make([]byte, modlistEntrySize)
		le.PutUint64(mod[0:], rd.addr)
		le.PutUint64(mod[8:], rd.size)
		if _, err := mem.WriteAt(mod, PVHModlistAddr); err != nil {
			return fmt.Errorf("boot: PVH module list: %w", err)
		}
	}
	if _, err := mem.WriteAt(si, StartInfoAddr); err != nil {
		return fmt.Errorf("boot: PVH start info: %w", err)
	}
	if _, err := mem.WriteAt(mm, PVHMemmapAddr); err != nil {
		return fmt.Errorf("boot: PVH memory map: %w", err)
	}
	return nil
}
