package testdriver

import (
	"encoding/binary"
	"testing"
	"time"
)

// virtio-mmio register offsets, transcribed independently of package mmio
// from virtio 1.2 §4.2.2 so that the tests cross-check the transport.
const (
	RegMagic            = 0x000
	RegVersion          = 0x004
	RegDeviceID         = 0x008
	RegVendorID         = 0x00c
	RegDeviceFeatures   = 0x010
	RegDeviceFeatSel    = 0x014
	RegDriverFeatures   = 0x020
	RegDriverFeatSel    = 0x024
	RegQueueSel         = 0x030
	RegQueueNumMax      = 0x034
	RegQueueNum         = 0x038
	RegQueueReady       = 0x044
	RegQueueNotify      = 0x050
	RegInterruptStatus  = 0x060
	RegInterruptAck     = 0x064
	RegStatus           = 0x070
	RegQueueDescLow     = 0x080
	RegQueueDescHigh    = 0x084
	RegQueueDriverLow   = 0x090
	RegQueueDriverHigh  = 0x094
	RegQueueDeviceLow   = 0x0a0
	RegQueueDeviceHigh  = 0x0a4
	RegConfigGeneration = 0x0fc
	RegConfig           = 0x100
)

// MMIODevice is the bus interface of a virtio-mmio transport.
type MMIODevice interface {
	Read(offset uint64, data []byte)
	Write(offset uint64, data []byte)
}

// Driver is a guest driver bound to one virtio-mmio device.
type Driver struct {
	Dev      MMIODevice
	Mem      *Mem
	IRQ      *IRQ
	Queues   []*VQ
	Features uint64
}

// R32 reads a 32-bit register.
func (d *Driver) R32(off uint64) uint32 {
	var b [4]byte
	d.Dev.Read(off, b[:])
	return binary.LittleEndian.Uint32(b[:])
}

// W32 writes a 32-bit register.
func (d *Driver) W32(off uint64, v uint32) {
	var b [4]byte
	binary.LittleEndian.PutUint32(b[:], v)
	d.Dev.Write(off, b[:])
}

// ReadConfig reads n bytes of device configuration space at off, one byte at
// a time, retrying while the configuration generation changes (§4.2.3.4).
func (d *Driver) ReadConfig(off uint64, n int) []byte {
	out := make([]byte, n)
	for range 100 {
		gen := d.R32(RegConfigGeneration)
		for i := range out {
			var b [1]byte
			d.Dev.Read(RegConfig+off+uint64(i), b[:])
			out[i] = b[0]
		}
		if d.R32(RegConfigGeneration) == gen {
			break
		}
	}
	return out
}

// Probe checks the magic, version and device ID, then resets the device and
// negotiates want & offered features. It stops at FEATURES_OK and fails the
// test if the device refuses it.
func Probe(t testing.TB, dev MMIODevice, mem *Mem, irq *IRQ, deviceID uint32, want uint64) *Driver {
	t.Helper()
	d := &Driver{Dev: dev, Mem: mem, IRQ: irq}
	if m := d.R32(RegMagic); m != 0x74726976 {
		t.Fatalf("magic = %#x", m)
	}
	if v := d.R32(RegVersion); v != 2 {
		t.Fatalf("version = %d, want 2", v)
	}
	if id := d.R32(RegDeviceID); id != deviceID {
		t.Fatalf("device id = %d, want %d", id, deviceID)
	}
	d.W32(RegStatus, 0)
	if s := d.R32(RegStatus); s != 0 {
		t.Fatalf("status after reset = %#x", s)
	}
	d.W32(RegStatus, 1)   // ACKNOWLEDGE
	d.W32(RegStatus, 1|2) // DRIVER
	d.W32(RegDeviceFeatSel, 0)
	offered := uint64(d.R32(RegDeviceFeatures))
	d.W32(RegDeviceFeatSel, 1)
	offered |= uint64(d.R32(RegDeviceFeatures)) << 32
	d.Features = offered & want
	d.W32(RegDriverFeatSel, 0)
	d.W32(RegDriverFeatures, uint32(d.Features))
	d.W32(RegDriverFeatSel, 1)
	d.W32(RegDriverFeatures, uint32(d.Features>>32))
	d.W32(RegStatus, 1|2|8) // FEATURES_OK
	if s := d.R32(RegStatus); s&8 == 0 {
		t.Fatalf("device refused features %#x (offered %#x): status %#x", d.Features, offered, s)
	}
	return d
}

// SetupQueue programs queue i with a fresh ring of the given size (clipped to
// QueueNumMax) and marks it ready.
func (d *Driver) SetupQueue(t testing.TB, i int, size uint16) *VQ {
	t.Helper()
	d.W32(RegQueueSel, uint32(i))
	if d.R32(RegQueueReady) != 0 {
		t.Fatalf("queue %d already ready", i)
	}
	max := d.R32(RegQueueNumMax)
	if max == 0 {
		t.Fatalf("queue %d not available", i)
	}
	if uint32(size) > max {
		size = uint16(max)
	}
	vq := NewVQ(t, d.Mem, size)
	vq.EventIdx = d.Features&(1<<29) != 0
	d.W32(RegQueueNum, uint32(size))
	d.W32(RegQueueDescLow, uint32(vq.Desc))
	d.W32(RegQueueDescHigh, uint32(vq.Desc>>32))
	d.W32(RegQueueDriverLow, uint32(vq.Avail))
	d.W32(RegQueueDriverHigh, uint32(vq.Avail>>32))
	d.W32(RegQueueDeviceLow, uint32(vq.UsedRing))
	d.W32(RegQueueDeviceHigh, uint32(vq.UsedRing>>32))
	d.W32(RegQueueReady, 1)
	for len(d.Queues) <= i {
		d.Queues = append(d.Queues, nil)
	}
	d.Queues[i] = vq
	return vq
}

// DriverOK sets DRIVER_OK and fails the test if the device did not come up.
func (d *Driver) DriverOK(t testing.TB) {
	t.Helper()
	d.W32(RegStatus, 1|2|8|4)
	if s := d.R32(RegStatus); s != 1|2|8|4 {
		t.Fatalf("status after DRIVER_OK = %#x", s)
	}
}

// Init probes the device and sets up queues of the given sizes, then sets
// DRIVER_OK: the whole Linux bring-up.
func Init(t testing.TB, dev MMIODevice, mem *Mem, irq *IRQ, deviceID uint32, want uint64, sizes ...uint16) *Driver {
	t.Helper()
	d := Probe(t, dev, mem, irq, deviceID, want)
	for i, s := range sizes {
		d.SetupQueue(t, i, s)
	}
	d.DriverOK(t)
	return d
}

// Kick notifies queue i.
func (d *Driver) Kick(i int) { d.W32(RegQueueNotify, uint32(i)) }

// AckInterrupts reads and acknowledges the interrupt status.
func (d *Driver) AckInterrupts() uint32 {
	s := d.R32(RegInterruptStatus)
	if s != 0 {
		d.W32(RegInterruptAck, s)
	}
	return s
}

// WaitUsed waits up to timeout for the next used entry of queue i, failing the
// test on timeout. It acknowledges interrupts on the way, as the guest's
// interrupt handler would.
func (d *Driver) WaitUsed(t testing.TB, i int, timeout time.Duration) Used {
	t.Helper()
	u, ok := d.TryWaitUsed(i, timeout)
	if !ok {
		t.Fatalf("queue %d: no used buffer within %v (irqs %d, status %#x)", i, timeout, d.IRQ.Count(), d.R32(RegStatus))
	}
	return u
}

// TryWaitUsed is WaitUsed that reports a timeout instead of failing.
func (d *Driver) TryWaitUsed(i int, timeout time.Duration) (Used, bool) {
	deadline := time.Now().Add(timeout)
	for {
		if u, ok := d.Queues[i].NextUsed(); ok {
			return u, true
		}
		left := time.Until(deadline)
		if left <= 0 {
			return Used{}, false
		}
		if left > 20*time.Millisecond {
			left = 20 * time.Millisecond // poll too: interrupts may be suppressed
		}
		if d.IRQ.Wait(left) {
			d.AckInterrupts()
		}
	}
}
