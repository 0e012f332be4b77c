package mmio_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/internal/testdriver"
	"github.com/cubicle-dev/cubicle/vmm/virtio/mmio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
)

// recorder is a transport-test device: it records what the transport asks of
// it and signals what the test tells it to.
type recorder struct {
	mu                    sync.Mutex
	features              uint64
	activations, resets   int
	pauses, resumes       int
	notified              []int
	queues                []*queue.Queue
	sig                   virtio.Signaler
	config                [8]byte
	activateErr           error
	lastFeatures          uint64
	configWrites          int
	activateQueuesPresent []bool
}

func (r *recorder) Type() virtio.DeviceType { return 42 }
func (r *recorder) Features() uint64        { return r.features }
func (r *recorder) QueueMaxSizes() []uint16 { return []uint16{16, 8} }
func (r *recorder) ReadConfig(o uint64, d []byte) {
	clear(d)
	if o < 8 {
		copy(d, r.config[o:])
	}
}
func (r *recorder) WriteConfig(o uint64, d []byte) {
	r.mu.Lock()
	r.configWrites++
	r.mu.Unlock()
}
func (r *recorder) Activate(mem virtio.Memory, f uint64, qs []*queue.Queue, sig virtio.Signaler) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.activateErr != nil {
		return r.activateErr
	}
	r.activations++
	r.queues, r.sig, r.lastFeatures = qs, sig, f
	r.activateQueuesPresent = nil
	for _, q := range qs {
		r.activateQueuesPresent = append(r.activateQueuesPresent, q != nil)
	}
	return nil
}
func (r *recorder) Notify(i int) { r.mu.Lock(); r.notified = append(r.notified, i); r.mu.Unlock() }
func (r *recorder) Pause()       { r.mu.Lock(); r.pauses++; r.mu.Unlock() }
func (r *recorder) Resume() error {
	r.mu.Lock()
	r.resumes++
	r.mu.Unlock()
	return nil
}
func (r *recorder) Reset() { r.mu.Lock(); r.resets++; r.queues = nil; r.mu.Unlock() }

func (r *recorder) notifications() []int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]int(nil), r.notified...)
}

func newTransport(t *testing.T, dev mmio.Device) (*mmio.Transport, *testdriver.Mem, *testdriver.IRQ) {
	t.Helper()
	mem := testdriver.NewMem(t, 1<<20)
	irq := testdriver.NewIRQ()
	tr, err := mmio.New(dev, mmio.Config{Base: 0xd0001000, IRQ: 6, Memory: mem, Interrupt: irq})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	return tr, mem, irq
}

func TestIdentityRegisters(t *testing.T) {
	tr, mem, irq := newTransport(t, &recorder{features: virtio.CommonFeatures | 1<<3})
	d := &testdriver.Driver{Dev: tr, Mem: mem, IRQ: irq}
	for _, tc := range []struct {
		off  uint64
		want uint32
	}{
		{mmio.RegMagicValue, 0x74726976},
		{mmio.RegVersion, 2},
		{mmio.RegDeviceID, 42},
		{mmio.RegVendorID, mmio.VendorID},
		{mmio.RegStatus, 0},
		{mmio.RegInterruptStatus, 0},
		{mmio.RegSHMLenLow, 0xffffffff},
		{mmio.RegSHMLenHigh, 0xffffffff},
		{mmio.RegQueueNotify, 0}, // write-only
		{0x0f0, 0},               // reserved
	} {
		if got := d.R32(tc.off); got != tc.want {
			t.Errorf("register %#x = %#x, want %#x", tc.off, got, tc.want)
		}
	}
	// Control registers are 32-bit only (§4.2.2.2).
	for _, n := range []int{1, 2, 8} {
		b := bytes.Repeat([]byte{0xff}, n)
		tr.Read(mmio.RegMagicValue, b)
		if !bytes.Equal(b, make([]byte, n)) {
			t.Errorf("%d-byte read of magic = %x", n, b)
		}
	}
	b := make([]byte, 4)
	tr.Read(mmio.RegMagicValue+2, b) // misaligned
	if !bytes.Equal(b, make([]byte, 4)) {
		t.Errorf("misaligned read = %x", b)
	}
	d.W32(mmio.RegDeviceFeaturesSel, 0)
	if got := d.R32(mmio.RegDeviceFeatures); got != uint32((virtio.CommonFeatures|1<<3)&0xffffffff) {
		t.Errorf("features[0] = %#x", got)
	}
	d.W32(mmio.RegDeviceFeaturesSel, 1)
	if got := d.R32(mmio.RegDeviceFeatures); got != 1 {
		t.Errorf("features[1] = %#x", got)
	}
	d.W32(mmio.RegDeviceFeaturesSel, 7)
	if got := d.R32(mmio.RegDeviceFeatures); got != 0 {
		t.Errorf("features[7] = %#x", got)
	}
	d.W32(mmio.RegQueueSel, 1)
	if got := d.R32(mmio.RegQueueNumMax); got != 8 {
		t.Errorf("queue 1 max = %d", got)
	}
	d.W32(mmio.RegQueueSel, 2)
	if got := d.R32(mmio.RegQueueNumMax); got != 0 {
		t.Errorf("missing queue max = %d", got)
	}
	if got := tr.Cmdline(); got != "virtio_mmio.device=4K@0xd0001000:6" {
		t.Errorf("Cmdline = %q", got)
	}
	// Device config space, any width, zeros past its end.
	r := tr.Device().(*recorder)
	r.config = [8]byte{1, 2, 3, 4, 5, 6, 7, 8}
	b8 := make([]byte, 8)
	tr.Read(mmio.RegConfig, b8)
	if binary.LittleEndian.Uint64(b8) != 0x0807060504030201 {
		t.Errorf("config = %x", b8)
	}
	tr.Read(mmio.RegConfig+6, b8[:4])
	if !bytes.Equal(b8[:4], []byte{7, 8, 0, 0}) {
		t.Errorf("config tail = %x", b8[:4])
	}
	tr.Read(mmio.Size+4, b8[:4]) // outside the window
}

func TestFeatureNegotiation(t *testing.T) {
	offered := virtio.CommonFeatures | 1<<3
	for _, tc := range []struct {
		name   string
		accept uint64
		ok     bool
	}{
		{"all", offered, true},
		{"version 1 only", 1 << virtio.FeatureVersion1, true},
		{"legacy driver", 1 << 3, false},
		{"feature not offered", offered | 1<<4, false},
		{"high feature not offered", offered | 1<<40, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr, mem, irq := newTransport(t, &recorder{features: offered})
			d := &testdriver.Driver{Dev: tr, Mem: mem, IRQ: irq}
			d.W32(mmio.RegStatus, 1|2)
			d.W32(mmio.RegDriverFeaturesSel, 0)
			d.W32(mmio.RegDriverFeatures, uint32(tc.accept))
			d.W32(mmio.RegDriverFeaturesSel, 1)
			d.W32(mmio.RegDriverFeatures, uint32(tc.accept>>32))
			d.W32(mmio.RegStatus, 1|2|8)
			if got := d.R32(mmio.RegStatus)&8 != 0; got != tc.ok {
				t.Fatalf("FEATURES_OK = %v, want %v", got, tc.ok)
			}
		})
	}
}

func TestStatusStateMachine(t *testing.T) {
	r := &recorder{features: virtio.CommonFeatures}
	tr, mem, irq := newTransport(t, r)
	d := &testdriver.Driver{Dev: tr, Mem: mem, IRQ: irq}
	// Features before DRIVER are ignored.
	d.W32(mmio.RegDriverFeatures, 0xffffffff)
	// DRIVER_OK without FEATURES_OK does not activate.
	d.W32(mmio.RegStatus, 1|2|4)
	if s := d.R32(mmio.RegStatus); s&4 != 0 || r.activations != 0 {
		t.Fatalf("DRIVER_OK accepted without FEATURES_OK: status %#x", s)
	}
	d.W32(mmio.RegStatus, 0)
	d = testdriver.Probe(t, tr, mem, irq, 42, virtio.CommonFeatures)
	// Clearing a bit is refused.
	d.W32(mmio.RegStatus, 1)
	if s := d.R32(mmio.RegStatus); s != 1|2|8 {
		t.Fatalf("status after clearing write = %#x", s)
	}
	// Features are frozen after FEATURES_OK.
	d.W32(mmio.RegDriverFeaturesSel, 0)
	d.W32(mmio.RegDriverFeatures, 0)
	vq := d.SetupQueue(t, 0, 16)
	// Queue registers are frozen once ready.
	d.W32(mmio.RegQueueSel, 0)
	d.W32(mmio.RegQueueNum, 4)
	d.W32(mmio.RegQueueDescLow, 0x12340)
	if got := d.R32(mmio.RegQueueNum); got != 16 {
		t.Fatalf("QueueNum changed on a ready queue: %d", got)
	}
	if got := d.R32(mmio.RegQueueDescLow); got != uint32(vq.Desc) {
		t.Fatalf("QueueDesc changed on a ready queue: %#x", got)
	}
	// Notifications before DRIVER_OK are dropped.
	d.Kick(0)
	d.DriverOK(t)
	if r.activations != 1 || r.lastFeatures != virtio.CommonFeatures {
		t.Fatalf("activations %d features %#x", r.activations, r.lastFeatures)
	}
	if !r.activateQueuesPresent[0] || r.activateQueuesPresent[1] {
		t.Fatalf("queues present %v, want [true false]", r.activateQueuesPresent)
	}
	d.Kick(0)
	d.Kick(1)
	d.Kick(5) // no such queue
	if n := r.notifications(); len(n) != 2 || n[0] != 0 || n[1] != 1 {
		t.Fatalf("notifications %v", n)
	}
	// Interrupts: used buffer and config change, acknowledged bit by bit.
	r.sig.SignalUsed()
	r.sig.SignalConfig()
	if s := d.R32(mmio.RegInterruptStatus); s != 3 || d.R32(mmio.RegConfigGeneration) != 1 || irq.Count() != 2 {
		t.Fatalf("isr %d gen %d irqs %d", s, d.R32(mmio.RegConfigGeneration), irq.Count())
	}
	d.W32(mmio.RegInterruptACK, 1)
	if s := d.R32(mmio.RegInterruptStatus); s != 2 {
		t.Fatalf("isr after ack = %d", s)
	}
	d.W32(mmio.RegConfig, 0)
	if r.configWrites != 1 {
		t.Fatal("config write not forwarded")
	}
	// Reset: the device is reset and every register returns to its default.
	d.W32(mmio.RegStatus, 0)
	if r.resets == 0 || d.R32(mmio.RegStatus) != 0 || d.R32(mmio.RegInterruptStatus) != 0 {
		t.Fatalf("after reset: resets %d status %#x", r.resets, d.R32(mmio.RegStatus))
	}
	d.W32(mmio.RegQueueSel, 0)
	if d.R32(mmio.RegQueueReady) != 0 || d.R32(mmio.RegQueueNum) != 16 || d.R32(mmio.RegQueueDescLow) != 0 {
		t.Fatal("queue registers survived reset")
	}
	d.Kick(0)
	if n := r.notifications(); len(n) != 2 {
		t.Fatalf("notification after reset reached the device: %v", n)
	}
}

func TestActivationFailureNeedsReset(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(d *testdriver.Driver, r *recorder)
	}{
		{"queue size above maximum", func(d *testdriver.Driver, r *recorder) {
			d.W32(mmio.RegQueueSel, 1)
			d.W32(mmio.RegQueueNum, 64)
			d.W32(mmio.RegQueueReady, 1)
		}},
		{"queue size not a power of two", func(d *testdriver.Driver, r *recorder) {
			d.W32(mmio.RegQueueSel, 0)
			d.W32(mmio.RegQueueNum, 6)
			d.W32(mmio.RegQueueReady, 1)
		}},
		{"ring outside memory", func(d *testdriver.Driver, r *recorder) {
			d.W32(mmio.RegQueueSel, 0)
			d.W32(mmio.RegQueueDescHigh, 0x10)
			d.W32(mmio.RegQueueReady, 1)
		}},
		{"device refuses", func(d *testdriver.Driver, r *recorder) {
			r.activateErr = errors.New("no")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &recorder{features: virtio.CommonFeatures}
			tr, mem, irq := newTransport(t, r)
			d := testdriver.Probe(t, tr, mem, irq, 42, virtio.CommonFeatures)
			tc.setup(d, r)
			d.W32(mmio.RegStatus, 1|2|8|4)
			if s := d.R32(mmio.RegStatus); s&virtio.StatusDeviceNeedsReset == 0 {
				t.Fatalf("status %#x, want DEVICE_NEEDS_RESET", s)
			}
			if d.R32(mmio.RegInterruptStatus)&2 == 0 || irq.Count() == 0 {
				t.Fatal("no configuration change interrupt")
			}
			d.Kick(0)
			if len(r.notifications()) != 0 {
				t.Fatal("broken device got a notification")
			}
			d.W32(mmio.RegStatus, 0)
			if s := d.R32(mmio.RegStatus); s != 0 {
				t.Fatalf("status after reset %#x", s)
			}
		})
	}
}

func TestIOEventFD(t *testing.T) {
	r := &recorder{features: virtio.CommonFeatures}
	tr, mem, irq := newTransport(t, r)
	testdriver.Init(t, tr, mem, irq, 42, virtio.CommonFeatures, 16)
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.AttachIOEventFD(3, fd); err == nil {
		t.Fatal("ioeventfd for a missing queue accepted")
	}
	if err := tr.AttachIOEventFD(1, fd); err != nil {
		t.Fatal(err)
	}
	var one [8]byte
	binary.LittleEndian.PutUint64(one[:], 1)
	if _, err := unix.Write(fd, one[:]); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(r.notifications()) == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := r.notifications(); len(n) != 1 || n[0] != 1 {
		t.Fatalf("notifications %v", n)
	}
	done := make(chan error)
	go func() { done <- tr.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close hung on the ioeventfd goroutine")
	}
}

func TestSaveRestoreRegisters(t *testing.T) {
	r := &recorder{features: virtio.CommonFeatures}
	tr, mem, irq := newTransport(t, r)
	d := testdriver.Init(t, tr, mem, irq, 42, virtio.CommonFeatures, 16)
	r.sig.SignalConfig()
	tr.Pause()
	if r.pauses != 1 {
		t.Fatal("Pause did not reach the device")
	}
	st, err := tr.Save()
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Resume(); err != nil || r.resumes != 1 {
		t.Fatalf("Resume = %v", err)
	}
	if st.Status != 0xf || st.DriverFeatures != virtio.CommonFeatures || !st.Queues[0].Ready || st.Queues[1].Ready ||
		st.Queues[0].DescAddr != d.Queues[0].Desc || st.ConfigGeneration != 1 {
		t.Fatalf("state %+v", st)
	}

	r2 := &recorder{features: virtio.CommonFeatures}
	tr2, _, irq2 := newTransport(t, r2)
	bad := st
	bad.DeviceType = 1
	if err := tr2.Restore(bad); !errors.Is(err, mmio.ErrRestoreMismatch) {
		t.Fatalf("Restore of another device type = %v", err)
	}
	bad = st
	bad.DriverFeatures |= 1 << 50
	if err := tr2.Restore(bad); !errors.Is(err, mmio.ErrRestoreMismatch) {
		t.Fatalf("Restore with unoffered features = %v", err)
	}
	if err := tr2.Restore(st); err != nil {
		t.Fatal(err)
	}
	if r2.activations != 1 || irq2.Count() != 1 {
		t.Fatalf("restored device: activations %d irqs %d", r2.activations, irq2.Count())
	}
	d2 := &testdriver.Driver{Dev: tr2}
	if d2.R32(mmio.RegStatus) != 0xf || d2.R32(mmio.RegConfigGeneration) != 1 {
		t.Fatal("registers not restored")
	}
	d2.W32(mmio.RegQueueSel, 0)
	if d2.R32(mmio.RegQueueDescLow) != uint32(d.Queues[0].Desc) || d2.R32(mmio.RegQueueReady) != 1 {
		t.Fatal("queue registers not restored")
	}
}

// TestRNGEndToEnd drives the real entropy device through the transport.
func TestRNGEndToEnd(t *testing.T) {
	dev := rng.New(rng.Config{})
	tr, mem, irq := newTransport(t, dev)
	d := testdriver.Init(t, tr, mem, irq, uint32(virtio.DeviceRNG), ^uint64(0), 8)
	buf := mem.Alloc(t, 64, 1)
	d.Queues[0].AddChain(testdriver.Buf{Addr: buf, Len: 32, Write: true}, testdriver.Buf{Addr: buf + 32, Len: 32, Write: true})
	d.Kick(0)
	u := d.WaitUsed(t, 0, 5*time.Second)
	if u.Len != 64 || bytes.Equal(mem.Bytes(buf, 64), make([]byte, 64)) {
		t.Fatalf("used %+v, data %x", u, mem.Bytes(buf, 64))
	}
}
