package queue_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/internal/testdriver"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

const allFeatures = virtio.CommonFeatures

func newPair(t testing.TB, size uint16, features uint64) (*testdriver.Mem, *testdriver.VQ, *queue.Queue) {
	t.Helper()
	mem := testdriver.NewMem(t, 1<<20)
	vq := testdriver.NewVQ(t, mem, size)
	vq.EventIdx = virtio.HasFeature(features, virtio.FeatureRingEventIdx)
	q, err := queue.New(mem, queue.Config{Size: size, DescAddr: vq.Desc, DriverAddr: vq.Avail, DeviceAddr: vq.UsedRing}, features)
	if err != nil {
		t.Fatalf("queue.New: %v", err)
	}
	return mem, vq, q
}

func TestPopPushChain(t *testing.T) {
	for _, indirect := range []bool{false, true} {
		mem, vq, q := newPair(t, 8, allFeatures)
		hdr := mem.Alloc(t, 3, 1)
		data := mem.Alloc(t, 5, 1)
		out := mem.Alloc(t, 16, 1)
		mem.Put(hdr, []byte("abc"))
		mem.Put(data, []byte("defgh"))
		bufs := []testdriver.Buf{{Addr: hdr, Len: 3}, {Addr: data, Len: 5}, {Addr: out, Len: 16, Write: true}}
		var head uint16
		if indirect {
			head = vq.AddIndirect(t, bufs...)
		} else {
			head, _ = vq.AddChain(bufs...)
		}
		if q.Pending() != 1 {
			t.Fatalf("Pending = %d, want 1", q.Pending())
		}
		var c queue.Chain
		ok, err := q.Pop(&c)
		if !ok || err != nil {
			t.Fatalf("Pop = %v, %v", ok, err)
		}
		if c.Head != head || len(c.Readable()) != 2 || len(c.Writable()) != 1 {
			t.Fatalf("chain head %d (want %d), %d readable, %d writable", c.Head, head, len(c.Readable()), len(c.Writable()))
		}
		if c.ReadableLen() != 8 || c.WritableLen() != 16 {
			t.Fatalf("lengths %d/%d", c.ReadableLen(), c.WritableLen())
		}
		got := make([]byte, 10)
		if n := c.ReadAt(got, 1); n != 7 || string(got[:n]) != "bcdefgh" {
			t.Fatalf("ReadAt = %d %q", n, got[:n])
		}
		iov := c.ReadableIovecs(nil, 2, 4)
		if len(iov) != 2 || string(iov[0]) != "c" || string(iov[1]) != "def" {
			t.Fatalf("ReadableIovecs = %q", iov)
		}
		if n := c.WriteAt([]byte("0123456789abcdefXYZ"), 0); n != 16 {
			t.Fatalf("WriteAt = %d", n)
		}
		if err := q.Push(c.Head, 16); err != nil {
			t.Fatal(err)
		}
		u, ok := vq.NextUsed()
		if !ok || u.ID != uint32(head) || u.Len != 16 {
			t.Fatalf("used = %+v %v", u, ok)
		}
		if !bytes.Equal(mem.Bytes(out, 16), []byte("0123456789abcdef")) {
			t.Fatalf("guest buffer = %q", mem.Bytes(out, 16))
		}
		if ok, err := q.Pop(&c); ok || err != nil {
			t.Fatalf("empty Pop = %v, %v", ok, err)
		}
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	mem := testdriver.NewMem(t, 1<<16)
	top := uint64(len(mem.Raw))
	for _, tc := range []struct {
		name string
		cfg  queue.Config
		want error
	}{
		{"zero size", queue.Config{Size: 0, DescAddr: 0x1000, DriverAddr: 0x2000, DeviceAddr: 0x3000}, queue.ErrInvalidSize},
		{"not power of two", queue.Config{Size: 3, DescAddr: 0x1000, DriverAddr: 0x2000, DeviceAddr: 0x3000}, queue.ErrInvalidSize},
		{"too big", queue.Config{Size: 0xffff, DescAddr: 0x1000, DriverAddr: 0x2000, DeviceAddr: 0x3000}, queue.ErrInvalidSize},
		{"desc misaligned", queue.Config{Size: 4, DescAddr: 0x1008, DriverAddr: 0x2000, DeviceAddr: 0x3000}, queue.ErrMisaligned},
		{"avail misaligned", queue.Config{Size: 4, DescAddr: 0x1000, DriverAddr: 0x2001, DeviceAddr: 0x3000}, queue.ErrMisaligned},
		{"used misaligned", queue.Config{Size: 4, DescAddr: 0x1000, DriverAddr: 0x2000, DeviceAddr: 0x3002}, queue.ErrMisaligned},
		{"desc outside", queue.Config{Size: 4, DescAddr: top - 32, DriverAddr: 0x2000, DeviceAddr: 0x3000}, queue.ErrRingOutOfBounds},
		{"avail outside", queue.Config{Size: 4, DescAddr: 0x1000, DriverAddr: 1 << 40, DeviceAddr: 0x3000}, queue.ErrRingOutOfBounds},
		{"used wraps", queue.Config{Size: 4, DescAddr: 0x1000, DriverAddr: 0x2000, DeviceAddr: ^uint64(3)}, queue.ErrRingOutOfBounds},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := queue.New(mem, tc.cfg, allFeatures)
			if !errors.Is(err, tc.want) || !errors.Is(err, queue.ErrBroken) {
				t.Fatalf("New = %v, want %v", err, tc.want)
			}
		})
	}
}

// TestHostileChains posts malformed chains; each must be rejected with its
// own error and handed back with length 0, and a good chain after it must
// still work.
func TestHostileChains(t *testing.T) {
	type setup func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16
	for _, tc := range []struct {
		name     string
		features uint64
		setup    setup
		want     error
		noReturn bool // head itself invalid: nothing to give back
	}{
		{"buffer outside memory", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, 1<<40, 16, 0, 0)
			return 0
		}, queue.ErrDescOutOfBounds, false},
		{"huge length", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, 0x1000, 0xffffffff, queue.DescFWrite, 0)
			return 0
		}, queue.ErrDescOutOfBounds, false},
		{"address wraps", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, ^uint64(7), 16, 0, 0)
			return 0
		}, queue.ErrDescOutOfBounds, false},
		{"head out of range", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			return 200
		}, queue.ErrHeadOutOfRange, true},
		{"next out of range", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, 0x1000, 8, queue.DescFNext, 9)
			return 0
		}, queue.ErrHeadOutOfRange, false},
		{"self loop", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(3, 0x1000, 8, queue.DescFNext, 3)
			return 3
		}, queue.ErrChainTooLong, false},
		{"two-descriptor loop", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(1, 0x1000, 8, queue.DescFNext, 2)
			vq.SetDesc(2, 0x1000, 8, queue.DescFNext, 1)
			return 1
		}, queue.ErrChainTooLong, false},
		{"readable after writable", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, 0x1000, 8, queue.DescFNext|queue.DescFWrite, 1)
			vq.SetDesc(1, 0x1000, 8, 0, 0)
			return 0
		}, queue.ErrWriteBeforeRead, false},
		{"indirect not negotiated", virtio.CommonFeatures &^ (1 << virtio.FeatureRingIndirectDesc), func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, mem.Alloc(t, 32, 16), 32, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrIndirectNotNegotiated, false},
		{"indirect zero length", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, 0x1000, 0, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrBadIndirect, false},
		{"indirect odd length", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, 0x1000, 24, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrBadIndirect, false},
		{"indirect table larger than queue", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, 0x1000, 16*9, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrBadIndirect, false},
		{"indirect table outside memory", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, uint64(len(mem.Raw))-16, 32, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrDescOutOfBounds, false},
		{"indirect with next", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			vq.SetDesc(0, mem.Alloc(t, 32, 16), 32, queue.DescFIndirect|queue.DescFNext, 1)
			return 0
		}, queue.ErrIndirectWithNext, false},
		{"nested indirect", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			tbl := mem.Alloc(t, 16, 16)
			mem.Put(tbl, le(tbl, 16, queue.DescFIndirect, 0))
			vq.SetDesc(0, tbl, 16, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrNestedIndirect, false},
		{"loop inside indirect table", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			tbl := mem.Alloc(t, 32, 16)
			mem.Put(tbl, le(0x1000, 8, queue.DescFNext, 1))
			mem.Put(tbl+16, le(0x1000, 8, queue.DescFNext, 0))
			vq.SetDesc(0, tbl, 32, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrChainTooLong, false},
		{"direct prefix plus indirect table longer than queue", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			tbl := mem.Alloc(t, 16*8, 16)
			for i := range uint16(8) {
				flags, next := uint16(queue.DescFNext), i+1
				if i == 7 {
					flags, next = 0, 0
				}
				mem.Put(tbl+16*uint64(i), le(0x1000, 8, flags, next))
			}
			for i := range uint16(3) {
				vq.SetDesc(i, 0x1000, 8, queue.DescFNext, i+1)
			}
			vq.SetDesc(3, tbl, 16*8, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrChainTooLong, false},
		{"indirect next out of table", allFeatures, func(t *testing.T, mem *testdriver.Mem, vq *testdriver.VQ) uint16 {
			tbl := mem.Alloc(t, 16, 16)
			mem.Put(tbl, le(0x1000, 8, queue.DescFNext, 5))
			vq.SetDesc(0, tbl, 16, queue.DescFIndirect, 0)
			return 0
		}, queue.ErrHeadOutOfRange, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem, vq, q := newPair(t, 8, tc.features)
			head := tc.setup(t, mem, vq)
			vq.Publish(head)
			var c queue.Chain
			ok, err := q.Pop(&c)
			var ce *queue.ChainError
			if ok || !errors.As(err, &ce) || !errors.Is(err, tc.want) || ce.Head != head {
				t.Fatalf("Pop = %v, %v; want ChainError(%d) wrapping %v", ok, err, head, tc.want)
			}
			u, returned := vq.NextUsed()
			if tc.noReturn == returned {
				t.Fatalf("chain returned = %v (%+v), want %v", returned, u, !tc.noReturn)
			}
			if returned && (u.ID != uint32(head) || u.Len != 0) {
				t.Fatalf("used = %+v, want head %d len 0", u, head)
			}
			// The queue still works.
			buf := mem.Alloc(t, 8, 8)
			h, _ := vq.AddChain(testdriver.Buf{Addr: buf, Len: 8, Write: true})
			if ok, err := q.Pop(&c); !ok || err != nil || c.Head != h {
				t.Fatalf("good Pop after bad = %v, %v, head %d", ok, err, c.Head)
			}
		})
	}
}

func le(addr uint64, length uint32, flags, next uint16) []byte {
	b := make([]byte, 16)
	for i := range 8 {
		b[i] = byte(addr >> (8 * i))
	}
	for i := range 4 {
		b[8+i] = byte(length >> (8 * i))
	}
	b[12], b[13], b[14], b[15] = byte(flags), byte(flags>>8), byte(next), byte(next>>8)
	return b
}

func TestZeroLengthDescriptor(t *testing.T) {
	mem, vq, q := newPair(t, 4, allFeatures)
	buf := mem.Alloc(t, 8, 8)
	vq.AddChain(testdriver.Buf{Addr: buf, Len: 0}, testdriver.Buf{Addr: buf, Len: 0, Write: true})
	var c queue.Chain
	if ok, err := q.Pop(&c); !ok || err != nil {
		t.Fatalf("Pop = %v, %v", ok, err)
	}
	if c.ReadableLen() != 0 || c.WritableLen() != 0 || c.WriteAt([]byte("x"), 0) != 0 || len(c.WritableIovecs(nil, 0, 10)) != 0 {
		t.Fatal("zero-length chain has bytes")
	}
}

func TestAvailIndexCorruptionBreaksQueue(t *testing.T) {
	_, vq, q := newPair(t, 4, allFeatures)
	vq.SetAvailIdx(100)
	var c queue.Chain
	if _, err := q.Pop(&c); !errors.Is(err, queue.ErrAvailIndex) || !errors.Is(err, queue.ErrBroken) {
		t.Fatalf("Pop = %v, want ErrAvailIndex", err)
	}
	vq.SetAvailIdx(1)
	if _, err := q.Pop(&c); !errors.Is(err, queue.ErrBroken) || q.Broken() == nil || q.Pending() != 0 || q.EnableNotify() {
		t.Fatalf("broken queue came back: %v", err)
	}
}

func TestIndexWraparound(t *testing.T) {
	mem, vq, q := newPair(t, 4, allFeatures)
	buf := mem.Alloc(t, 4, 4)
	var c queue.Chain
	for i := range 70000 {
		vq.AddChain(testdriver.Buf{Addr: buf, Len: 4, Write: true})
		ok, err := q.Pop(&c)
		if !ok || err != nil {
			t.Fatalf("iteration %d: Pop = %v, %v", i, ok, err)
		}
		if err := q.Push(c.Head, uint32(i)); err != nil {
			t.Fatal(err)
		}
		u, ok := vq.NextUsed()
		if !ok || u.Len != uint32(i) || u.ID != uint32(c.Head) {
			t.Fatalf("iteration %d: used %+v %v", i, u, ok)
		}
	}
	if st := q.State(); st.NextAvail != 70000%65536 || st.NextUsed != 70000%65536 {
		t.Fatalf("state %+v", st)
	}
}

func TestNotificationSuppression(t *testing.T) {
	t.Run("event idx", func(t *testing.T) {
		mem, vq, q := newPair(t, 8, allFeatures)
		buf := mem.Alloc(t, 4, 4)
		var c queue.Chain
		for range 3 {
			vq.AddChain(testdriver.Buf{Addr: buf, Len: 4, Write: true})
		}
		if q.EnableNotify() != true {
			t.Fatal("EnableNotify missed pending chains")
		}
		if vq.AvailEvent() != 0 {
			t.Fatalf("avail_event = %d", vq.AvailEvent())
		}
		for range 3 {
			q.Pop(&c)
			q.Push(c.Head, 0)
		}
		if q.EnableNotify() {
			t.Fatal("EnableNotify reported work on an empty queue")
		}
		if vq.AvailEvent() != 3 {
			t.Fatalf("avail_event = %d, want 3", vq.AvailEvent())
		}
		// Driver asked for an interrupt only after used index 5.
		vq.SetUsedEvent(5)
		if q.NeedsInterrupt() {
			t.Fatal("interrupt before used_event reached")
		}
		for range 3 {
			vq.AddChain(testdriver.Buf{Addr: buf, Len: 4, Write: true})
			q.Pop(&c)
			q.Push(c.Head, 0)
		}
		if !q.NeedsInterrupt() {
			t.Fatal("no interrupt after used index passed used_event")
		}
		if q.NeedsInterrupt() {
			t.Fatal("interrupt with nothing new pushed")
		}
	})
	t.Run("flags", func(t *testing.T) {
		mem, vq, q := newPair(t, 8, virtio.CommonFeatures&^(1<<virtio.FeatureRingEventIdx))
		buf := mem.Alloc(t, 4, 4)
		q.DisableNotify()
		if vq.UsedFlags() != queue.UsedFNoNotify {
			t.Fatalf("used flags = %d", vq.UsedFlags())
		}
		q.EnableNotify()
		if vq.UsedFlags() != 0 {
			t.Fatalf("used flags = %d", vq.UsedFlags())
		}
		var c queue.Chain
		vq.AvailFlags = queue.AvailFNoInterrupt
		vq.AddChain(testdriver.Buf{Addr: buf, Len: 4, Write: true})
		q.Pop(&c)
		q.Push(c.Head, 0)
		if q.NeedsInterrupt() {
			t.Fatal("interrupt despite VIRTQ_AVAIL_F_NO_INTERRUPT")
		}
		vq.AvailFlags = 0
		vq.AddChain(testdriver.Buf{Addr: buf, Len: 4, Write: true})
		q.Pop(&c)
		q.Push(c.Head, 0)
		if !q.NeedsInterrupt() {
			t.Fatal("no interrupt")
		}
	})
}

// TestNotifyOnNext: the device asks to hear of the next chain even while
// earlier ones wait unpopped, and learns when the driver was faster.
func TestNotifyOnNext(t *testing.T) {
	mem, vq, q := newPair(t, 8, allFeatures)
	buf := mem.Alloc(t, 4, 4)
	for range 3 {
		vq.AddChain(testdriver.Buf{Addr: buf, Len: 4, Write: true})
	}
	idx := q.AvailIdx()
	if idx != 3 {
		t.Fatalf("AvailIdx = %d, want 3", idx)
	}
	if q.NotifyOnNext(idx) {
		t.Fatal("NotifyOnNext reported a new chain before there was one")
	}
	// avail_event = 3: the driver notifies once the index passes 3, which
	// EnableNotify (avail_event = next chain to pop, 0) would not arrange
	// with three chains pending.
	if vq.AvailEvent() != 3 {
		t.Fatalf("avail_event = %d, want 3", vq.AvailEvent())
	}
	vq.AddChain(testdriver.Buf{Addr: buf, Len: 4, Write: true})
	if !q.NotifyOnNext(idx) {
		t.Fatal("NotifyOnNext missed the chain added after idx")
	}

	_, vq, q = newPair(t, 8, virtio.CommonFeatures&^(1<<virtio.FeatureRingEventIdx))
	q.DisableNotify()
	if q.NotifyOnNext(q.AvailIdx()) || vq.UsedFlags() != 0 {
		t.Fatalf("without event idx: used flags = %d, want notifications on", vq.UsedFlags())
	}
}

func TestRestoreAndUndo(t *testing.T) {
	mem, vq, q := newPair(t, 8, allFeatures)
	buf := mem.Alloc(t, 4, 4)
	var c queue.Chain
	for range 5 {
		vq.AddChain(testdriver.Buf{Addr: buf, Len: 4, Write: true})
	}
	for range 3 {
		q.Pop(&c)
		q.Push(c.Head, 1)
	}
	q.Pop(&c)
	q.UndoPop(1)
	st := q.State()
	if st.NextAvail != 3 || st.NextUsed != 3 {
		t.Fatalf("state %+v", st)
	}
	r, err := queue.Restore(mem, st, allFeatures)
	if err != nil {
		t.Fatal(err)
	}
	if r.Pending() != 2 {
		t.Fatalf("restored pending = %d", r.Pending())
	}
	if ok, err := r.Pop(&c); !ok || err != nil || c.Head != 3 {
		t.Fatalf("restored Pop = %v %v head %d", ok, err, c.Head)
	}
	if _, err := queue.Restore(mem, queue.State{Config: queue.Config{Size: 5}}, allFeatures); err == nil {
		t.Fatal("Restore accepted a bad config")
	}
}

func TestBufferAcrossRegions(t *testing.T) {
	raw := testdriver.NewMem(t, 1<<17).Raw
	mem, err := virtio.NewGuestMemory(
		virtio.Region{GPA: 0, Data: raw[:1<<16]},
		virtio.Region{GPA: 1 << 16, Data: raw[1<<16:]},
	)
	if err != nil {
		t.Fatal(err)
	}
	q, err := queue.New(mem, queue.Config{Size: 2, DescAddr: 0x1000, DriverAddr: 0x2000, DeviceAddr: 0x3000}, allFeatures)
	if err != nil {
		t.Fatal(err)
	}
	copy(raw[0x1000:], le(1<<16-8, 16, 0, 0)) // straddles the two regions
	copy(raw[0x2004:], []byte{0, 0})
	raw[0x2002] = 1
	var c queue.Chain
	if _, err := q.Pop(&c); !errors.Is(err, queue.ErrDescOutOfBounds) {
		t.Fatalf("Pop = %v, want out of bounds", err)
	}
}
