package rng_test

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/internal/testdriver"
	"github.com/cubicle-dev/cubicle/vmm/virtio/mmio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
)

type failingSource struct{}

func (failingSource) Read([]byte) (int, error) { return 0, errors.New("no entropy") }

func setup(t *testing.T, cfg rng.Config) (*rng.Device, *testdriver.Driver, *testdriver.Mem) {
	t.Helper()
	mem := testdriver.NewMem(t, 1<<20)
	irq := testdriver.NewIRQ()
	dev := rng.New(cfg)
	tr, err := mmio.New(dev, mmio.Config{Memory: mem, Interrupt: irq})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return dev, testdriver.Init(t, tr, mem, irq, uint32(virtio.DeviceRNG), ^uint64(0), 16), mem
}

func TestRequests(t *testing.T) {
	dev, d, mem := setup(t, rng.Config{})
	top := uint64(len(mem.Raw))
	for _, tc := range []struct {
		name    string
		bufs    func() []testdriver.Buf
		usedLen uint32
	}{
		{"one buffer", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: mem.Alloc(t, 64, 1), Len: 64, Write: true}}
		}, 64},
		{"scattered", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: mem.Alloc(t, 3, 1), Len: 3, Write: true}, {Addr: mem.Alloc(t, 5000, 1), Len: 5000, Write: true}}
		}, 5003},
		{"capped", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: mem.Alloc(t, 200<<10, 1), Len: 200 << 10, Write: true}}
		}, rng.MaxBytesPerRequest},
		{"read-only buffer", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: mem.Alloc(t, 64, 1), Len: 64}}
		}, 0},
		{"zero length", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: mem.Alloc(t, 1, 1), Len: 0, Write: true}}
		}, 0},
		{"outside memory", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: top - 8, Len: 64, Write: true}}
		}, 0},
		{"huge length", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: 4096, Len: 0xffffffff, Write: true}}
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bufs := tc.bufs()
			d.Queues[0].AddChain(bufs...)
			d.Kick(0)
			u := d.WaitUsed(t, 0, 5*time.Second)
			if u.Len != tc.usedLen {
				t.Fatalf("used len %d, want %d", u.Len, tc.usedLen)
			}
			if u.Len >= 32 && bytes.Equal(mem.Bytes(bufs[len(bufs)-1].Addr, 32), make([]byte, 32)) {
				t.Fatal("buffer still zero")
			}
		})
	}
	if dev.Metrics().InvalidChains.Load() != 2 || dev.Metrics().Requests.Load() != 5 {
		t.Fatalf("metrics: invalid %d requests %d", dev.Metrics().InvalidChains.Load(), dev.Metrics().Requests.Load())
	}
}

func TestDistinctOutput(t *testing.T) {
	_, d, mem := setup(t, rng.Config{})
	a, b := mem.Alloc(t, 32, 1), mem.Alloc(t, 32, 1)
	d.Queues[0].AddChain(testdriver.Buf{Addr: a, Len: 32, Write: true})
	d.Queues[0].AddChain(testdriver.Buf{Addr: b, Len: 32, Write: true})
	d.Kick(0)
	d.WaitUsed(t, 0, 5*time.Second)
	d.WaitUsed(t, 0, 5*time.Second)
	if bytes.Equal(mem.Bytes(a, 32), mem.Bytes(b, 32)) {
		t.Fatal("two requests got the same bytes")
	}
}

func TestSourceFailure(t *testing.T) {
	dev, d, mem := setup(t, rng.Config{Source: failingSource{}})
	d.Queues[0].AddChain(testdriver.Buf{Addr: mem.Alloc(t, 64, 1), Len: 64, Write: true})
	d.Kick(0)
	if u := d.WaitUsed(t, 0, 5*time.Second); u.Len != 0 {
		t.Fatalf("used len %d from a failing source", u.Len)
	}
	if dev.Metrics().SourceErrors.Load() != 1 {
		t.Fatal("source error not counted")
	}
}

// TestBrokenRingNeedsReset: a driver that moves the available index more
// than a queue's worth gets DEVICE_NEEDS_RESET and a config interrupt.
func TestBrokenRingNeedsReset(t *testing.T) {
	_, d, _ := setup(t, rng.Config{})
	d.Queues[0].SetAvailIdx(1000)
	d.Kick(0)
	deadline := time.Now().Add(5 * time.Second)
	for d.R32(testdriver.RegStatus)&virtio.StatusDeviceNeedsReset == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no DEVICE_NEEDS_RESET")
		}
		time.Sleep(time.Millisecond)
	}
	if d.R32(testdriver.RegInterruptStatus)&virtio.InterruptConfigChange == 0 {
		t.Fatal("no configuration change interrupt")
	}
	// A reset brings the device back.
	d.W32(testdriver.RegStatus, 0)
	if d.R32(testdriver.RegStatus) != 0 {
		t.Fatal("reset did not clear the status")
	}
}
