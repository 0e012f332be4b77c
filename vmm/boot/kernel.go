package boot

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/cubicle-dev/cubicle/vmm/memory"
)

var (
	// ErrUnsupportedKernel is returned for a kernel image that is neither
	// an x86-64 ELF64 executable nor a 64-bit-capable bzImage.
	ErrUnsupportedKernel = errors.New("boot: unsupported kernel image")
	// ErrKernelPlacement is returned when the kernel does not fit in guest
	// RAM above 1 MiB.
	ErrKernelPlacement = errors.New("boot: kernel does not fit in guest memory")
	// ErrCmdline is returned for a command line that is too long or holds
	// a NUL byte.
	ErrCmdline = errors.New("boot: invalid kernel command line")
	// ErrNoPVH is returned when PVH entry is requested for a kernel
	// without a XEN_ELFNOTE_PHYS32_ENTRY note.
	ErrNoPVH = errors.New("boot: kernel has no PVH entry note")
	// ErrInitrdPlacement is returned when the initrd does not fit between
	// the kernel and the highest address the kernel accepts.
	ErrInitrdPlacement = errors.New("boot: initrd does not fit in guest memory")
	// ErrVCPUs is returned for a vCPU count outside 1..MaxVCPUs.
	ErrVCPUs = errors.New("boot: unsupported number of vCPUs")
)

// Kernel formats.
const (
	FormatELF     = "vmlinux"
	FormatBzImage = "bzImage"
)

// ELF note identifying the PVH entry point
// (xen/include/public/elfnote.h: XEN_ELFNOTE_PHYS32_ENTRY, owner "Xen").
const (
	xenElfnotePhys32Entry = 18
	xenNoteName           = "Xen"
)

// Setup header (Documentation/arch/x86/boot.rst, "The Real-Mode Kernel
// Header"): offsets in the bzImage file and in struct boot_params.
const (
	hdrStart          = 0x1f1
	hdrSetupSects     = 0x1f1
	hdrBootFlag       = 0x1fe
	hdrJump           = 0x200
	hdrMagicOff       = 0x202
	hdrVersion        = 0x206
	hdrTypeOfLoader   = 0x210
	hdrLoadFlags      = 0x211
	hdrCode32Start    = 0x214
	hdrRamdiskImage   = 0x218
	hdrRamdiskSize    = 0x21c
	hdrCmdLinePtr     = 0x228
	hdrInitrdAddrMax  = 0x22c
	hdrKernelAlign    = 0x230
	hdrXLoadFlags     = 0x236
	hdrCmdlineSize    = 0x238
	hdrInitSize       = 0x260
	hdrMagic          = 0x53726448 // "HdrS"
	bootFlagMagic     = 0xAA55
	loadedHigh        = 0x01 // loadflags: protected-mode code at 1 MiB
	xlfKernel64       = 0x01 // xloadflags: has the 64-bit entry at +0x200
	minBootVersion    = 0x020c
	entry64Offset     = 0x200
	defaultSetupSects = 4
	maxSetupSects     = 64 // the real-mode part is at most 32 KiB
)

// Kernel is a kernel loaded into guest memory.
type Kernel struct {
	// Format is FormatELF or FormatBzImage.
	Format string
	// Entry is the guest-physical 64-bit entry point (startup_64).
	Entry uint64
	// PVHEntry is the 32-bit PVH entry point, 0 when the kernel has none.
	PVHEntry uint64
	// Start and End bound the guest-physical range the kernel occupies
	// (for a bzImage: including its init_size working area).
	Start, End uint64
	// setupHeader is a bzImage's setup header, copied into the zero page.
	setupHeader []byte
	// cmdlineMax is the longest command line the kernel accepts.
	cmdlineMax int
}

// LoadKernel reads the kernel image r (size bytes) and copies it into mem.
func LoadKernel(mem *memory.Memory, r io.ReaderAt, size int64) (*Kernel, error) {
	var magic [4]byte
	if _, err := r.ReadAt(magic[:], 0); err != nil {
		return nil, fmt.Errorf("%w: cannot read header: %w", ErrUnsupportedKernel, err)
	}
	if bytes.Equal(magic[:], []byte(elf.ELFMAG)) {
		return loadELF(mem, r)
	}
	var hdr [hdrMagicOff + 4]byte
	if _, err := r.ReadAt(hdr[:], 0); err == nil &&
		binary.LittleEndian.Uint32(hdr[hdrMagicOff:]) == hdrMagic &&
		binary.LittleEndian.Uint16(hdr[hdrBootFlag:]) == bootFlagMagic {
		return loadBzImage(mem, r, size)
	}
	return nil, fmt.Errorf("%w: neither an ELF64 vmlinux nor a bzImage (first bytes % x)", ErrUnsupportedKernel, magic)
}

func loadELF(mem *memory.Memory, r io.ReaderAt) (*Kernel, error) {
	f, err := elf.NewFile(r)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUnsupportedKernel, err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 || f.Data != elf.ELFDATA2LSB {
		return nil, fmt.Errorf("%w: ELF is %v %v %v, want ELFCLASS64 EM_X86_64 little-endian",
			ErrUnsupportedKernel, f.Class, f.Machine, f.Data)
	}
	if f.Type != elf.ET_EXEC {
		return nil, fmt.Errorf("%w: ELF type %v, want ET_EXEC", ErrUnsupportedKernel, f.Type)
	}
	k := &Kernel{Format: FormatELF, Entry: f.Entry, Start: ^uint64(0), cmdlineMax: CmdlineMax}
	loaded := 0
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_LOAD:
			if p.Memsz == 0 {
				continue
			}
			if err := loadSegment(mem, p); err != nil {
				return nil, err
			}
			k.Start = min(k.Start, p.Paddr)
			k.End = max(k.End, p.Paddr+p.Memsz)
			loaded++
		case elf.PT_NOTE:
			if e, ok, err := pvhNote(p); err != nil {
				return nil, err
			} else if ok {
				k.PVHEntry = e
			}
		}
	}
	if loaded == 0 {
		return nil, fmt.Errorf("%w: ELF has no loadable segment", ErrUnsupportedKernel)
	}
	if k.Entry < k.Start || k.Entry >= k.End {
		return nil, fmt.Errorf("%w: entry point %#x outside the loaded image [%#x, %#x)", ErrUnsupportedKernel, k.Entry, k.Start, k.End)
	}
	if k.PVHEntry != 0 && (k.PVHEntry < k.Start || k.PVHEntry >= k.End) {
		return nil, fmt.Errorf("%w: PVH entry %#x outside the loaded image", ErrUnsupportedKernel, k.PVHEntry)
	}
	return k, nil
}

func loadSegment(mem *memory.Memory, p *elf.Prog) error {
	if p.Filesz > p.Memsz {
		return fmt.Errorf("%w: segment with filesz %#x > memsz %#x", ErrUnsupportedKernel, p.Filesz, p.Memsz)
	}
	if p.Paddr < HighMemStart {
		return fmt.Errorf("%w: segment at %#x is below 1 MiB", ErrKernelPlacement, p.Paddr)
	}
	dst, err := mem.Slice(p.Paddr, p.Memsz)
	if err != nil {
		return fmt.Errorf("%w: segment [%#x, +%#x): %w", ErrKernelPlacement, p.Paddr, p.Memsz, err)
	}
	if _, err := io.ReadFull(p.Open(), dst[:p.Filesz]); err != nil {
		return fmt.Errorf("%w: reading segment at %#x: %w", ErrUnsupportedKernel, p.Paddr, err)
	}
	clear(dst[p.Filesz:])
	return nil
}

// maxNoteSize bounds how much of a PT_NOTE segment is read.
const maxNoteSize = 1 << 20

// pvhNote looks for XEN_ELFNOTE_PHYS32_ENTRY in a PT_NOTE segment.
func pvhNote(p *elf.Prog) (uint64, bool, error) {
	if p.Filesz > maxNoteSize {
		return 0, false, nil
	}
	buf := make([]byte, p.Filesz)
	if _, err := io.ReadFull(p.Open(), buf); err != nil {
		return 0, false, fmt.Errorf("%w: reading notes: %w", ErrUnsupportedKernel, err)
	}
	for len(buf) >= 12 {
		namesz := uint64(binary.LittleEndian.Uint32(buf[0:]))
		descsz := uint64(binary.LittleEndian.Uint32(buf[4:]))
		typ := binary.LittleEndian.Uint32(buf[8:])
		nameEnd := 12 + align4(namesz)
		descEnd := nameEnd + align4(descsz)
		if nameEnd > uint64(len(buf)) || descEnd > uint64(len(buf)) {
			break
		}
		name := string(bytes.TrimRight(buf[12:12+namesz], "\x00"))
		desc := buf[nameEnd : nameEnd+descsz]
		if name == xenNoteName && typ == xenElfnotePhys32Entry {
			switch len(desc) {
			case 4:
				return uint64(binary.LittleEndian.Uint32(desc)), true, nil
			case 8:
				return binary.LittleEndian.Uint64(desc), true, nil
			}
			return 0, false, fmt.Errorf("%w: PVH note with %d-byte entry", ErrUnsupportedKernel, len(desc))
		}
		buf = buf[descEnd:]
	}
	return 0, false, nil
}

func align4(n uint64) uint64 { return (n + 3) &^ 3 }

func loadBzImage(mem *memory.Memory, r io.ReaderAt, size int64) (*Kernel, error) {
	var hdr [0x280]byte
	if _, err := r.ReadAt(hdr[:], 0); err != nil {
		return nil, fmt.Errorf("%w: bzImage shorter than its setup header: %w", ErrUnsupportedKernel, err)
	}
	version := binary.LittleEndian.Uint16(hdr[hdrVersion:])
	if version < minBootVersion {
		return nil, fmt.Errorf("%w: boot protocol %d.%02d, need 2.12 for the 64-bit entry",
			ErrUnsupportedKernel, version>>8, version&0xff)
	}
	if hdr[hdrLoadFlags]&loadedHigh == 0 {
		return nil, fmt.Errorf("%w: zImage (not loaded high) is not supported", ErrUnsupportedKernel)
	}
	if binary.LittleEndian.Uint16(hdr[hdrXLoadFlags:])&xlfKernel64 == 0 {
		return nil, fmt.Errorf("%w: bzImage has no 64-bit entry point (XLF_KERNEL_64)", ErrUnsupportedKernel)
	}
	sects := int64(hdr[hdrSetupSects])
	if sects == 0 {
		sects = defaultSetupSects
	}
	if sects > maxSetupSects {
		return nil, fmt.Errorf("%w: %d setup sectors", ErrUnsupportedKernel, sects)
	}
	setupSize := (sects + 1) * 512
	if size <= setupSize {
		return nil, fmt.Errorf("%w: bzImage of %d bytes has no protected-mode kernel", ErrUnsupportedKernel, size)
	}
	hdrEnd := hdrMagicOff + int(int8(hdr[hdrJump+1])) // the jump at 0x200 skips the header
	if hdr[hdrJump] != 0xEB || hdrEnd <= hdrInitSize || hdrEnd > len(hdr) {
		return nil, fmt.Errorf("%w: bad setup header length", ErrUnsupportedKernel)
	}
	load := uint64(HighMemStart)
	payload := uint64(size - setupSize)
	initSize := max(uint64(binary.LittleEndian.Uint32(hdr[hdrInitSize:])), payload)
	if _, err := mem.Slice(load, initSize); err != nil {
		return nil, fmt.Errorf("%w: bzImage needs [%#x, +%#x): %w", ErrKernelPlacement, load, initSize, err)
	}
	dst, _ := mem.Slice(load, payload)
	if n, err := r.ReadAt(dst, setupSize); n != len(dst) {
		return nil, fmt.Errorf("%w: reading protected-mode kernel: %w", ErrUnsupportedKernel, err)
	}
	cmax := int(binary.LittleEndian.Uint32(hdr[hdrCmdlineSize:]))
	if cmax <= 0 || cmax > CmdlineMax {
		cmax = CmdlineMax
	}
	return &Kernel{
		Format:      FormatBzImage,
		Entry:       load + entry64Offset,
		Start:       load,
		End:         load + initSize,
		setupHeader: append([]byte(nil), hdr[hdrStart:hdrEnd]...),
		cmdlineMax:  cmax,
	}, nil
}
