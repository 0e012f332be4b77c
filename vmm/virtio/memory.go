package virtio

import (
	"errors"
	"fmt"
	"sort"
)

// ErrOutOfBounds is returned when a guest physical range is not wholly inside
// one region of guest RAM. Guest-supplied addresses that fail this check are
// the most common form of hostile (or buggy) driver input.
var ErrOutOfBounds = errors.New("virtio: guest address range out of bounds")

// Memory is the devices' view of guest RAM. Slice returns the host bytes that
// back guest physical addresses [gpa, gpa+n): a sub-slice of the VM's own
// mapping, so writes to it are writes to guest memory. The range must lie
// inside a single region; otherwise Slice returns an error wrapping
// ErrOutOfBounds. A returned slice has cap == len, so appending to it can never
// reach neighbouring memory. Implementations must be safe for concurrent use.
//
// The guest writes the same memory concurrently from its vCPUs: devices copy
// anything they validate (headers, descriptors) out of it before trusting it.
type Memory interface {
	Slice(gpa, n uint64) ([]byte, error)
}

// Region is one contiguous range of guest RAM: Data backs guest physical
// addresses [GPA, GPA+len(Data)).
type Region struct {
	GPA  uint64
	Data []byte
}

// GuestMemory implements Memory over one or more host byte slices, normally
// the VM's mmap of guest RAM at GPA 0 and, for guests above the 32-bit PCI hole,
// a second region above 4 GiB. It is immutable after construction.
type GuestMemory struct {
	regions []Region // sorted by GPA, non-overlapping, non-empty
}

var _ Memory = (*GuestMemory)(nil)

// NewFlatMemory returns guest memory made of ram alone, mapped at GPA 0.
func NewFlatMemory(ram []byte) *GuestMemory {
	return &GuestMemory{regions: []Region{{GPA: 0, Data: ram}}}
}

// NewGuestMemory returns guest memory made of the given regions. Regions must
// not be empty, wrap around the 64-bit address space or overlap.
func NewGuestMemory(regions ...Region) (*GuestMemory, error) {
	rs := append([]Region(nil), regions...)
	sort.Slice(rs, func(i, j int) bool { return rs[i].GPA < rs[j].GPA })
	for i, r := range rs {
		if len(r.Data) == 0 {
			return nil, fmt.Errorf("virtio: memory region %d at %#x is empty", i, r.GPA)
		}
		end := r.GPA + uint64(len(r.Data))
		if end < r.GPA {
			return nil, fmt.Errorf("virtio: memory region at %#x wraps the address space", r.GPA)
		}
		if i+1 < len(rs) && rs[i+1].GPA < end {
			return nil, fmt.Errorf("virtio: memory regions at %#x and %#x overlap", r.GPA, rs[i+1].GPA)
		}
	}
	if len(rs) == 0 {
		return nil, errors.New("virtio: no memory regions")
	}
	return &GuestMemory{regions: rs}, nil
}

// Slice implements Memory.
func (m *GuestMemory) Slice(gpa, n uint64) ([]byte, error) {
	for i := range m.regions {
		r := &m.regions[i]
		size := uint64(len(r.Data))
		if gpa < r.GPA || gpa-r.GPA > size {
			continue
		}
		off := gpa - r.GPA
		if n > size-off {
			continue // may still start the next, adjacent region
		}
		return r.Data[off : off+n : off+n], nil
	}
	return nil, fmt.Errorf("%w: [%#x, +%#x)", ErrOutOfBounds, gpa, n)
}

// Size returns the total number of bytes of guest RAM.
func (m *GuestMemory) Size() uint64 {
	var s uint64
	for _, r := range m.regions {
		s += uint64(len(r.Data))
	}
	return s
}
