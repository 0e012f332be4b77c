package boot

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/memory"
)

// Protocol selects how the kernel is entered.
type Protocol int

const (
	// ProtocolLinux64 is the Linux 64-bit boot protocol (the default).
	ProtocolLinux64 Protocol = iota
	// ProtocolPVH enters through the kernel's XEN_ELFNOTE_PHYS32_ENTRY.
	ProtocolPVH
)

func (p Protocol) String() string {
	if p == ProtocolPVH {
		return "pvh"
	}
	return "linux64"
}

// Config describes how to boot.
type Config struct {
	// Cmdline is the kernel command line.
	Cmdline string
	// VCPUs is the number of vCPUs (1..MaxVCPUs), listed in the MP table.
	VCPUs int
	// Protocol selects the entry path.
	Protocol Protocol
	// Initrd, if not empty, is an initial ramdisk (a cpio archive) placed
	// at the top of low RAM and announced to the kernel.
	Initrd []byte
}

// struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h).
const (
	bpExtRamdiskImg = 0x0c0
	bpExtRamdiskSz  = 0x0c4
	bpExtCmdLinePtr = 0x0c8
	bpE820Entries   = 0x1e8
	bpE820Table     = 0x2d0
	bpE820Max       = 128 // E820_MAX_ENTRIES_ZEROPAGE
	bpSize          = 4096
	e820EntrySize   = 20 // struct boot_e820_entry, packed
	loaderUndefined = 0xff
	kernelAlignment = 0x0100_0000
)

// BootState is what the bootstrap vCPU (vCPU 0) must be set to.
type BootState struct {
	Protocol Protocol
	Regs     kvm.Regs
	// sregs fills in the segment, descriptor-table and control registers.
	sregs func(*kvm.Sregs)
}

// ApplySregs sets the special registers for entry, starting from the
// vCPU's reset values (so that APIC base and similar fields are kept).
func (b *BootState) ApplySregs(s *kvm.Sregs) { b.sregs(s) }

// FPU returns the FPU state a kernel expects at entry (FNINIT defaults:
// control word 0x37f, MXCSR 0x1f80).
func (b *BootState) FPU() *kvm.FPU {
	return &kvm.FPU{FCW: 0x37f, MXCSR: 0x1f80}
}

// Setup writes the boot structures for k into mem and returns the initial
// state of vCPU 0. Other vCPUs start in the wait-for-SIPI state KVM gives
// them.
func Setup(mem *memory.Memory, k *Kernel, cfg Config) (*BootState, error) {
	if cfg.VCPUs < 1 || cfg.VCPUs > MaxVCPUs {
		return nil, fmt.Errorf("%w: %d (1..%d)", ErrVCPUs, cfg.VCPUs, MaxVCPUs)
	}
	if len(cfg.Cmdline) > k.cmdlineMax || strings.IndexByte(cfg.Cmdline, 0) >= 0 {
		return nil, fmt.Errorf("%w: %d bytes (at most %d, no NUL)", ErrCmdline, len(cfg.Cmdline), k.cmdlineMax)
	}
	if k.End > memory.MMIOHoleStart || k.Start < HighMemStart {
		return nil, fmt.Errorf("%w: kernel at [%#x, %#x)", ErrKernelPlacement, k.Start, k.End)
	}
	if err := writeCmdline(mem, cfg.Cmdline); err != nil {
		return nil, err
	}
	var rd initrd
	if len(cfg.Initrd) > 0 {
		var err error
		if rd, err = placeInitrd(mem, k, cfg.Initrd); err != nil {
			return nil, err
		}
	}
	if err := writeGDT(mem); err != nil {
		return nil, err
	}
	e820 := MemoryMap(mem.Regions())
	// Always: without an MP table (and without ACPI) Linux does not use
	// the IOAPIC, even with one vCPU.
	if err := WriteMPTable(mem, cfg.VCPUs); err != nil {
		return nil, err
	}
	switch cfg.Protocol {
	case ProtocolLinux64:
		if err := writePageTables(mem); err != nil {
			return nil, err
		}
		if err := writeZeroPage(mem, k, len(cfg.Cmdline), e820, rd); err != nil {
			return nil, err
		}
		return linux64State(k), nil
	case ProtocolPVH:
		if k.PVHEntry == 0 {
			return nil, ErrNoPVH
		}
		if err := writeStartInfo(mem, e820, rd); err != nil {
			return nil, err
		}
		return pvhState(k), nil
	}
	return nil, fmt.Errorf("boot: unknown protocol %d", cfg.Protocol)
}

func writeCmdline(mem *memory.Memory, cmdline string) error {
	b := append([]byte(cmdline), 0)
	if _, err := mem.WriteAt(b, CmdlineAddr); err != nil {
		return fmt.Errorf("boot: command line: %w", err)
	}
	return nil
}

// writeZeroPage fills struct boot_params at ZeroPageAddr.
func writeZeroPage(mem *memory.Memory, k *Kernel, cmdlineLen int, e820 []E820Entry, rd initrd) error {
	if len(e820) > bpE820Max {
		return fmt.Errorf("boot: %d e820 entries, the zero page holds %d", len(e820), bpE820Max)
	}
	zp := make([]byte, bpSize)
	le := binary.LittleEndian
	if k.setupHeader != nil {
		copy(zp[hdrStart:], k.setupHeader)
	} else {
		le.PutUint16(zp[hdrBootFlag:], bootFlagMagic)
		le.PutUint32(zp[hdrMagicOff:], hdrMagic)
		le.PutUint32(zp[hdrKernelAlign:], kernelAlignment)
	}
	zp[hdrTypeOfLoader] = loaderUndefined
	zp[hdrLoadFlags] |= loadedHigh
	le.PutUint32(zp[hdrCmdLinePtr:], CmdlineAddr)
	le.PutUint32(zp[bpExtCmdLinePtr:], 0)
	le.PutUint32(zp[hdrCmdlineSize:], uint32(cmdlineLen+1))
	le.PutUint32(zp[hdrRamdiskImage:], uint32(rd.addr))
	le.PutUint32(zp[hdrRamdiskSize:], uint32(rd.size))
	le.PutUint32(zp[bpExtRamdiskImg:], uint32(rd.addr>>32))
	le.PutUint32(zp[bpExtRamdiskSz:], uint32(rd.size>>32))
	zp[bpE820Entries] = byte(len(e820))
	for i, e := range e820 {
		o := bpE820Table + i*e820EntrySize
		le.PutUint64(zp[o:], e.Addr)
		le.PutUint64(zp[o+8:], e.Size)
		le.PutUint32(zp[o+16:], e.Type)
	}
	if _, err := mem.WriteAt(zp, ZeroPageAddr); err != nil {
		return fmt.Errorf("boot: zero page: %w", err)
	}
	return nil
}

// initrd is where the initial ramdisk was put (size 0: none).
type initrd struct{ addr, size uint64 }

// defaultInitrdAddrMax is the highest initrd byte for a kernel without a
// setup header (a vmlinux): the initrd_addr_max every x86-64 kernel
// declares (arch/x86/boot/header.S: 0x7fffffff).
const defaultInitrdAddrMax = 0x7fffffff

// placeInitrd copies data to the highest page-aligned address that keeps
// it in the first RAM region, below the kernel's initrd_addr_max and above
// the kernel (as boot loaders do: Documentation/arch/x86/boot.rst,
// "initrd_addr_max").
func placeInitrd(mem *memory.Memory, k *Kernel, data []byte) (initrd, error) {
	size := uint64(len(data))
	limit := uint64(defaultInitrdAddrMax) + 1
	if len(k.setupHeader) > hdrInitrdAddrMax+4-hdrStart {
		if m := binary.LittleEndian.Uint32(k.setupHeader[hdrInitrdAddrMax-hdrStart:]); m != 0 {
			limit = uint64(m) + 1
		}
	}
	limit = min(limit, mem.Regions()[0].End())
	if size > limit {
		return initrd{}, fmt.Errorf("%w: %d bytes, below %#x", ErrInitrdPlacement, size, limit)
	}
	addr := (limit - size) &^ (memory.PageSize - 1)
	if addr < k.End {
		return initrd{}, fmt.Errorf("%w: %d bytes between the kernel's end %#x and %#x", ErrInitrdPlacement, size, k.End, limit)
	}
	if _, err := mem.WriteAt(data, int64(addr)); err != nil {
		return initrd{}, fmt.Errorf("boot: initrd: %w", err)
	}
	return initrd{addr: addr, size: size}, nil
}
