//go:build linux

// Package memory is a guest's physical memory: one host mapping — anonymous
// for a fresh VM, or a memory file mapped copy-on-write (MAP_PRIVATE) for a
// restored one, so that every clone of a snapshot shares the file's pages —
// the x86 layout that splits it into KVM memory slots around the 32-bit
// MMIO hole, bounds-checked access by guest physical address, and dumping
// it to a sparse memory file.
//
// A Memory is safe for concurrent use: accessors copy into or out of the
// mapping and guest-physical ranges are not locked (the guest itself may
// write any page at any time). Close must not race with other methods.
package memory

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Guest physical layout (x86 PC convention, as Firecracker and Cloud
// Hypervisor lay it out): RAM from 0 up to the 32-bit MMIO hole, the hole
// for device MMIO, the IOAPIC (0xFEC00000) and the local APICs
// (0xFEE00000), and the rest of RAM above 4 GiB.
const (
	// MMIOHoleStart is the first address of the 32-bit MMIO hole.
	MMIOHoleStart uint64 = 0xC000_0000
	// MMIOHoleEnd is the end (exclusive) of the 32-bit MMIO hole: 4 GiB.
	MMIOHoleEnd uint64 = 1 << 32
	// PageSize is the granularity of sizes and of the sparse memory file.
	PageSize = 4096
	// MinSize is the smallest guest memory: the boot structures below
	// 1 MiB and a kernel above it need at least this much.
	MinSize = 2 << 20
	// MaxSize bounds guest memory (1 TiB) so that a malformed request
	// cannot ask for an absurd mapping.
	MaxSize = 1 << 40
)

var (
	// ErrSize is returned for a memory size that is not a multiple of
	// PageSize or lies outside [MinSize, MaxSize].
	ErrSize = errors.New("memory: invalid guest memory size")
	// ErrFileSize is returned by MapFile when the memory file's size is
	// not the guest memory size the snapshot declares.
	ErrFileSize = errors.New("memory: memory file has the wrong size")
	// ErrRange is returned for a guest-physical range that is not backed
	// by RAM (it falls in the MMIO hole, beyond the end of memory, or
	// straddles a region boundary).
	ErrRange = errors.New("memory: guest physical range is not RAM")
)

// Region is one contiguous piece of guest RAM: GuestAddr..GuestAddr+Size
// is backed by bytes Offset..Offset+Size of the host mapping (and of the
// memory file). Each region is one KVM memory slot.
type Region struct {
	GuestAddr uint64
	Size      uint64
	Offset    uint64
}

// End returns the first guest-physical address after r.
func (r Region) End() uint64 { return r.GuestAddr + r.Size }

// Layout returns the regions of a guest with size bytes of RAM: one region
// below the MMIO hole and, when size exceeds MMIOHoleStart, a second
// starting at 4 GiB.
func Layout(size uint64) []Region {
	if size <= MMIOHoleStart {
		return []Region{{GuestAddr: 0, Size: size, Offset: 0}}
	}
	return []Region{
		{GuestAddr: 0, Size: MMIOHoleStart, Offset: 0},
		{GuestAddr: MMIOHoleEnd, Size: size - MMIOHoleStart, Offset: MMIOHoleStart},
	}
}

// CheckSize validates a guest memory size.
func CheckSize(size uint64) error {
	if size < MinSize || size > MaxSize || size%PageSize != 0 {
		return fmt.Errorf("%w: %d bytes (want a multiple of %d in [%d, %d])", ErrSize, size, PageSize, MinSize, uint64(MaxSize))
	}
	return nil
}

// Memory is guest RAM mapped into this process.
type Memory struct {
	mem     []byte
	regions []Region
	// vmmDirty, when write tracking is on, has one bit per page of mem
	// that the VMM handed out or wrote (see EnableWriteTracking).
	vmmDirty []atomic.Uint64
}

// New maps size bytes of zeroed anonymous memory. Pages are allocated on
// first touch.
func New(size uint64) (*Memory, error) {
	if err := CheckSize(size); err != nil {
		return nil, err
	}
	mem, err := unix.Mmap(-1, 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("memory: mmap %d bytes: %w", size, err)
	}
	return &Memory{mem: mem, regions: Layout(size)}, nil
}

// MapFile maps the memory file at path copy-on-write (MAP_PRIVATE): reads
// see the file, guest writes go to private pages of this process, and the
// file is never modified. The file must be exactly size bytes long.
func MapFile(path string, size uint64) (*Memory, error) {
	if err := CheckSize(size); err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("memory: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("memory: %w", err)
	}
	if !st.Mode().IsRegular() || uint64(st.Size()) != size {
		return nil, fmt.Errorf("%w: %s is %d bytes, the snapshot's guest has %d", ErrFileSize, path, st.Size(), size)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("memory: mmap %s: %w", path, err)
	}
	return &Memory{mem: mem, regions: Layout(size)}, nil
}

// Close unmaps the memory. No KVM memory slot may still point at it.
func (m *Memory) Close() error {
	if m.mem == nil {
		return nil
	}
	err := unix.Munmap(m.mem)
	m.mem = nil
	return err
}

// Size returns the amount of guest RAM in bytes.
func (m *Memory) Size() uint64 { return uint64(len(m.mem)) }

// Regions returns the RAM regions, in ascending guest-physical order.
func (m *Memory) Regions() []Region { return append([]Region(nil), m.regions...) }

// HostAddr returns the host virtual address of byte off of the mapping,
// for KVM_SET_USER_MEMORY_REGION.
func (m *Memory) HostAddr(off uint64) uintptr {
	return uintptr(unsafe.Pointer(unsafe.SliceData(m.mem))) + uintptr(off)
}

// Slice returns the host bytes backing guest-physical [gpa, gpa+n). The
// range must lie within one region. The slice aliases guest memory: the
// guest may change it at any time.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	for _, r := range m.regions {
		if gpa >= r.GuestAddr && gpa < r.End() {
			if n > r.End()-gpa {
				break
			}
			off := r.Offset + (gpa - r.GuestAddr)
			m.markOffsets(off, n)
			return m.mem[off : off+n : off+n], nil
		}
	}
	return nil, fmt.Errorf("%w: [%#x, +%#x)", ErrRange, gpa, n)
}

// ReadAt copies guest memory at guest-physical address off into p
// (io.ReaderAt). It reads all of p or fails.
func (m *Memory) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: negative address", ErrRange)
	}
	s, err := m.Slice(uint64(off), uint64(len(p)))
	if err != nil {
		return 0, err
	}
	return copy(p, s), nil
}

// WriteAt copies p into guest memory at guest-physical address off
// (io.WriterAt). It writes all of p or fails.
func (m *Memory) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("%w: negative address", ErrRange)
	}
	s, err := m.Slice(uint64(off), uint64(len(p)))
	if err != nil {
		return 0, err
	}
	return copy(s, p), nil
}

var (
	_ io.ReaderAt = (*Memory)(nil)
	_ io.WriterAt = (*Memory)(nil)
)

// Dump writes the whole of guest memory to a new file at path, atomically
// (a temporary file renamed into place). All-zero pages are left as holes,
// so the file is sparse: a mostly idle 512 MiB guest dumps to a few MiB of
// disk. The guest must not run while Dump reads its memory.
func (m *Memory) Dump(path string) error {
	_, err := m.DumpID(path)
	return err
}

// DumpID is Dump that also returns the dumped contents' ContentID,
// computed in the same pass.
func (m *Memory) DumpID(path string) (uint64, error) {
	h := newIDHash(uint64(len(m.mem)))
	err := writeAtomic(path, int64(len(m.mem)), func(f *os.File) error {
		// Write maximal runs of non-zero pages.
		n := uint64(len(m.mem))
		for start := uint64(0); start < n; {
			if isZero(m.mem[start : start+PageSize]) {
				start += PageSize
				continue
			}
			end := start
			for end < n && !isZero(m.mem[end:end+PageSize]) {
				h.page(end, m.mem[end:end+PageSize])
				end += PageSize
			}
			if _, err := f.WriteAt(m.mem[start:end], int64(start)); err != nil {
				return err
			}
			start = end
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return h.crc, nil
}

// isZero reports whether page (a multiple of 8 bytes long) is all zero.
func isZero(page []byte) bool {
	words := unsafe.Slice((*uint64)(unsafe.Pointer(unsafe.SliceData(page))), len(page)/8)
	for _, w := range words {
		if w != 0 {
			return false
		}
	}
	return true
}
