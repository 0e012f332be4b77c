package net_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/internal/testnet"
	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/internal/testdriver"
	"github.com/cubicle-dev/cubicle/vmm/virtio/mmio"
	vnet "github.com/cubicle-dev/cubicle/vmm/virtio/net"
)

const (
	etherType = testnet.EtherType
	waitFor   = testnet.WaitFor
)

var (
	guestMAC = [6]byte{0x02, 0, 0, 0, 0, 0x01}
	hostMAC  = [6]byte{0x02, 0, 0, 0, 0, 0x02}
)

type env struct {
	ns  *testnet.Netns
	dev *vnet.Device
	tr  *mmio.Transport
	mem *testdriver.Mem
	irq *testdriver.IRQ
	drv *testdriver.Driver
	rx  map[uint32]uint64
}

func newEnv(t *testing.T, want uint64, mtu int) *env {
	t.Helper()
	e := &env{ns: testnet.New(t, mtu), mem: testdriver.NewMem(t, 8<<20), irq: testdriver.NewIRQ(), rx: map[uint32]uint64{}}
	dev, err := vnet.New(vnet.Config{Tap: e.ns.Tap, MAC: guestMAC})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := mmio.New(dev, mmio.Config{Base: 0xd0003000, IRQ: 8, Memory: e.mem, Interrupt: e.irq})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		tr.Close()
		if err := dev.Close(); err != nil {
			t.Error(err)
		}
	})
	e.dev, e.tr = dev, tr
	e.drv = testdriver.Init(t, tr, e.mem, e.irq, uint32(virtio.DeviceNet), want, 32, 32)
	return e
}

func (e *env) postRx(t *testing.T, n int, size uint32) {
	t.Helper()
	for range n {
		gpa := e.mem.Alloc(t, uint64(size), 8)
		h, ok := e.drv.Queues[vnet.RxQueue].AddChain(testdriver.Buf{Addr: gpa, Len: size, Write: true})
		if !ok {
			t.Fatal("rx queue full")
		}
		e.rx[uint32(h)] = gpa
	}
	e.drv.Kick(vnet.RxQueue)
}

// recvFrame waits for rx buffers holding a frame of our EtherType and
// returns its header and frame (other traffic on the link is skipped).
func (e *env) recvFrame(t *testing.T) (hdr, f []byte, buffers int) {
	t.Helper()
	for {
		u := e.drv.WaitUsed(t, vnet.RxQueue, waitFor)
		data := append([]byte(nil), e.mem.Bytes(e.rx[u.ID], uint64(u.Len))...)
		if u.Len < vnet.NetHdrSize {
			t.Fatalf("rx used len %d", u.Len)
		}
		nb := int(binary.LittleEndian.Uint16(data[10:]))
		for i := 1; i < nb; i++ {
			u := e.drv.WaitUsed(t, vnet.RxQueue, waitFor)
			data = append(data, e.mem.Bytes(e.rx[u.ID], uint64(u.Len))...)
		}
		hdr, f = data[:vnet.NetHdrSize], data[vnet.NetHdrSize:]
		if len(f) >= 14 && binary.BigEndian.Uint16(f[12:]) == etherType {
			return hdr, f, nb
		}
	}
}

// tx sends hdr+frame from the guest, in one descriptor, split after the
// header, or through an indirect table, and waits for the chain to come back.
func (e *env) tx(t *testing.T, hdr, f []byte, layout string) {
	t.Helper()
	b := append(append([]byte{}, hdr...), f...)
	gpa := e.mem.Alloc(t, uint64(len(b)), 8)
	e.mem.Put(gpa, b)
	vq := e.drv.Queues[vnet.TxQueue]
	switch layout {
	case "one":
		vq.AddChain(testdriver.Buf{Addr: gpa, Len: uint32(len(b))})
	case "split":
		vq.AddChain(testdriver.Buf{Addr: gpa, Len: vnet.NetHdrSize}, testdriver.Buf{Addr: gpa + vnet.NetHdrSize, Len: uint32(len(f))})
	case "indirect":
		vq.AddIndirect(t, testdriver.Buf{Addr: gpa, Len: 4}, testdriver.Buf{Addr: gpa + 4, Len: uint32(len(b) - 4)})
	}
	e.drv.Kick(vnet.TxQueue)
	if u := e.drv.WaitUsed(t, vnet.TxQueue, waitFor); u.Len != 0 {
		t.Fatalf("tx used len %d", u.Len)
	}
}

func TestConfigAndFeatures(t *testing.T) {
	e := newEnv(t, ^uint64(0), 1500)
	if mac := e.drv.ReadConfig(0, 6); !bytes.Equal(mac, guestMAC[:]) {
		t.Fatalf("config MAC %x", mac)
	}
	for _, bit := range []uint{vnet.FeatureMAC, vnet.FeatureMrgRxbuf, vnet.FeatureCsum, vnet.FeatureGuestCsum, vnet.FeatureGuestTSO4, vnet.FeatureHostTSO4} {
		if e.drv.Features&(1<<bit) == 0 {
			t.Errorf("feature %d not offered", bit)
		}
	}
	if e.drv.Features&(1<<vnet.FeatureStatus) != 0 {
		t.Error("STATUS offered without a status field")
	}
}

func TestGuestToTap(t *testing.T) {
	e := newEnv(t, ^uint64(0), 1500)
	for i, layout := range []string{"one", "split", "indirect"} {
		f := testnet.Frame([6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, guestMAC, []byte(fmt.Sprintf("guest to tap %d %s", i, bytes.Repeat([]byte{'.'}, 50))))
		e.tx(t, make([]byte, vnet.NetHdrSize), f, layout)
		if got := e.ns.Recv(t); !bytes.Equal(got, f) {
			t.Fatalf("%s: link got %x, want %x", layout, got, f)
		}
	}
	if m := e.dev.Metrics(); m.TxFrames.Load() != 3 {
		t.Fatalf("TxFrames = %d", m.TxFrames.Load())
	}
}

func TestTapToGuest(t *testing.T) {
	for _, tc := range []struct {
		name string
		want uint64
	}{
		{"plain buffers", ^uint64(0) &^ (1 << vnet.FeatureMrgRxbuf)},
		{"mergeable buffers", ^uint64(0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, tc.want, 1500)
			e.postRx(t, 8, 2048)
			for i := range 3 {
				f := testnet.Frame(guestMAC, hostMAC, []byte(fmt.Sprintf("tap to guest %d, padded to a minimum frame....", i)))
				e.ns.Send(t, f)
				hdr, got, nb := e.recvFrame(t)
				if !bytes.Equal(got, f) || nb != 1 || hdr[0] != 0 || hdr[1] != 0 {
					t.Fatalf("guest got hdr %x frame %x (%d buffers), want %x", hdr, got, nb, f)
				}
			}
			if e.irq.Count() == 0 {
				t.Fatal("no interrupt")
			}
		})
	}
}

// TestMergeableRx sends a jumbo frame that needs three 1526-byte buffers; it
// waits, unpublished, until enough buffers are posted.
func TestMergeableRx(t *testing.T) {
	e := newEnv(t, ^uint64(0), 9000)
	payload := make([]byte, 4000)
	for i := range payload {
		payload[i] = byte(i)
	}
	f := testnet.Frame(guestMAC, hostMAC, payload)
	e.postRx(t, 1, 1526)
	e.ns.Send(t, f)
	if _, ok := e.drv.TryWaitUsed(vnet.RxQueue, 300*time.Millisecond); ok {
		t.Fatal("part of a frame was published before it fit")
	}
	e.postRx(t, 4, 1526)
	hdr, got, nb := e.recvFrame(t)
	if nb != 3 || !bytes.Equal(got, f) || binary.LittleEndian.Uint16(hdr[10:]) != 3 {
		t.Fatalf("num_buffers %d, frame equal %v", nb, bytes.Equal(got, f))
	}
}

func TestRxOversizeDropped(t *testing.T) {
	e := newEnv(t, ^uint64(0)&^(1<<vnet.FeatureMrgRxbuf), 1500)
	e.postRx(t, 2, 256)
	e.ns.Send(t, testnet.Frame(guestMAC, hostMAC, make([]byte, 1000))) // cannot fit 256 bytes
	small := testnet.Frame(guestMAC, hostMAC, []byte("fits in 256 bytes, padded to the minimum.."))
	e.ns.Send(t, small)
	if _, got, _ := e.recvFrame(t); !bytes.Equal(got, small) {
		t.Fatalf("got %x", got)
	}
	if e.dev.Metrics().RxDropped.Load() != 1 {
		t.Fatalf("RxDropped = %d", e.dev.Metrics().RxDropped.Load())
	}
}

// TestOffloads checks that negotiated guest offloads reach the tap as
// TUNSETOFFLOAD flags, visible as the kernel device's features.
func TestOffloads(t *testing.T) {
	for _, tc := range []struct {
		name        string
		want        uint64
		tso, txcsum bool
	}{
		{"none", 1 << virtio.FeatureVersion1, false, false},
		{"csum", 1<<virtio.FeatureVersion1 | 1<<vnet.FeatureGuestCsum, false, true},
		{"tso", 1<<virtio.FeatureVersion1 | 1<<vnet.FeatureGuestCsum | 1<<vnet.FeatureGuestTSO4 | 1<<vnet.FeatureGuestTSO6, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, tc.want, 1500)
			if got := e.ns.Ethtool(t, unix.ETHTOOL_GTSO) != 0; got != tc.tso {
				t.Errorf("tap TSO = %v, want %v", got, tc.tso)
			}
			if got := e.ns.Ethtool(t, unix.ETHTOOL_GTXCSUM) != 0; got != tc.txcsum {
				t.Errorf("tap checksum offload = %v, want %v", got, tc.txcsum)
			}
			e.drv.W32(testdriver.RegStatus, 0) // reset clears them
			if e.ns.Ethtool(t, unix.ETHTOOL_GTSO) != 0 || e.ns.Ethtool(t, unix.ETHTOOL_GTXCSUM) != 0 {
				t.Error("offloads survived a reset")
			}
		})
	}
	// A driver asking for TSO without checksum offload breaks the spec's
	// feature dependencies; the tap refuses and the device needs a reset.
	e := newEnv(t, 1<<virtio.FeatureVersion1, 1500)
	e.drv.W32(testdriver.RegStatus, 0)
	d := testdriver.Probe(t, e.tr, e.mem, e.irq, uint32(virtio.DeviceNet), 1<<virtio.FeatureVersion1|1<<vnet.FeatureGuestTSO4)
	d.SetupQueue(t, 0, 8)
	d.SetupQueue(t, 1, 8)
	d.W32(testdriver.RegStatus, 0xf)
	if d.R32(testdriver.RegStatus)&virtio.StatusDeviceNeedsReset == 0 {
		t.Fatal("TSO without CSUM accepted")
	}
}

func TestHostileTx(t *testing.T) {
	e := newEnv(t, ^uint64(0), 1500)
	good := testnet.Frame(hostMAC, guestMAC, []byte("still working after hostile input........."))
	badGSO := make([]byte, vnet.NetHdrSize)
	badGSO[1] = 0x7f // gso_type no kernel knows
	top := uint64(len(e.mem.Raw))
	for _, tc := range []struct {
		name   string
		bufs   func() []testdriver.Buf
		metric func() uint64
	}{
		{"shorter than header", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: e.mem.Alloc(t, 5, 1), Len: 5}}
		}, e.dev.Metrics().TxMalformed.Load},
		{"write-only frame", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: e.mem.Alloc(t, 100, 1), Len: 100, Write: true}}
		}, e.dev.Metrics().TxMalformed.Load},
		{"longer than any frame", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: e.mem.Alloc(t, 70000, 1), Len: 70000}}
		}, e.dev.Metrics().TxMalformed.Load},
		{"outside memory", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: top - 10, Len: 100}}
		}, e.dev.Metrics().InvalidChains.Load},
		{"header the kernel refuses", func() []testdriver.Buf {
			b := append(append([]byte{}, badGSO...), good...)
			gpa := e.mem.Alloc(t, uint64(len(b)), 1)
			e.mem.Put(gpa, b)
			return []testdriver.Buf{{Addr: gpa, Len: uint32(len(b))}}
		}, e.dev.Metrics().TxErrors.Load},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := tc.metric()
			e.drv.Queues[vnet.TxQueue].AddChain(tc.bufs()...)
			e.drv.Kick(vnet.TxQueue)
			if u := e.drv.WaitUsed(t, vnet.TxQueue, waitFor); u.Len != 0 {
				t.Fatalf("used len %d", u.Len)
			}
			if tc.metric() != before+1 {
				t.Fatalf("not counted: %d → %d", before, tc.metric())
			}
			e.tx(t, make([]byte, vnet.NetHdrSize), good, "one")
			if got := e.ns.Recv(t); !bytes.Equal(got, good) {
				t.Fatal("device broken after hostile frame")
			}
		})
	}
	// An rx buffer too small for the header is returned unused.
	small := e.mem.Alloc(t, 8, 1)
	h, _ := e.drv.Queues[vnet.RxQueue].AddChain(testdriver.Buf{Addr: small, Len: 8, Write: true})
	e.rx[uint32(h)] = small
	e.postRx(t, 1, 2048)
	f := testnet.Frame(guestMAC, hostMAC, []byte("after a tiny rx buffer, padded to a minimum"))
	e.ns.Send(t, f)
	u := e.drv.WaitUsed(t, vnet.RxQueue, waitFor)
	if u.ID != uint32(h) || u.Len != 0 {
		t.Fatalf("tiny buffer: used %+v", u)
	}
	if _, got, _ := e.recvFrame(t); !bytes.Equal(got, f) {
		t.Fatal("frame lost after tiny buffer")
	}
}

func TestSnapshotRestore(t *testing.T) {
	e := newEnv(t, ^uint64(0), 1500)
	e.postRx(t, 4, 2048)
	e.tr.Pause()
	if _, err := e.tr.Save(); err != nil {
		t.Fatal(err)
	}
	devState := e.dev.Save()
	if devState.MAC != guestMAC {
		t.Fatalf("state %+v", devState)
	}
	f := testnet.Frame(guestMAC, hostMAC, []byte("sent while paused, delivered after resume"))
	e.ns.Send(t, f)
	if _, ok := e.drv.TryWaitUsed(vnet.RxQueue, 200*time.Millisecond); ok {
		t.Fatal("paused device delivered a frame")
	}
	if err := e.tr.Resume(); err != nil {
		t.Fatal(err)
	}
	if _, got, _ := e.recvFrame(t); !bytes.Equal(got, f) {
		t.Fatal("frame lost across pause")
	}
	// Restore into a new transport over the same device and memory.
	e.tr.Pause()
	st, err := e.tr.Save()
	if err != nil {
		t.Fatal(err)
	}
	e.tr.Close()
	tr2, err := mmio.New(e.dev, mmio.Config{Memory: e.mem, Interrupt: e.irq})
	if err != nil {
		t.Fatal(err)
	}
	defer tr2.Close()
	if err := e.dev.Restore(devState); err != nil {
		t.Fatal(err)
	}
	if err := tr2.Restore(st); err != nil {
		t.Fatal(err)
	}
	e.drv.Dev = tr2
	f2 := testnet.Frame(guestMAC, hostMAC, []byte("after restore............................."))
	e.ns.Send(t, f2)
	if _, got, _ := e.recvFrame(t); !bytes.Equal(got, f2) {
		t.Fatal("frame lost after restore")
	}
}
