package queue_test

import (
	"testing"

	"github.com/cubicle-dev/cubicle/vmm/virtio/internal/testdriver"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// BenchmarkPopPush measures the device's per-request ring work: pop a chain
// (header + data + status, as a block request), push it and decide on the
// interrupt. The driver side republishes the same chain each time.
func BenchmarkPopPush(b *testing.B) {
	for _, tc := range []struct {
		name     string
		indirect bool
	}{{"direct", false}, {"indirect", true}} {
		b.Run(tc.name, func(b *testing.B) {
			mem, vq, q := newPair(b, 256, allFeatures)
			hdr, data, st := mem.Alloc(b, 16, 8), mem.Alloc(b, 4096, 4096), mem.Alloc(b, 1, 1)
			bufs := []testdriver.Buf{{Addr: hdr, Len: 16}, {Addr: data, Len: 4096, Write: true}, {Addr: st, Len: 1, Write: true}}
			var head uint16
			if tc.indirect {
				head = vq.AddIndirect(b, bufs...)
			} else {
				head, _ = vq.AddChain(bufs...)
			}
			var c queue.Chain
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if i > 0 {
					vq.Publish(head)
				}
				if ok, err := q.Pop(&c); !ok || err != nil {
					b.Fatalf("Pop = %v, %v", ok, err)
				}
				if err := q.Push(c.Head, 4097); err != nil {
					b.Fatal(err)
				}
				q.NeedsInterrupt()
				vq.NextUsed()
			}
		})
	}
}
