// Package queue implements the device side of a virtio split virtqueue (virtio
// 1.2 §2.7): it pops descriptor chains that the driver made available, resolves
// them — direct and indirect descriptors — into bounds-checked slices of guest
// memory, and pushes finished chains onto the used ring, with optional
// event-index notification suppression. Everything it reads from guest memory
// is untrusted: every ring, table and buffer address is checked against guest
// RAM, chains are limited to the queue size so that loops end, and a malformed
// chain is handed back to the driver with a used length of zero and reported as
// a *ChainError, never as a panic. A driver that corrupts the ring itself
// breaks the queue (ErrBroken) until the transport resets the device.
//
// A Queue is owned by one goroutine, the device's worker: none of its methods
// may be called concurrently. The guest's vCPUs write the same rings at the
// same time; ring indices are therefore read and written with atomic
// operations, which order them against the plain accesses to ring entries and
// descriptors (virtio 1.2 §2.7.13, "the device MUST ... read the idx field
// before the ring entries"). The byte layout assumes a little-endian host.
package queue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
)

// Ring layout constants (virtio 1.2 §2.7).
const (
	// MaxSize is the largest queue size a split virtqueue may have (§2.7).
	MaxSize = 32768
	// DescSize is the size of one struct virtq_desc (§2.7.5).
	DescSize = 16
	// usedElemSize is the size of one struct virtq_used_elem (§2.7.8).
	usedElemSize = 8
	// Ring alignment requirements (§2.7, table "Virtqueue Part Alignment").
	descAlign  = 16
	availAlign = 2
	usedAlign  = 4
)

// Descriptor flags (§2.7.5, VIRTQ_DESC_F_*).
const (
	DescFNext     = 1 // VIRTQ_DESC_F_NEXT: the chain continues at Next
	DescFWrite    = 2 // VIRTQ_DESC_F_WRITE: device-writable buffer
	DescFIndirect = 4 // VIRTQ_DESC_F_INDIRECT: buffer is a descriptor table
)

// Ring flags.
const (
	// AvailFNoInterrupt is VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.6): without event
	// idx, the driver asks not to be interrupted.
	AvailFNoInterrupt = 1
	// UsedFNoNotify is VIRTQ_USED_F_NO_NOTIFY (§2.7.8): without event idx, the
	// device asks not to be notified.
	UsedFNoNotify = 1
)

// Errors that break the whole queue (configuration or ring corruption). They
// wrap ErrBroken.
var (
	ErrBroken          = errors.New("queue: broken")
	ErrInvalidSize     = errors.New("queue: size is not a power of two in 1..32768")
	ErrMisaligned      = errors.New("queue: ring address misaligned")
	ErrRingOutOfBounds = errors.New("queue: ring outside guest memory")
	ErrAvailIndex      = errors.New("queue: available index moved more than queue size ahead")
)

// Errors that reject one descriptor chain. Pop reports them inside a
// *ChainError.
var (
	ErrHeadOutOfRange        = errors.New("queue: descriptor index out of range")
	ErrDescOutOfBounds       = errors.New("queue: descriptor buffer outside guest memory")
	ErrChainTooLong          = errors.New("queue: descriptor chain longer than queue size (loop?)")
	ErrIndirectNotNegotiated = errors.New("queue: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
	ErrBadIndirect           = errors.New("queue: indirect table length is zero, not a multiple of 16 or larger than the queue")
	ErrNestedIndirect        = errors.New("queue: indirect descriptor inside an indirect table")
	ErrIndirectWithNext      = errors.New("queue: descriptor has both INDIRECT and NEXT")
	ErrWriteBeforeRead       = errors.New("queue: device-readable descriptor after a device-writable one")
)

// ChainError is returned by Pop for a malformed chain. The chain's head has
// already been returned to the driver with a used length of zero (if Head is
// a valid index), so the device only has to count it and go on.
type ChainError struct {
	Head uint16
	Err  error
}

func (e *ChainError) Error() string { return fmt.Sprintf("queue: chain at head %d: %v", e.Head, e.Err) }
func (e *ChainError) Unwrap() error { return e.Err }

// Config is what the driver programs through the transport for one queue.
type Config struct {
	Size       uint16 `json:"size"`
	DescAddr   uint64 `json:"desc_addr"`
	DriverAddr uint64 `json:"driver_addr"` // available ring
	DeviceAddr uint64 `json:"device_addr"` // used ring
}

// State is a queue's snapshot: its configuration and the device's position in
// the rings. Everything else lives in guest memory.
type State struct {
	Config
	NextAvail uint16 `json:"next_avail"`
	NextUsed  uint16 `json:"next_used"`
}

// Desc is one resolved descriptor: Buf is the guest memory it names.
type Desc struct {
	Addr  uint64
	Len   uint32
	Write bool
	Buf   []byte
}

// Chain is one resolved descriptor chain. Readable descriptors come first,
// then writable ones (§2.7.4.2). A Chain is reused across Pop calls to avoid
// allocation; its slices are valid until the next Pop into it.
type Chain struct {
	Head  uint16
	Descs []Desc
	nRead int
}

// Queue is the device side of one split virtqueue. See the package comment
// for ownership rules.
type Queue struct {
	mem      virtio.Memory
	cfg      Config
	mask     uint16
	desc     []byte
	avail    []byte
	used     []byte
	eventIdx bool
	indirect bool

	availFlags, availIdx, usedEvent field16
	usedFlags, usedIdx, availEvent  field16

	nextAvail uint16
	nextUsed  uint16
	signalled uint16 // used index at the last NeedsInterrupt decision
	broken    error
	fenceWord uint32
}

// New validates cfg against guest memory and returns a queue positioned at the
// start of the rings. features are the negotiated device features; they decide
// whether indirect descriptors and event indices are in use.
func New(mem virtio.Memory, cfg Config, features uint64) (*Queue, error) {
	s := uint64(cfg.Size)
	if s == 0 || s > MaxSize || s&(s-1) != 0 {
		return nil, fmt.Errorf("%w: %w: %d", ErrBroken, ErrInvalidSize, cfg.Size)
	}
	if cfg.DescAddr%descAlign != 0 || cfg.DriverAddr%availAlign != 0 || cfg.DeviceAddr%usedAlign != 0 {
		return nil, fmt.Errorf("%w: %w: desc %#x avail %#x used %#x", ErrBroken, ErrMisaligned,
			cfg.DescAddr, cfg.DriverAddr, cfg.DeviceAddr)
	}
	q := &Queue{
		mem:      mem,
		cfg:      cfg,
		mask:     cfg.Size - 1,
		eventIdx: virtio.HasFeature(features, virtio.FeatureRingEventIdx),
		indirect: virtio.HasFeature(features, virtio.FeatureRingIndirectDesc),
	}
	var err error
	if q.desc, err = mem.Slice(cfg.DescAddr, DescSize*s); err != nil {
		return nil, fmt.Errorf("%w: %w: descriptor table: %w", ErrBroken, ErrRingOutOfBounds, err)
	}
	if q.avail, err = mem.Slice(cfg.DriverAddr, 6+2*s); err != nil {
		return nil, fmt.Errorf("%w: %w: available ring: %w", ErrBroken, ErrRingOutOfBounds, err)
	}
	if q.used, err = mem.Slice(cfg.DeviceAddr, 6+usedElemSize*s); err != nil {
		return nil, fmt.Errorf("%w: %w: used ring: %w", ErrBroken, ErrRingOutOfBounds, err)
	}
	q.availFlags = newField16(mem, cfg.DriverAddr, q.avail[0:2])
	q.availIdx = newField16(mem, cfg.DriverAddr+2, q.avail[2:4])
	q.usedEvent = newField16(mem, cfg.DriverAddr+4+2*s, q.avail[4+2*s:])
	q.usedFlags = newField16(mem, cfg.DeviceAddr, q.used[0:2])
	q.usedIdx = newField16(mem, cfg.DeviceAddr+2, q.used[2:4])
	q.availEvent = newField16(mem, cfg.DeviceAddr+4+usedElemSize*s, q.used[4+usedElemSize*s:])
	return q, nil
}

// Restore returns a queue rebuilt from a snapshot, positioned where it was.
func Restore(mem virtio.Memory, st State, features uint64) (*Queue, error) {
	q, err := New(mem, st.Config, features)
	if err != nil {
		return nil, err
	}
	q.nextAvail, q.nextUsed, q.signalled = st.NextAvail, st.NextUsed, st.NextUsed
	return q, nil
}

// State returns the queue's snapshot. Call it only while the owning worker is
// stopped, after it published everything it added.
func (q *Queue) State() State {
	return State{Config: q.cfg, NextAvail: q.nextAvail, NextUsed: q.nextUsed}
}

// Size returns the queue size.
func (q *Queue) Size() uint16 { return q.cfg.Size }

// EventIdx reports whether VIRTIO_F_EVENT_IDX is in use.
func (q *Queue) EventIdx() bool { return q.eventIdx }

// Broken returns the error that broke the queue, or nil.
func (q *Queue) Broken() error { return q.broken }

// Pending returns how many chains the driver has made available that the
// device has not popped yet (0 when the queue is broken).
func (q *Queue) Pending() int {
	if q.broken != nil {
		return 0
	}
	n := q.availIdx.load() - q.nextAvail
	if n > q.cfg.Size {
		return 0
	}
	return int(n)
}

// Pop takes the next available chain into c. It returns (false, nil) when the
// ring is empty, (false, *ChainError) for a malformed chain (already returned
// to the driver; call Pop again), and (false, err wrapping ErrBroken) when the
// ring is corrupt and the device should ask for a reset.
func (q *Queue) Pop(c *Chain) (bool, error) {
	if q.broken != nil {
		return false, q.broken
	}
	idx := q.availIdx.load()
	n := idx - q.nextAvail
	if n == 0 {
		return false, nil
	}
	if n > q.cfg.Size {
		q.broken = fmt.Errorf("%w: %w: idx %d, next %d, size %d", ErrBroken, ErrAvailIndex, idx, q.nextAvail, q.cfg.Size)
		return false, q.broken
	}
	slot := uint64(q.nextAvail & q.mask)
	head := binary.LittleEndian.Uint16(q.avail[4+2*slot:])
	q.nextAvail++
	c.Head = head
	c.Descs = c.Descs[:0]
	c.nRead = 0
	if err := q.walk(c, head); err != nil {
		c.Descs = c.Descs[:0]
		c.nRead = 0
		if head < q.cfg.Size {
			_ = q.Push(head, 0) // cannot fail: head is in range
		}
		return false, &ChainError{Head: head, Err: err}
	}
	return true, nil
}

// UndoPop gives the last n popped chains back to the available ring, as if
// they had not been popped. The device must not have pushed them.
func (q *Queue) UndoPop(n uint16) { q.nextAvail -= n }

func (q *Queue) walk(c *Chain, head uint16) error {
	if head >= q.cfg.Size {
		return fmt.Errorf("%w: head %d, size %d", ErrHeadOutOfRange, head, q.cfg.Size)
	}
	table, tableLen := q.desc, uint32(q.cfg.Size)
	limit := int(q.cfg.Size)
	inIndirect, seenWrite := false, false
	idx := uint32(head)
	for count := 0; ; {
		d := table[DescSize*idx : DescSize*idx+DescSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])

		if flags&DescFIndirect != 0 {
			switch {
			case !q.indirect:
				return ErrIndirectNotNegotiated
			case inIndirect:
				return ErrNestedIndirect
			case flags&DescFNext != 0:
				return ErrIndirectWithNext
			case length == 0 || length%DescSize != 0 || length/DescSize > uint32(q.cfg.Size):
				return fmt.Errorf("%w: length %d", ErrBadIndirect, length)
			}
			t, err := q.mem.Slice(addr, uint64(length))
			if err != nil {
				return fmt.Errorf("%w: indirect table: %w", ErrDescOutOfBounds, err)
			}
			table, tableLen, idx, inIndirect = t, length/DescSize, 0, true
			continue
		}
		if count++; count > limit {
			return fmt.Errorf("%w: more than %d descriptors", ErrChainTooLong, limit)
		}
		buf, err := q.mem.Slice(addr, uint64(length))
		if err != nil {
			return fmt.Errorf("%w: descriptor %d: %w", ErrDescOutOfBounds, idx, err)
		}
		w := flags&DescFWrite != 0
		if w {
			seenWrite = true
		} else {
			if seenWrite {
				return ErrWriteBeforeRead
			}
			c.nRead++
		}
		c.Descs = append(c.Descs, Desc{Addr: addr, Len: length, Write: w, Buf: buf})
		if flags&DescFNext == 0 {
			return nil
		}
		if uint32(next) >= tableLen {
			return fmt.Errorf("%w: next %d, table of %d", ErrHeadOutOfRange, next, tableLen)
		}
		idx = uint32(next)
	}
}

// Push returns chain head to the driver with n bytes written into its
// writable buffers, and publishes the used index.
func (q *Queue) Push(head uint16, n uint32) error {
	if err := q.Add(head, n); err != nil {
		return err
	}
	q.Publish()
	return nil
}

// Add writes a used entry for head without publishing it: the driver sees
// entries added since the last Publish all at once. A device returning one
// packet in several chains (mergeable rx buffers) needs this, since the
// driver may read the first chain's header as soon as it is visible.
func (q *Queue) Add(head uint16, n uint32) error {
	if head >= q.cfg.Size {
		return fmt.Errorf("%w: push of head %d, size %d", ErrHeadOutOfRange, head, q.cfg.Size)
	}
	e := q.used[4+usedElemSize*uint64(q.nextUsed&q.mask):]
	binary.LittleEndian.PutUint32(e[0:], uint32(head))
	binary.LittleEndian.PutUint32(e[4:], n)
	q.nextUsed++
	return nil
}

// Publish makes the added used entries visible to the driver.
func (q *Queue) Publish() {
	q.store(q.usedIdx, q.nextUsed) // release: the entries are visible before the index
}

// NeedsInterrupt reports whether the driver wants an interrupt for the chains
// pushed since the last call (§2.7.7.2 without event idx, §2.7.10 with it).
// Call it once per batch, after the pushes; it is false when nothing was
// pushed.
func (q *Queue) NeedsInterrupt() bool {
	newUsed, old := q.nextUsed, q.signalled
	if newUsed == old {
		return false
	}
	q.signalled = newUsed
	if q.eventIdx {
		// vring_need_event(used_event, new, old) from the spec.
		ev := q.usedEvent.load()
		return newUsed-ev-1 < newUsed-old
	}
	return q.availFlags.load()&AvailFNoInterrupt == 0
}

// DisableNotify asks the driver not to notify the device while it is busy
// draining the queue. With event idx this is implicit (the avail event is not
// advanced), so it only matters without it.
func (q *Queue) DisableNotify() {
	if !q.eventIdx {
		q.store(q.usedFlags, UsedFNoNotify)
	}
}

// EnableNotify asks the driver to notify the device about the next available
// chain, and reports whether chains arrived meanwhile — in which case the
// device must keep popping, since that notification may never come
// (§2.7.10). Call it when Pop returned empty.
func (q *Queue) EnableNotify() bool {
	if q.broken != nil {
		return false
	}
	if q.eventIdx {
		q.store(q.availEvent, q.nextAvail)
	} else {
		q.store(q.usedFlags, 0)
	}
	// store is a full barrier: the driver sees the event before we re-read.
	return q.availIdx.load() != q.nextAvail
}

// AvailIdx returns the driver's available index: how many chains it has
// made available, modulo 2^16.
func (q *Queue) AvailIdx() uint16 { return q.availIdx.load() }

// NotifyOnNext asks the driver to notify the device as soon as it makes one
// more chain available than idx, even while chains made available before
// wait unpopped (EnableNotify only asks for a notification once the ring is
// empty). It reports whether the available index has already moved past
// idx, in which case that notification may never come. Without event idx it
// enables notifications, which then come for every chain.
func (q *Queue) NotifyOnNext(idx uint16) bool {
	if q.broken != nil {
		return false
	}
	if q.eventIdx {
		q.store(q.availEvent, idx)
	} else {
		q.store(q.usedFlags, 0)
	}
	// store is a full barrier: the driver sees the event before we re-read.
	return q.availIdx.load() != idx
}

func (q *Queue) store(f field16, v uint16) {
	if !f.store(v) {
		atomic.AddUint32(&q.fenceWord, 1) // full barrier for the plain fallback store
	}
}

// field16 is a little-endian 16-bit field of a ring, accessed atomically
// through the aligned 32-bit word that contains it when there is one.
type field16 struct {
	word  *uint32
	shift uint
	b     []byte
}

func newField16(mem virtio.Memory, gpa uint64, b []byte) field16 {
	f := field16{b: b[:2:2]}
	if w, err := mem.Slice(gpa&^3, 4); err == nil && uintptr(unsafe.Pointer(&w[0]))%4 == 0 {
		f.word = (*uint32)(unsafe.Pointer(&w[0]))
		f.shift = uint(gpa&3) * 8
	}
	return f
}

func (f field16) load() uint16 {
	if f.word != nil {
		return uint16(atomic.LoadUint32(f.word) >> f.shift)
	}
	return binary.LittleEndian.Uint16(f.b)
}

// store writes v and reports whether it did so atomically (and therefore as a
// full barrier). The compare-and-swap loop keeps the other half of the word,
// which may belong to the driver; it is bounded so that a guest hammering that
// half cannot hold the device, and falls back to a plain store.
func (f field16) store(v uint16) bool {
	if f.word != nil {
		mask := uint32(0xffff) << f.shift
		for range 64 {
			old := atomic.LoadUint32(f.word)
			if atomic.CompareAndSwapUint32(f.word, old, old&^mask|uint32(v)<<f.shift) {
				return true
			}
		}
	}
	binary.LittleEndian.PutUint16(f.b, v)
	return false
}
