// Package testdriver is a virtio driver written in Go for the tests of the
// virtio packages: it plays the guest. It maps guest RAM the way the VM does
// (anonymous mmap), lays out split virtqueues in it, brings a device up
// through the virtio-mmio registers in the same order as Linux's virtio_mmio
// and virtio core (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues,
// DRIVER_OK), posts descriptor chains — well-formed or hostile — and waits for
// used buffers and interrupts with deadlines, so that a broken device fails a
// test instead of hanging it. It depends only on the root virtio package; the
// transport is reached through the two-method MMIO interface.
package testdriver

import (
	"encoding/binary"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
)

// Mem is guest RAM for a test, at GPA 0, with a bump allocator.
type Mem struct {
	*virtio.GuestMemory
	Raw  []byte
	next uint64
}

// NewMem maps size bytes of anonymous memory as guest RAM. The first page is
// left unallocated so that GPA 0 never names a valid test buffer.
func NewMem(t testing.TB, size int) *Mem {
	t.Helper()
	raw, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatalf("mmap guest memory: %v", err)
	}
	t.Cleanup(func() { _ = unix.Munmap(raw) })
	return &Mem{GuestMemory: virtio.NewFlatMemory(raw), Raw: raw, next: 4096}
}

// Alloc returns the GPA of n fresh zeroed bytes aligned to align (a power of
// two).
func (m *Mem) Alloc(t testing.TB, n, align uint64) uint64 {
	t.Helper()
	if align == 0 {
		align = 1
	}
	a := (m.next + align - 1) &^ (align - 1)
	if a+n > uint64(len(m.Raw)) {
		t.Fatalf("test guest memory exhausted: need %d bytes at %#x", n, a)
	}
	m.next = a + n
	clear(m.Raw[a : a+n])
	return a
}

// Bytes returns guest memory [gpa, gpa+n).
func (m *Mem) Bytes(gpa, n uint64) []byte { return m.Raw[gpa : gpa+n] }

// Put copies b into guest memory at gpa.
func (m *Mem) Put(gpa uint64, b []byte) { copy(m.Raw[gpa:], b) }

// Buf describes one descriptor the driver posts.
type Buf struct {
	Addr  uint64
	Len   uint32
	Write bool
}

// Used is one entry of a used ring.
type Used struct {
	ID  uint32
	Len uint32
}

// VQ is the driver side of one split virtqueue laid out in Mem.
type VQ struct {
	Mem                   *Mem
	Size                  uint16
	Desc, Avail, UsedRing uint64
	free                  []uint16
	chainLen              map[uint16][]uint16
	availIdx, lastUsed    uint16
	EventIdx              bool
	AvailFlags            uint16
	// Hold keeps Publish from storing the available index, so that several
	// chains become visible at once with Flush.
	Hold bool
}

// NewVQ lays out a queue of the given size in m.
func NewVQ(t testing.TB, m *Mem, size uint16) *VQ {
	t.Helper()
	s := uint64(size)
	vq := &VQ{
		Mem:      m,
		Size:     size,
		Desc:     m.Alloc(t, 16*s, 16),
		Avail:    m.Alloc(t, 6+2*s, 2),
		UsedRing: m.Alloc(t, 6+8*s, 4),
		chainLen: map[uint16][]uint16{},
	}
	for i := range size {
		vq.free = append(vq.free, i)
	}
	return vq
}

// SetDesc writes descriptor i directly, for hostile tests.
func (vq *VQ) SetDesc(i uint16, addr uint64, length uint32, flags, next uint16) {
	d := vq.Mem.Raw[vq.Desc+16*uint64(i):]
	binary.LittleEndian.PutUint64(d[0:], addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

// AddChain writes bufs as a chain of direct descriptors, publishes its head
// and returns it. It returns ok=false if the table has no room.
func (vq *VQ) AddChain(bufs ...Buf) (uint16, bool) {
	if len(bufs) == 0 || len(bufs) > len(vq.free) {
		return 0, false
	}
	ids := append([]uint16(nil), vq.free[:len(bufs)]...)
	vq.free = vq.free[len(bufs):]
	for i, b := range bufs {
		var flags, next uint16
		if b.Write {
			flags |= 2
		}
		if i+1 < len(bufs) {
			flags |= 1
			next = ids[i+1]
		}
		vq.SetDesc(ids[i], b.Addr, b.Len, flags, next)
	}
	vq.chainLen[ids[0]] = ids
	vq.Publish(ids[0])
	return ids[0], true
}

// AddIndirect writes bufs into a fresh indirect table and publishes one
// descriptor pointing at it.
func (vq *VQ) AddIndirect(t testing.TB, bufs ...Buf) uint16 {
	t.Helper()
	if len(vq.free) == 0 {
		t.Fatal("no free descriptor for indirect chain")
	}
	table := vq.Mem.Alloc(t, 16*uint64(len(bufs)), 16)
	for i, b := range bufs {
		d := vq.Mem.Raw[table+16*uint64(i):]
		var flags uint16
		if b.Write {
			flags |= 2
		}
		if i+1 < len(bufs) {
			flags |= 1
		}
		binary.LittleEndian.PutUint64(d[0:], b.Addr)
		binary.LittleEndian.PutUint32(d[8:], b.Len)
		binary.LittleEndian.PutUint16(d[12:], flags)
		binary.LittleEndian.PutUint16(d[14:], uint16(i+1))
	}
	id := vq.free[0]
	vq.free = vq.free[1:]
	vq.SetDesc(id, table, uint32(16*len(bufs)), 4, 0)
	vq.chainLen[id] = []uint16{id}
	vq.Publish(id)
	return id
}

// Publish puts head in the next available slot and bumps the available index
// (with a release store, as virtio_wmb does).
func (vq *VQ) Publish(head uint16) {
	slot := uint64(vq.availIdx % vq.Size)
	binary.LittleEndian.PutUint16(vq.Mem.Raw[vq.Avail+4+2*slot:], head)
	vq.availIdx++
	if !vq.Hold {
		vq.SetAvailIdx(vq.availIdx)
	}
}

// Flush publishes the chains added while Hold was set.
func (vq *VQ) Flush() { vq.SetAvailIdx(vq.availIdx) }

// SetAvailIdx stores the available index as is, for hostile tests.
func (vq *VQ) SetAvailIdx(v uint16) {
	binary.LittleEndian.PutUint16(vq.Mem.Raw[vq.Avail:], vq.AvailFlags)
	store16(vq.Mem.Raw, vq.Avail+2, v)
}

// SetUsedEvent writes the used_event field (event idx).
func (vq *VQ) SetUsedEvent(v uint16) {
	store16(vq.Mem.Raw, vq.Avail+4+2*uint64(vq.Size), v)
}

// AvailEvent reads the device's avail_event field.
func (vq *VQ) AvailEvent() uint16 {
	return binary.LittleEndian.Uint16(vq.Mem.Raw[vq.UsedRing+4+8*uint64(vq.Size):])
}

// UsedFlags reads the device's used ring flags.
func (vq *VQ) UsedFlags() uint16 {
	return binary.LittleEndian.Uint16(vq.Mem.Raw[vq.UsedRing:])
}

// UsedIdx reads the device's used index.
func (vq *VQ) UsedIdx() uint16 { return load16(vq.Mem.Raw, vq.UsedRing+2) }

// NextUsed returns the next used entry, if the device published one, and
// frees its descriptors.
func (vq *VQ) NextUsed() (Used, bool) {
	if vq.UsedIdx() == vq.lastUsed {
		return Used{}, false
	}
	e := vq.Mem.Raw[vq.UsedRing+4+8*uint64(vq.lastUsed%vq.Size):]
	u := Used{ID: binary.LittleEndian.Uint32(e), Len: binary.LittleEndian.Uint32(e[4:])}
	vq.lastUsed++
	if ids, ok := vq.chainLen[uint16(u.ID)]; ok && u.ID < uint32(vq.Size) {
		delete(vq.chainLen, uint16(u.ID))
		vq.free = append(vq.free, ids...)
	}
	return u, true
}

// ShouldKick reports whether the driver must notify after publishing, as
// virtqueue_kick_prepare decides (event idx or VIRTQ_USED_F_NO_NOTIFY).
func (vq *VQ) ShouldKick(old uint16) bool {
	if vq.EventIdx {
		ev := vq.AvailEvent()
		return vq.availIdx-ev-1 < vq.availIdx-old
	}
	return vq.UsedFlags()&1 == 0
}

// AvailIdx returns the driver's current available index.
func (vq *VQ) AvailIdx() uint16 { return vq.availIdx }

// load16 and store16 access the 16-bit field at raw[off] atomically through
// its aligned 32-bit word (raw is page-aligned guest memory).
func load16(raw []byte, off uint64) uint16 {
	w := (*uint32)(unsafe.Pointer(&raw[off&^3]))
	return uint16(atomic.LoadUint32(w) >> ((off & 3) * 8))
}

func store16(raw []byte, off uint64, v uint16) {
	w := (*uint32)(unsafe.Pointer(&raw[off&^3]))
	sh := (off & 3) * 8
	for {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, old&^(0xffff<<sh)|uint32(v)<<sh) {
			return
		}
	}
}

// IRQ records interrupts; it implements virtio.Interrupt.
type IRQ struct {
	n  atomic.Int64
	ch chan struct{}
}

// NewIRQ returns an interrupt recorder.
func NewIRQ() *IRQ { return &IRQ{ch: make(chan struct{}, 1)} }

// Trigger implements virtio.Interrupt.
func (i *IRQ) Trigger() error {
	i.n.Add(1)
	select {
	case i.ch <- struct{}{}:
	default:
	}
	return nil
}

// Count returns how many times the interrupt fired.
func (i *IRQ) Count() int64 { return i.n.Load() }

// Wait waits up to d for an interrupt since the last Wait.
func (i *IRQ) Wait(d time.Duration) bool {
	select {
	case <-i.ch:
		return true
	case <-time.After(d):
		return false
	}
}
