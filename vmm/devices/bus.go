package devices

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

var (
	// ErrOverlap is returned by Bus.Insert for a range that overlaps a
	// device already on the bus, is empty, or wraps around.
	ErrOverlap = errors.New("devices: address range overlaps or is empty")
	// ErrNotFound is returned by Bus.Remove when no device starts at the
	// given address.
	ErrNotFound = errors.New("devices: no device at address")
)

// Entry is one device on a Bus.
type Entry struct {
	Name   string
	Base   uint64
	Size   uint64
	Device MMIODevice
}

// Bus maps address ranges (ports or guest-physical addresses) to devices.
// Lookups are lock-free — they read an immutable sorted table through an
// atomic pointer — so vCPU threads never contend; Insert and Remove copy
// the table under mu.
type Bus struct {
	mu    sync.Mutex // serialises writers of table
	table atomic.Pointer[[]Entry]
}

// NewBus returns an empty bus.
func NewBus() *Bus {
	b := &Bus{}
	b.table.Store(&[]Entry{})
	return b
}

// Insert adds dev at [base, base+size).
func (b *Bus) Insert(name string, base, size uint64, dev MMIODevice) error {
	if size == 0 || base+size < base {
		return fmt.Errorf("%w: %s at %#x size %#x", ErrOverlap, name, base, size)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.table.Load()
	for _, e := range old {
		if base < e.Base+e.Size && e.Base < base+size {
			return fmt.Errorf("%w: %s [%#x, %#x) and %s [%#x, %#x)", ErrOverlap,
				name, base, base+size, e.Name, e.Base, e.Base+e.Size)
		}
	}
	t := append(slices.Clone(old), Entry{Name: name, Base: base, Size: size, Device: dev})
	slices.SortFunc(t, func(a, b Entry) int {
		switch {
		case a.Base < b.Base:
			return -1
		case a.Base > b.Base:
			return 1
		}
		return 0
	})
	b.table.Store(&t)
	return nil
}

// Remove takes the device starting at base off the bus.
func (b *Bus) Remove(base uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	old := *b.table.Load()
	i := slices.IndexFunc(old, func(e Entry) bool { return e.Base == base })
	if i < 0 {
		return fmt.Errorf("%w: %#x", ErrNotFound, base)
	}
	t := slices.Delete(slices.Clone(old), i, i+1)
	b.table.Store(&t)
	return nil
}

// Entries returns the devices on the bus in address order.
func (b *Bus) Entries() []Entry { return slices.Clone(*b.table.Load()) }

// find returns the device whose range holds all of [addr, addr+n).
func (b *Bus) find(addr uint64, n int) (Entry, bool) {
	t := *b.table.Load()
	// Last entry with Base <= addr.
	i, found := slices.BinarySearchFunc(t, addr, func(e Entry, a uint64) int {
		switch {
		case e.Base < a:
			return -1
		case e.Base > a:
			return 1
		}
		return 0
	})
	if !found {
		i--
	}
	if i < 0 {
		return Entry{}, false
	}
	e := t[i]
	off := addr - e.Base
	if off >= e.Size || uint64(n) > e.Size-off {
		return Entry{}, false
	}
	return e, true
}

// Read routes a guest read of len(data) bytes at addr. It returns false,
// leaving data untouched, when no device claims the whole access.
func (b *Bus) Read(addr uint64, data []byte) bool {
	e, ok := b.find(addr, len(data))
	if ok {
		e.Device.Read(addr-e.Base, data)
	}
	return ok
}

// Write routes a guest write of data at addr. It returns false when no
// device claims the whole access.
func (b *Bus) Write(addr uint64, data []byte) bool {
	e, ok := b.find(addr, len(data))
	if ok {
		e.Device.Write(addr-e.Base, data)
	}
	return ok
}
