package queue_test

import (
	"encoding/binary"
	"testing"
	"unsafe"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// Fuzz layout: 64 KiB of guest RAM at GPA 0 and 16 KiB at GPA 1 MiB. The
// fuzzer's bytes become the descriptor table (at 0x1000) and the available
// ring (at 0x3000); the used ring is at 0x5000. Descriptor addresses are
// taken as they come, so the fuzzer reaches both regions, the gap between
// them and the end of the address space.
const (
	fuzzDesc  = 0x1000
	fuzzAvail = 0x3000
	fuzzUsed  = 0x5000
)

func FuzzPop(f *testing.F) {
	chain := func(descs ...[]byte) []byte {
		var b []byte
		for _, d := range descs {
			b = append(b, d...)
		}
		return b
	}
	// Seeds: a good 2-descriptor chain, an indirect chain, a loop, a chain
	// into the high region, a chain straddling the end of low RAM.
	f.Add(uint8(2), uint8(0xff), chain(le(0x8000, 16, queue.DescFNext, 1), le(0x9000, 32, queue.DescFWrite, 0)), []byte{1, 0, 0, 0})
	f.Add(uint8(2), uint8(0xff), chain(le(0x6000, 32, queue.DescFIndirect, 0)), []byte{1, 0, 0, 0})
	f.Add(uint8(3), uint8(0xff), chain(le(0x8000, 16, queue.DescFNext, 1), le(0x9000, 16, queue.DescFNext, 0)), []byte{2, 0, 0, 0, 1, 0})
	f.Add(uint8(1), uint8(0xff), chain(le(1<<20, 4096, queue.DescFWrite, 0)), []byte{1, 0, 0, 0})
	f.Add(uint8(1), uint8(0xff), chain(le(0xfff0, 32, 0, 0)), []byte{1, 0, 0, 0})
	f.Add(uint8(4), uint8(0), chain(le(0x8000, 1, 0, 0)), []byte{0xff, 0xff, 7, 0})

	f.Fuzz(func(t *testing.T, sizeLog, features uint8, descs, avail []byte) {
		size := uint16(1) << (sizeLog % 9) // 1..256
		low := make([]byte, 1<<16)
		high := make([]byte, 1<<14)
		mem, err := virtio.NewGuestMemory(virtio.Region{GPA: 0, Data: low}, virtio.Region{GPA: 1 << 20, Data: high})
		if err != nil {
			t.Fatal(err)
		}
		copy(low[fuzzDesc:fuzzDesc+16*int(size)], descs)
		// An indirect table for seeds that point at 0x6000.
		copy(low[0x6000:], chain(le(0x8000, 8, queue.DescFNext, 1), le(0x8100, 8, queue.DescFWrite, 0)))
		if len(avail) >= 4 {
			binary.LittleEndian.PutUint16(low[fuzzAvail:], binary.LittleEndian.Uint16(avail[0:]))   // flags
			binary.LittleEndian.PutUint16(low[fuzzAvail+2:], binary.LittleEndian.Uint16(avail[2:])) // idx
			copy(low[fuzzAvail+4:fuzzAvail+6+2*int(size)], avail[4:])
		}
		var feat uint64 = 1 << virtio.FeatureVersion1
		if features&1 != 0 {
			feat |= 1 << virtio.FeatureRingIndirectDesc
		}
		if features&2 != 0 {
			feat |= 1 << virtio.FeatureRingEventIdx
		}
		q, err := queue.New(mem, queue.Config{Size: size, DescAddr: fuzzDesc, DriverAddr: fuzzAvail, DeviceAddr: fuzzUsed}, feat)
		if err != nil {
			t.Fatal(err)
		}
		inMem := func(b []byte) bool {
			if len(b) == 0 {
				return true
			}
			p := uintptr(unsafe.Pointer(&b[0]))
			for _, r := range [][]byte{low, high} {
				lo := uintptr(unsafe.Pointer(&r[0]))
				if p >= lo && p+uintptr(len(b)) <= lo+uintptr(len(r)) {
					return true
				}
			}
			return false
		}
		var c queue.Chain
		for range 2 * int(size) {
			ok, err := q.Pop(&c)
			if err != nil {
				if q.Broken() != nil {
					break
				}
				continue
			}
			if !ok {
				break
			}
			if len(c.Descs) > int(size) {
				t.Fatalf("chain of %d descriptors in a queue of %d", len(c.Descs), size)
			}
			seenW := false
			for _, d := range c.Descs {
				if !inMem(d.Buf) || len(d.Buf) != int(d.Len) {
					t.Fatalf("descriptor %+v escapes guest memory", d.Addr)
				}
				if seenW && !d.Write {
					t.Fatal("readable descriptor after writable")
				}
				seenW = seenW || d.Write
			}
			c.WriteAt(make([]byte, 64), 0)
			if err := q.Push(c.Head, uint32(c.WritableLen())); err != nil {
				t.Fatalf("Push of popped head %d: %v", c.Head, err)
			}
			q.NeedsInterrupt()
		}
		q.EnableNotify()
	})
}
