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
	// VCPUs is the number of vCPUs (1..MaxVCPUs); with more than one an
	// MP table is written.
	VCPUs int
	// Protocol selects the entry path.
	Protocol Protocol
}

// struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h).
const (
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
	if err := writeGDT(mem); err != nil {
		return nil, err
	}
	e820 := MemoryMap(mem.Regions())
	if cfg.VCPUs > 1 {
		if err := WriteMPTable(mem, cfg.VCPUs); err != nil {
			return nil, err
		}
	}
	switch cfg.Protocol {
	case ProtocolLinux64:
		if err := writePageTables(mem); err != nil {
			return nil, err
		}
		if err := writeZeroPage(mem, k, len(cfg.Cmdline), e820); err != nil {
			return nil, err
		}
		return linux64State(k), nil
	case ProtocolPVH:
		if k.PVHEntry == 0 {
			return nil, ErrNoPVH
		}
		if err := writeStartInfo(mem, e820); err != nil {
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
func writeZeroPage(mem *memory.Memory, k *Kernel, cmdlineLen int, e820 []E820Entry) error {
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
