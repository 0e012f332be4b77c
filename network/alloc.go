package network

import (
	"errors"
	"fmt"
	"net/netip"
)

// errNotReserved is returned by assign for a slot that is not reserved.
var errNotReserved = errors.New("network: slot not reserved")

// slotBits is the size of one sandbox's subnet: a /30 holds the host end
// (.1), the sandbox end (.2), and the network and broadcast addresses.
const slotBits = 2

// allocator hands out /30 slots of a prefix, one per sandbox ID. It is pure
// bookkeeping, with no locking and no devices: Pool serialises calls to it.
//
// A slot may also be reserved for no one yet (a spare, whose devices are
// made before any sandbox asks for them): it is then in byIndex with the
// empty ID, and not in byID, until assign gives it to a sandbox or release
// frees it.
type allocator struct {
	base  uint32 // first address of the prefix
	slots int    // number of /30 slots in the prefix
	// byID and byIndex are the two directions of one map: sandbox ID to
	// slot index. byIndex also holds reserved slots, under "".
	byID    map[string]int
	byIndex map[int]string
	// next is where the search for a free slot starts: rotating through the
	// prefix rather than always taking the lowest free slot keeps a freed
	// address out of use for as long as possible, so that stale ARP entries
	// or connections never reach a newer sandbox.
	next int
}

func newAllocator(prefix netip.Prefix) (*allocator, error) {
	if !prefix.IsValid() || !prefix.Addr().Is4() {
		return nil, fmt.Errorf("%w: %v is not an IPv4 prefix", ErrBadPrefix, prefix)
	}
	if prefix.Bits() > 32-slotBits {
		return nil, fmt.Errorf("%w: %v is smaller than one /30", ErrBadPrefix, prefix)
	}
	if prefix != prefix.Masked() {
		return nil, fmt.Errorf("%w: %v has host bits set (did you mean %v?)", ErrBadPrefix, prefix, prefix.Masked())
	}
	return &allocator{
		base:    addrToUint(prefix.Addr()),
		slots:   1 << (32 - slotBits - prefix.Bits()),
		byID:    make(map[string]int),
		byIndex: make(map[int]string),
	}, nil
}

// alloc gives id a free slot.
func (a *allocator) alloc(id string) (int, error) {
	if idx, ok := a.byID[id]; ok {
		return 0, fmt.Errorf("%w: sandbox %s already holds slot %d", ErrInUse, id, idx)
	}
	return a.take(id)
}

// reserve takes a free slot for no sandbox yet.
func (a *allocator) reserve() (int, error) { return a.take("") }

// assign gives the reserved slot idx to id.
func (a *allocator) assign(idx int, id string) error {
	if old, ok := a.byID[id]; ok {
		return fmt.Errorf("%w: sandbox %s already holds slot %d", ErrInUse, id, old)
	}
	if owner, ok := a.byIndex[idx]; !ok || owner != "" {
		return fmt.Errorf("%w: slot %d (held by %q)", errNotReserved, idx, owner)
	}
	a.set(id, idx)
	return nil
}

// release frees the reserved slot idx; a slot given to a sandbox is left
// alone (free it by ID).
func (a *allocator) release(idx int) {
	if owner, ok := a.byIndex[idx]; ok && owner == "" {
		delete(a.byIndex, idx)
	}
}

// take finds a free slot and gives it to id ("" reserves it).
func (a *allocator) take(id string) (int, error) {
	if len(a.byIndex) >= a.slots {
		return 0, fmt.Errorf("%w: all %d /30 slots are in use", ErrExhausted, a.slots)
	}
	for i := 0; i < a.slots; i++ {
		idx := (a.next + i) % a.slots
		if _, used := a.byIndex[idx]; !used {
			a.set(id, idx)
			a.next = (idx + 1) % a.slots
			return idx, nil
		}
	}
	panic("network: allocator count and map disagree") // unreachable: len check above
}

// restore records that id already holds slot idx, as found on the host after
// a restart.
func (a *allocator) restore(id string, idx int) error {
	if idx < 0 || idx >= a.slots {
		return fmt.Errorf("%w: slot %d of sandbox %s is outside the prefix's %d slots", ErrBadPrefix, idx, id, a.slots)
	}
	if other, used := a.byIndex[idx]; used {
		return fmt.Errorf("%w: slot %d claimed by both %s and %s", ErrInUse, idx, other, id)
	}
	if old, ok := a.byID[id]; ok {
		return fmt.Errorf("%w: sandbox %s claims slots %d and %d", ErrInUse, id, old, idx)
	}
	a.set(id, idx)
	if idx >= a.next {
		a.next = (idx + 1) % a.slots
	}
	return nil
}

// set records that id holds idx; the empty id records a reservation.
func (a *allocator) set(id string, idx int) {
	if id != "" {
		a.byID[id] = idx
	}
	a.byIndex[idx] = id
}

// free releases id's slot and reports which it was.
func (a *allocator) free(id string) (int, bool) {
	idx, ok := a.byID[id]
	if !ok {
		return 0, false
	}
	delete(a.byID, id)
	delete(a.byIndex, idx)
	return idx, true
}

// lookup reports id's slot.
func (a *allocator) lookup(id string) (int, bool) {
	idx, ok := a.byID[id]
	return idx, ok
}

// subnet is the /30 of slot idx.
func (a *allocator) subnet(idx int) netip.Prefix {
	return netip.PrefixFrom(uintToAddr(a.base+uint32(idx)<<slotBits), 32-slotBits)
}

func addrToUint(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func uintToAddr(u uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(u >> 24), byte(u >> 16), byte(u >> 8), byte(u)})
}
