package mmio_test

import (
	"encoding/binary"
	"testing"

	"github.com/cubicle-dev/cubicle/vmm/virtio/internal/testdriver"
	"github.com/cubicle-dev/cubicle/vmm/virtio/mmio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
)

// FuzzRegisters plays arbitrary register accesses against a transport with a
// live entropy device: the guest may write anything, in any order, at any
// width; the VMM must not panic or hang. Each 7-byte record is an access:
// flags (bit 0 write, bits 1-2 width), offset (le16), value (le32). Guest
// memory is filled from the input too, so activation sees arbitrary rings.
func FuzzRegisters(f *testing.F) {
	rec := func(write bool, width int, off uint16, v uint32) []byte {
		b := make([]byte, 7)
		fl := byte(width << 1)
		if write {
			fl |= 1
		}
		b[0] = fl
		binary.LittleEndian.PutUint16(b[1:], off)
		binary.LittleEndian.PutUint32(b[3:], v)
		return b
	}
	var linux []byte // the Linux bring-up, then a notify
	for _, r := range [][]byte{
		rec(true, 2, mmio.RegStatus, 0), rec(true, 2, mmio.RegStatus, 3),
		rec(true, 2, mmio.RegDriverFeaturesSel, 1), rec(true, 2, mmio.RegDriverFeatures, 1),
		rec(true, 2, mmio.RegStatus, 11), rec(true, 2, mmio.RegQueueNum, 8),
		rec(true, 2, mmio.RegQueueDescLow, 0x1000), rec(true, 2, mmio.RegQueueDriverLow, 0x2000),
		rec(true, 2, mmio.RegQueueDeviceLow, 0x3000), rec(true, 2, mmio.RegQueueReady, 1),
		rec(true, 2, mmio.RegStatus, 15), rec(true, 2, mmio.RegQueueNotify, 0),
		rec(false, 2, mmio.RegInterruptStatus, 0), rec(true, 2, mmio.RegInterruptACK, 3),
	} {
		linux = append(linux, r...)
	}
	f.Add(linux, []byte{})
	f.Add(append(linux, rec(true, 2, mmio.RegStatus, 0)...), []byte{1, 2, 3})
	f.Add([]byte{1, 0x70, 0, 0xff, 0xff, 0xff, 0xff}, []byte{})
	f.Fuzz(func(t *testing.T, ops, memory []byte) {
		mem := testdriver.NewMem(t, 1<<16)
		copy(mem.Raw[0x1000:], memory)
		tr, err := mmio.New(rng.New(rng.Config{}), mmio.Config{Memory: mem, Interrupt: testdriver.NewIRQ()})
		if err != nil {
			t.Fatal(err)
		}
		defer tr.Close()
		for len(ops) >= 7 {
			width := 1 << ((ops[0] >> 1) & 3)
			off := uint64(binary.LittleEndian.Uint16(ops[1:])) % (mmio.Size + 16)
			data := make([]byte, 8)
			binary.LittleEndian.PutUint32(data, binary.LittleEndian.Uint32(ops[3:]))
			if ops[0]&1 != 0 {
				tr.Write(off, data[:width])
			} else {
				tr.Read(off, data[:width])
			}
			ops = ops[7:]
		}
	})
}
