package blk_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	"github.com/cubicle-dev/cubicle/vmm/virtio/internal/testdriver"
	"github.com/cubicle-dev/cubicle/vmm/virtio/mmio"
)

const (
	diskSectors = 64
	waitFor     = 5 * time.Second
)

type env struct {
	path string
	dev  *blk.Device
	tr   *mmio.Transport
	mem  *testdriver.Mem
	irq  *testdriver.IRQ
	drv  *testdriver.Driver
}

// pattern is the initial content of sector s.
func pattern(s int) []byte { return bytes.Repeat([]byte{byte(s), byte(s * 7)}, blk.SectorSize/2) }

func newEnv(t *testing.T, ro bool) *env {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	var img []byte
	for s := range diskSectors {
		img = append(img, pattern(s)...)
	}
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	e := &env{path: path, mem: testdriver.NewMem(t, 4<<20), irq: testdriver.NewIRQ()}
	e.start(t, ro)
	e.drv = testdriver.Init(t, e.tr, e.mem, e.irq, uint32(virtio.DeviceBlock), ^uint64(0), 16)
	return e
}

func (e *env) start(t *testing.T, ro bool) {
	t.Helper()
	dev, err := blk.New(blk.Config{Path: e.path, ReadOnly: ro, Serial: "cubicle-disk-0"})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := mmio.New(dev, mmio.Config{Base: 0xd0000000, IRQ: 5, Memory: e.mem, Interrupt: e.irq})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tr.Close(); err != nil {
			t.Error(err)
		}
		if err := dev.Close(); err != nil {
			t.Error(err)
		}
	})
	e.dev, e.tr = dev, tr
}

func header(typ uint32, sector uint64) []byte {
	h := make([]byte, 16)
	binary.LittleEndian.PutUint32(h[0:], typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	return h
}

// submit posts bufs on the request queue, kicks, and returns the used entry.
func (e *env) submit(t *testing.T, bufs ...testdriver.Buf) testdriver.Used {
	t.Helper()
	vq := e.drv.Queues[0]
	head, ok := vq.AddChain(bufs...)
	if !ok {
		t.Fatal("queue full")
	}
	e.drv.Kick(0)
	u := e.drv.WaitUsed(t, 0, waitFor)
	if u.ID != uint32(head) {
		t.Fatalf("used id %d, want %d", u.ID, head)
	}
	return u
}

// request builds header, data and status buffers in guest memory, submits
// them, and returns the status byte, the used length and the data buffer.
func (e *env) request(t *testing.T, typ uint32, sector uint64, dataLen uint32, dataWrite bool, data []byte) (byte, uint32, uint64) {
	t.Helper()
	h := e.mem.Alloc(t, 16, 8)
	e.mem.Put(h, header(typ, sector))
	st := e.mem.Alloc(t, 1, 1)
	e.mem.Raw[st] = 0xee
	bufs := []testdriver.Buf{{Addr: h, Len: 16}}
	var d uint64
	if dataLen > 0 {
		d = e.mem.Alloc(t, uint64(dataLen), 8)
		e.mem.Put(d, data)
		bufs = append(bufs, testdriver.Buf{Addr: d, Len: dataLen, Write: dataWrite})
	}
	bufs = append(bufs, testdriver.Buf{Addr: st, Len: 1, Write: true})
	u := e.submit(t, bufs...)
	return e.mem.Raw[st], u.Len, d
}

func TestConfigSpace(t *testing.T) {
	for _, ro := range []bool{false, true} {
		e := newEnv(t, ro)
		cfg := e.drv.ReadConfig(0, 24)
		if c := binary.LittleEndian.Uint64(cfg[0:]); c != diskSectors {
			t.Errorf("capacity = %d", c)
		}
		if s := binary.LittleEndian.Uint32(cfg[12:]); s != blk.SegMax {
			t.Errorf("seg_max = %d", s)
		}
		if b := binary.LittleEndian.Uint32(cfg[20:]); b != blk.SectorSize {
			t.Errorf("blk_size = %d", b)
		}
		if got := e.drv.Features&(1<<blk.FeatureRO) != 0; got != ro {
			t.Errorf("RO feature = %v, want %v", got, ro)
		}
		if e.drv.Features&(1<<blk.FeatureFlush) == 0 {
			t.Error("FLUSH not offered")
		}
	}
}

func TestRequests(t *testing.T) {
	e := newEnv(t, false)
	newData := bytes.Repeat([]byte("cubicle!"), 128) // 2 sectors
	for _, tc := range []struct {
		name      string
		typ       uint32
		sector    uint64
		dataLen   uint32
		dataWrite bool
		data      []byte
		status    byte
		usedLen   uint32
		check     func(t *testing.T, d uint64)
	}{
		{"read one sector", blk.TypeIn, 3, 512, true, nil, blk.StatusOK, 513, func(t *testing.T, d uint64) {
			if !bytes.Equal(e.mem.Bytes(d, 512), pattern(3)) {
				t.Fatal("read data differs from the disk")
			}
		}},
		{"read last sectors", blk.TypeIn, diskSectors - 2, 1024, true, nil, blk.StatusOK, 1025, nil},
		{"write two sectors", blk.TypeOut, 10, 1024, false, newData, blk.StatusOK, 1, func(t *testing.T, d uint64) {
			f, _ := os.ReadFile(e.path)
			if !bytes.Equal(f[10*512:12*512], newData) || !bytes.Equal(f[12*512:13*512], pattern(12)) {
				t.Fatal("disk content after write is wrong")
			}
		}},
		{"read back write", blk.TypeIn, 10, 1024, true, nil, blk.StatusOK, 1025, func(t *testing.T, d uint64) {
			if !bytes.Equal(e.mem.Bytes(d, 1024), newData) {
				t.Fatal("read-back differs")
			}
		}},
		{"flush", blk.TypeFlush, 0, 0, false, nil, blk.StatusOK, 1, nil},
		{"get id", blk.TypeGetID, 0, 20, true, nil, blk.StatusOK, 21, func(t *testing.T, d uint64) {
			want := append([]byte("cubicle-disk-0"), make([]byte, 6)...)
			if !bytes.Equal(e.mem.Bytes(d, 20), want) {
				t.Fatalf("serial = %q", e.mem.Bytes(d, 20))
			}
		}},
		{"get id short buffer", blk.TypeGetID, 0, 4, true, nil, blk.StatusOK, 5, nil},
		{"discard unsupported", blk.TypeDiscard, 0, 16, false, make([]byte, 16), blk.StatusUnsupp, 1, nil},
		{"unknown type", 0x7fffffff, 0, 0, false, nil, blk.StatusUnsupp, 1, nil},
		{"read past end", blk.TypeIn, diskSectors - 1, 1024, true, nil, blk.StatusIOErr, 1, nil},
		{"read at end", blk.TypeIn, diskSectors, 512, true, nil, blk.StatusIOErr, 1, nil},
		{"sector overflow", blk.TypeIn, ^uint64(0) - 1, 1024, true, nil, blk.StatusIOErr, 1, nil},
		{"write past end", blk.TypeOut, diskSectors - 1, 1024, false, newData, blk.StatusIOErr, 1, nil},
		{"unaligned read", blk.TypeIn, 0, 100, true, nil, blk.StatusIOErr, 1, nil},
		{"unaligned write", blk.TypeOut, 0, 100, false, newData[:100], blk.StatusIOErr, 1, nil},
		{"zero-length read", blk.TypeIn, 0, 0, true, nil, blk.StatusOK, 1, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, used, d := e.request(t, tc.typ, tc.sector, tc.dataLen, tc.dataWrite, tc.data)
			if st != tc.status || used != tc.usedLen {
				t.Fatalf("status %d used %d, want %d/%d", st, used, tc.status, tc.usedLen)
			}
			if tc.check != nil {
				tc.check(t, d)
			}
		})
	}
	m := e.dev.Metrics()
	if m.Reads.Load() != 4 || m.Writes.Load() != 1 || m.IOErrors.Load() != 6 || m.Unsupported.Load() != 2 {
		t.Errorf("metrics reads %d writes %d ioerr %d unsupp %d", m.Reads.Load(), m.Writes.Load(), m.IOErrors.Load(), m.Unsupported.Load())
	}
	if e.irq.Count() == 0 {
		t.Error("no interrupt")
	}
}

func TestReadOnlyRefusesWrites(t *testing.T) {
	e := newEnv(t, true)
	before, _ := os.ReadFile(e.path)
	st, used, _ := e.request(t, blk.TypeOut, 0, 512, false, bytes.Repeat([]byte{0xaa}, 512))
	if st != blk.StatusIOErr || used != 1 {
		t.Fatalf("write on read-only disk: status %d used %d", st, used)
	}
	after, _ := os.ReadFile(e.path)
	if !bytes.Equal(before, after) {
		t.Fatal("read-only disk was modified")
	}
	if st, _, _ := e.request(t, blk.TypeFlush, 0, 0, false, nil); st != blk.StatusOK {
		t.Fatalf("flush on read-only disk: status %d", st)
	}
	if st, _, d := e.request(t, blk.TypeIn, 1, 512, true, nil); st != blk.StatusOK || !bytes.Equal(e.mem.Bytes(d, 512), pattern(1)) {
		t.Fatalf("read on read-only disk: status %d", st)
	}
}

// TestScatteredRequest splits the header and the data over several
// descriptors and uses an indirect table, as Linux does for large requests.
func TestScatteredRequest(t *testing.T) {
	e := newEnv(t, false)
	h := e.mem.Alloc(t, 16, 8)
	e.mem.Put(h, header(blk.TypeIn, 5))
	d1, d2, d3 := e.mem.Alloc(t, 100, 1), e.mem.Alloc(t, 700, 1), e.mem.Alloc(t, 224, 1)
	st := e.mem.Alloc(t, 1, 1)
	vq := e.drv.Queues[0]
	vq.AddIndirect(t,
		testdriver.Buf{Addr: h, Len: 5}, testdriver.Buf{Addr: h + 5, Len: 11},
		testdriver.Buf{Addr: d1, Len: 100, Write: true}, testdriver.Buf{Addr: d2, Len: 700, Write: true},
		testdriver.Buf{Addr: d3, Len: 224, Write: true}, testdriver.Buf{Addr: st, Len: 1, Write: true})
	e.drv.Kick(0)
	u := e.drv.WaitUsed(t, 0, waitFor)
	got := append(append(append([]byte{}, e.mem.Bytes(d1, 100)...), e.mem.Bytes(d2, 700)...), e.mem.Bytes(d3, 224)...)
	want := append(pattern(5), pattern(6)...)
	if u.Len != 1025 || e.mem.Raw[st] != blk.StatusOK || !bytes.Equal(got, want) {
		t.Fatalf("used %d status %d, data equal %v", u.Len, e.mem.Raw[st], bytes.Equal(got, want))
	}
	// Status byte at the end of the data descriptor rather than its own.
	buf := e.mem.Alloc(t, 513, 1)
	u = e.submit(t, testdriver.Buf{Addr: h, Len: 16}, testdriver.Buf{Addr: buf, Len: 513, Write: true})
	if u.Len != 513 || e.mem.Raw[buf+512] != blk.StatusOK || !bytes.Equal(e.mem.Bytes(buf, 512), pattern(5)) {
		t.Fatalf("combined data+status: used %d status %d", u.Len, e.mem.Raw[buf+512])
	}
}

// TestHostileRequests sends requests no driver should; each gets IOERR or is
// returned unused, and the device keeps working.
func TestHostileRequests(t *testing.T) {
	e := newEnv(t, false)
	h := e.mem.Alloc(t, 16, 8)
	e.mem.Put(h, header(blk.TypeIn, 0))
	st := e.mem.Alloc(t, 1, 1)
	top := uint64(len(e.mem.Raw))
	for _, tc := range []struct {
		name    string
		bufs    []testdriver.Buf
		usedLen uint32
		status  int // -1: no status written
	}{
		{"no writable status", []testdriver.Buf{{Addr: h, Len: 16}}, 0, -1},
		{"short header", []testdriver.Buf{{Addr: h, Len: 8}, {Addr: st, Len: 1, Write: true}}, 1, blk.StatusIOErr},
		{"header write-only", []testdriver.Buf{{Addr: h, Len: 16, Write: true}, {Addr: st, Len: 1, Write: true}}, 1, blk.StatusIOErr},
		{"data outside memory", []testdriver.Buf{{Addr: h, Len: 16}, {Addr: top - 256, Len: 512, Write: true}, {Addr: st, Len: 1, Write: true}}, 0, -1},
		{"huge data length", []testdriver.Buf{{Addr: h, Len: 16}, {Addr: 4096, Len: 0xfffffe00, Write: true}, {Addr: st, Len: 1, Write: true}}, 0, -1},
		{"zero-length everything", []testdriver.Buf{{Addr: h, Len: 0}, {Addr: st, Len: 0, Write: true}}, 0, -1},
		{"status outside memory", []testdriver.Buf{{Addr: h, Len: 16}, {Addr: 1 << 50, Len: 1, Write: true}}, 0, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e.mem.Raw[st] = 0xee
			u := e.submit(t, tc.bufs...)
			if u.Len != tc.usedLen {
				t.Fatalf("used len %d, want %d", u.Len, tc.usedLen)
			}
			if tc.status >= 0 && e.mem.Raw[st] != byte(tc.status) {
				t.Fatalf("status %d, want %d", e.mem.Raw[st], tc.status)
			}
			if tc.status < 0 && e.mem.Raw[st] != 0xee {
				t.Fatal("status written for a rejected chain")
			}
			if st, _, _ := e.request(t, blk.TypeIn, 1, 512, true, nil); st != blk.StatusOK {
				t.Fatalf("device broken after hostile request: status %d", st)
			}
		})
	}
	// A loop in the descriptor table.
	vq := e.drv.Queues[0]
	vq.SetDesc(15, h, 16, 1, 14)
	vq.SetDesc(14, st, 1, 1|2, 15)
	vq.Publish(15)
	e.drv.Kick(0)
	if u := e.drv.WaitUsed(t, 0, waitFor); u.ID != 15 || u.Len != 0 {
		t.Fatalf("loop: used %+v", u)
	}
	if st, _, _ := e.request(t, blk.TypeIn, 1, 512, true, nil); st != blk.StatusOK {
		t.Fatalf("device broken after loop: status %d", st)
	}
}

// TestSnapshotRestore pauses the device with a request already posted, saves
// it, and brings it up in a new device on the same guest memory, where the
// request completes.
func TestSnapshotRestore(t *testing.T) {
	e := newEnv(t, false)
	if st, _, _ := e.request(t, blk.TypeIn, 2, 512, true, nil); st != blk.StatusOK {
		t.Fatal("warm-up read failed")
	}
	if _, err := e.tr.Save(); !errors.Is(err, mmio.ErrNotPaused) {
		t.Fatalf("Save while running = %v", err)
	}
	e.tr.Pause()
	// Posted while paused: not served until restore.
	h := e.mem.Alloc(t, 16, 8)
	e.mem.Put(h, header(blk.TypeIn, 7))
	d := e.mem.Alloc(t, 512, 8)
	st := e.mem.Alloc(t, 1, 1)
	vq := e.drv.Queues[0]
	head, _ := vq.AddChain(testdriver.Buf{Addr: h, Len: 16}, testdriver.Buf{Addr: d, Len: 512, Write: true}, testdriver.Buf{Addr: st, Len: 1, Write: true})
	e.drv.Kick(0)
	if _, ok := e.drv.TryWaitUsed(0, 100*time.Millisecond); ok {
		t.Fatal("paused device served a request")
	}
	trState, err := e.tr.Save()
	if err != nil {
		t.Fatal(err)
	}
	devState := e.dev.Save()
	if trState.Queues[0].NextAvail != 1 || trState.Status != 0xf {
		t.Fatalf("saved state %+v", trState)
	}

	// A new VMM process: new device and transport over the same memory.
	old := e.tr
	e.start(t, false)
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	if err := e.dev.Restore(blk.State{Capacity: 1, Serial: "x"}); !errors.Is(err, blk.ErrSnapshotMismatch) {
		t.Fatalf("Restore of a mismatched snapshot = %v", err)
	}
	if err := e.dev.Restore(devState); err != nil {
		t.Fatal(err)
	}
	if err := e.tr.Restore(trState); err != nil {
		t.Fatal(err)
	}
	e.drv.Dev = e.tr
	u := e.drv.WaitUsed(t, 0, waitFor)
	if u.ID != uint32(head) || u.Len != 513 || e.mem.Raw[st] != blk.StatusOK || !bytes.Equal(e.mem.Bytes(d, 512), pattern(7)) {
		t.Fatalf("request after restore: used %+v status %d", u, e.mem.Raw[st])
	}
	if err := e.tr.Restore(trState); !errors.Is(err, mmio.ErrRestoreBusy) {
		t.Fatalf("second Restore = %v", err)
	}
	// And new requests still work.
	if st, _, _ := e.request(t, blk.TypeIn, 8, 512, true, nil); st != blk.StatusOK {
		t.Fatal("read after restore failed")
	}
}

func TestNewErrors(t *testing.T) {
	if _, err := blk.New(blk.Config{Path: filepath.Join(t.TempDir(), "missing")}); err == nil {
		t.Fatal("opened a missing disk")
	}
	p := filepath.Join(t.TempDir(), "d")
	os.WriteFile(p, make([]byte, 4096), 0o600)
	if _, err := blk.New(blk.Config{Path: p, Serial: "this serial is far too long"}); !errors.Is(err, blk.ErrSerialTooLong) {
		t.Fatalf("long serial: %v", err)
	}
}
