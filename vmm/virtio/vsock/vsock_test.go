package vsock_test

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/internal/testdriver"
	"github.com/cubicle-dev/cubicle/vmm/virtio/mmio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

const (
	guestCID  = 3
	waitFor   = 5 * time.Second
	rxBufSize = 4096
)

// pkt is the test guest's view of a packet (its own transcription of struct
// virtio_vsock_hdr, §5.10.6).
type pkt struct {
	srcCID, dstCID   uint64
	srcPort, dstPort uint32
	typ, op          uint16
	flags            uint32
	bufAlloc, fwdCnt uint32
	payload          []byte
}

func (p pkt) encode() []byte {
	b := make([]byte, 44+len(p.payload))
	binary.LittleEndian.PutUint64(b[0:], p.srcCID)
	binary.LittleEndian.PutUint64(b[8:], p.dstCID)
	binary.LittleEndian.PutUint32(b[16:], p.srcPort)
	binary.LittleEndian.PutUint32(b[20:], p.dstPort)
	binary.LittleEndian.PutUint32(b[24:], uint32(len(p.payload)))
	binary.LittleEndian.PutUint16(b[28:], p.typ)
	binary.LittleEndian.PutUint16(b[30:], p.op)
	binary.LittleEndian.PutUint32(b[32:], p.flags)
	binary.LittleEndian.PutUint32(b[36:], p.bufAlloc)
	binary.LittleEndian.PutUint32(b[40:], p.fwdCnt)
	copy(b[44:], p.payload)
	return b
}

func decode(b []byte) pkt {
	p := pkt{
		srcCID: binary.LittleEndian.Uint64(b[0:]), dstCID: binary.LittleEndian.Uint64(b[8:]),
		srcPort: binary.LittleEndian.Uint32(b[16:]), dstPort: binary.LittleEndian.Uint32(b[20:]),
		typ: binary.LittleEndian.Uint16(b[28:]), op: binary.LittleEndian.Uint16(b[30:]),
		flags: binary.LittleEndian.Uint32(b[32:]), bufAlloc: binary.LittleEndian.Uint32(b[36:]),
		fwdCnt: binary.LittleEndian.Uint32(b[40:]),
	}
	n := binary.LittleEndian.Uint32(b[24:])
	p.payload = append([]byte(nil), b[44:44+n]...)
	return p
}

// guest is the test's guest: a virtio-vsock driver over the test driver.
type guest struct {
	t    *testing.T
	path string
	dev  *vsock.Device
	tr   *mmio.Transport
	mem  *testdriver.Mem
	irq  *testdriver.IRQ
	drv  *testdriver.Driver
	rx   map[uint32]uint64 // rx head → buffer
	ev   map[uint32]uint64 // event head → buffer
	// repost makes recv post each rx buffer again once read.
	repost bool
}

func newGuest(t *testing.T) *guest { return newGuestRx(t, 32) }

// newGuestRx is newGuest with rxBufs receive buffers posted up front.
func newGuestRx(t *testing.T, rxBufs int) *guest {
	t.Helper()
	g := &guest{t: t, path: filepath.Join(t.TempDir(), "v.sock"), mem: testdriver.NewMem(t, 8<<20), irq: testdriver.NewIRQ()}
	g.start()
	g.drv = testdriver.Init(t, g.tr, g.mem, g.irq, uint32(virtio.DeviceVsock), ^uint64(0), 64, 64, 8)
	g.rx, g.ev = map[uint32]uint64{}, map[uint32]uint64{}
	if cid := binary.LittleEndian.Uint64(g.drv.ReadConfig(0, 8)); cid != guestCID {
		t.Fatalf("guest_cid = %d", cid)
	}
	g.repost = true
	for range rxBufs {
		g.postRx(g.mem.Alloc(t, rxBufSize, 8))
	}
	for range 4 {
		gpa := g.mem.Alloc(t, 4, 4)
		h, _ := g.drv.Queues[vsock.EventQueue].AddChain(testdriver.Buf{Addr: gpa, Len: 4, Write: true})
		g.ev[uint32(h)] = gpa
	}
	g.drv.Kick(vsock.RxQueue)
	g.drv.Kick(vsock.EventQueue)
	return g
}

func (g *guest) start() {
	g.t.Helper()
	dev, err := vsock.New(vsock.Config{GuestCID: guestCID, UDSPath: g.path})
	if err != nil {
		g.t.Fatal(err)
	}
	tr, err := mmio.New(dev, mmio.Config{Base: 0xd0002000, IRQ: 7, Memory: g.mem, Interrupt: g.irq})
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() {
		tr.Close()
		if err := dev.Close(); err != nil {
			g.t.Error(err)
		}
	})
	g.dev, g.tr = dev, tr
	if g.drv != nil {
		g.drv.Dev = tr
	}
}

func (g *guest) postRx(gpa uint64) {
	h, ok := g.drv.Queues[vsock.RxQueue].AddChain(testdriver.Buf{Addr: gpa, Len: rxBufSize, Write: true})
	if !ok {
		g.t.Fatal("rx queue full")
	}
	g.rx[uint32(h)] = gpa
}

// send posts one packet on the tx queue, header and payload in one
// descriptor or split in two, and waits until the device consumed it.
func (g *guest) send(p pkt, split bool) {
	g.t.Helper()
	b := p.encode()
	gpa := g.mem.Alloc(g.t, uint64(len(b)), 8)
	g.mem.Put(gpa, b)
	bufs := []testdriver.Buf{{Addr: gpa, Len: uint32(len(b))}}
	if split && len(p.payload) > 0 {
		bufs = []testdriver.Buf{{Addr: gpa, Len: 44}, {Addr: gpa + 44, Len: uint32(len(p.payload))}}
	}
	g.sendBufs(bufs...)
}

func (g *guest) sendBufs(bufs ...testdriver.Buf) {
	g.t.Helper()
	if _, ok := g.drv.Queues[vsock.TxQueue].AddChain(bufs...); !ok {
		g.t.Fatal("tx queue full")
	}
	g.drv.Kick(vsock.TxQueue)
	g.drv.WaitUsed(g.t, vsock.TxQueue, waitFor)
}

// recv waits for the next packet from the device and reposts its buffer.
func (g *guest) recv() pkt {
	g.t.Helper()
	p, ok := g.tryRecv(waitFor)
	if !ok {
		g.t.Fatal("no packet from the device")
	}
	return p
}

func (g *guest) tryRecv(d time.Duration) (pkt, bool) {
	g.t.Helper()
	u, ok := g.drv.TryWaitUsed(vsock.RxQueue, d)
	if !ok {
		return pkt{}, false
	}
	gpa, known := g.rx[u.ID]
	if !known || u.Len < 44 || u.Len > rxBufSize {
		g.t.Fatalf("bad rx used entry %+v", u)
	}
	delete(g.rx, u.ID)
	p := decode(g.mem.Bytes(gpa, uint64(u.Len)))
	if 44+uint32(len(p.payload)) != u.Len {
		g.t.Fatalf("used len %d for a %d-byte payload", u.Len, len(p.payload))
	}
	if g.repost {
		g.postRx(gpa)
		g.drv.Kick(vsock.RxQueue)
	}
	return p, true
}

// recvOp receives packets until one with op arrives, failing on anything but
// credit traffic in between.
func (g *guest) recvOp(op uint16) pkt {
	g.t.Helper()
	for {
		p := g.recv()
		if p.op == op {
			return p
		}
		if p.op != vsock.OpCreditUpdate && p.op != vsock.OpCreditRequest {
			g.t.Fatalf("got op %d (%+v), want op %d", p.op, p, op)
		}
	}
}

func (g *guest) to(hostPort, guestPort uint32, op uint16) pkt {
	return pkt{srcCID: guestCID, dstCID: vsock.HostCID, srcPort: guestPort, dstPort: hostPort,
		typ: vsock.TypeStream, op: op, bufAlloc: 1 << 20}
}

// hostConnect opens a host-initiated connection to guestPort and completes
// the handshake on both sides; it returns the host socket and the host port.
func (g *guest) hostConnect(guestPort uint32, bufAlloc uint32) (net.Conn, *bufio.Reader, uint32) {
	g.t.Helper()
	c, err := net.Dial("unix", g.path)
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c, "CONNECT %d\n", guestPort)
	req := g.recvOp(vsock.OpRequest)
	if req.srcCID != vsock.HostCID || req.dstCID != guestCID || req.dstPort != guestPort || req.srcPort < vsock.HostPortBase ||
		req.bufAlloc != vsock.ConnBufSize || req.typ != vsock.TypeStream {
		g.t.Fatalf("REQUEST = %+v", req)
	}
	resp := g.to(req.srcPort, guestPort, vsock.OpResponse)
	resp.bufAlloc = bufAlloc
	g.send(resp, false)
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil || line != fmt.Sprintf("OK %d\n", req.srcPort) {
		g.t.Fatalf("host got %q, %v", line, err)
	}
	return c, r, req.srcPort
}

func TestHostInitiatedEcho(t *testing.T) {
	g := newGuest(t)
	for i, split := range []bool{false, true} {
		guestPort := uint32(1234 + i)
		c, r, hostPort := g.hostConnect(guestPort, 1<<20)
		msg := []byte(strings.Repeat("hello from the host ", 10))
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		var got []byte
		for len(got) < len(msg) {
			p := g.recvOp(vsock.OpRW)
			if p.srcPort != hostPort || p.dstPort != guestPort {
				t.Fatalf("RW ports %d→%d", p.srcPort, p.dstPort)
			}
			got = append(got, p.payload...)
		}
		if !bytes.Equal(got, msg) {
			t.Fatalf("guest got %q", got)
		}
		// Echo it back, header and payload split or not.
		echo := g.to(hostPort, guestPort, vsock.OpRW)
		echo.payload = got
		g.send(echo, split)
		back := make([]byte, len(msg))
		if _, err := io.ReadFull(r, back); err != nil || !bytes.Equal(back, msg) {
			t.Fatalf("host got %q, %v", back, err)
		}
		// The guest closes: SHUTDOWN both ways, the device resets, the host
		// sees end of stream.
		sd := g.to(hostPort, guestPort, vsock.OpShutdown)
		sd.flags = vsock.ShutdownRcv | vsock.ShutdownSend
		g.send(sd, false)
		rst := g.recvOp(vsock.OpRst)
		if rst.srcPort != hostPort || rst.dstPort != guestPort {
			t.Fatalf("RST %+v", rst)
		}
		if n, err := r.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Fatalf("host read after close = %d, %v", n, err)
		}
	}
	m := g.dev.Metrics()
	if m.ConnsOpened.Load() != 2 || m.ConnsClosed.Load() != 2 || m.HostConnects.Load() != 2 {
		t.Fatalf("metrics opened %d closed %d", m.ConnsOpened.Load(), m.ConnsClosed.Load())
	}
}

func TestGuestInitiated(t *testing.T) {
	g := newGuest(t)
	ln, err := net.Listen("unix", g.path+"_5000")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	g.send(g.to(5000, 40000, vsock.OpRequest), false)
	resp := g.recvOp(vsock.OpResponse)
	if resp.srcPort != 5000 || resp.dstPort != 40000 || resp.srcCID != vsock.HostCID || resp.dstCID != guestCID {
		t.Fatalf("RESPONSE %+v", resp)
	}
	ln.(*net.UnixListener).SetDeadline(time.Now().Add(waitFor))
	hc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	hc.SetDeadline(time.Now().Add(20 * time.Second))
	ping := g.to(5000, 40000, vsock.OpRW)
	ping.payload = []byte("ping")
	g.send(ping, true)
	buf := make([]byte, 4)
	if _, err := io.ReadFull(hc, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("host got %q, %v", buf, err)
	}
	hc.Write([]byte("pong"))
	if p := g.recvOp(vsock.OpRW); string(p.payload) != "pong" || p.srcPort != 5000 || p.dstPort != 40000 {
		t.Fatalf("guest got %+v", p)
	}
	// The guest half-closes: the host reads end of stream but can still
	// answer.
	sd := g.to(5000, 40000, vsock.OpShutdown)
	sd.flags = vsock.ShutdownSend
	g.send(sd, false)
	if n, err := hc.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("host read after guest SHUTDOWN(SEND) = %d, %v", n, err)
	}
	hc.Write([]byte("bye"))
	if p := g.recvOp(vsock.OpRW); string(p.payload) != "bye" {
		t.Fatalf("guest got %q", p.payload)
	}
	// The host closes: the guest is told nothing more will come.
	hc.Close()
	if p := g.recvOp(vsock.OpShutdown); p.flags != vsock.ShutdownSend {
		t.Fatalf("SHUTDOWN flags %d", p.flags)
	}
	g.send(g.to(5000, 40000, vsock.OpRst), false)
	// The connection is gone: data for it is answered with RST.
	g.send(ping, false)
	g.recvOp(vsock.OpRst)
}

func TestGuestConnectRefused(t *testing.T) {
	g := newGuest(t)
	g.send(g.to(5001, 40001, vsock.OpRequest), false)
	rst := g.recvOp(vsock.OpRst)
	if rst.srcPort != 5001 || rst.dstPort != 40001 {
		t.Fatalf("RST %+v", rst)
	}
	if g.dev.Metrics().ConnectFailures.Load() != 1 {
		t.Fatal("refusal not counted")
	}
}

// TestCreditHostToGuest: the guest advertises a 1000-byte buffer; the device
// never sends more than that until the guest returns credit.
func TestCreditHostToGuest(t *testing.T) {
	g := newGuest(t)
	const window = 1000
	c, _, hostPort := g.hostConnect(77, window)
	msg := make([]byte, 5000)
	for i := range msg {
		msg[i] = byte(i * 13)
	}
	go c.Write(msg)
	var got []byte
	var fwd uint32
	for len(got) < len(msg) {
		// Take everything the current credit allows.
		inWindow := 0
		for {
			p, ok := g.tryRecv(300 * time.Millisecond)
			if !ok {
				break
			}
			switch p.op {
			case vsock.OpRW:
				got = append(got, p.payload...)
				inWindow += len(p.payload)
			case vsock.OpCreditRequest:
			default:
				t.Fatalf("unexpected op %d", p.op)
			}
			if uint32(len(got))-fwd > window {
				t.Fatalf("device sent %d bytes beyond the %d-byte credit", uint32(len(got))-fwd-window, window)
			}
		}
		if inWindow == 0 {
			t.Fatalf("stalled at %d bytes", len(got))
		}
		// The guest application read it all: return the credit.
		fwd = uint32(len(got))
		cu := g.to(hostPort, 77, vsock.OpCreditUpdate)
		cu.bufAlloc, cu.fwdCnt = window, fwd
		g.send(cu, false)
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("data corrupted")
	}
}

// TestCreditShrink: the guest shrinks its buffer while host data already
// waits in the device; the device sends only what the new credit allows.
func TestCreditShrink(t *testing.T) {
	g := newGuestRx(t, 1)
	g.repost = false
	c, _, hostPort := g.hostConnect(66, 1000) // takes the only rx buffer
	msg := bytes.Repeat([]byte("0123456789"), 100)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // the device reads it; no rx buffer yet
	shrink := g.to(hostPort, 66, vsock.OpCreditUpdate)
	shrink.bufAlloc = 100
	g.send(shrink, false)
	for range 4 {
		g.postRx(g.mem.Alloc(t, rxBufSize, 8))
	}
	g.drv.Kick(vsock.RxQueue)
	var got []byte
	for {
		p, ok := g.tryRecv(300 * time.Millisecond)
		if !ok {
			break
		}
		if p.op == vsock.OpRW {
			got = append(got, p.payload...)
		}
	}
	if len(got) != 100 || !bytes.Equal(got, msg[:100]) {
		t.Fatalf("guest got %d bytes under a 100-byte credit", len(got))
	}
	g.repost = true
	for range 4 {
		g.postRx(g.mem.Alloc(t, rxBufSize, 8))
	}
	grow := g.to(hostPort, 66, vsock.OpCreditUpdate)
	grow.bufAlloc, grow.fwdCnt = 1000, 100
	g.send(grow, false)
	for len(got) < len(msg) {
		if p := g.recv(); p.op == vsock.OpRW {
			got = append(got, p.payload...)
		}
	}
	if !bytes.Equal(got, msg) {
		t.Fatal("data corrupted")
	}
}

// TestCreditGuestToHost: the device returns credit as the host reads, and
// resets a guest that sends beyond the credit it was given.
func TestCreditGuestToHost(t *testing.T) {
	g := newGuest(t)
	c, r, hostPort := g.hostConnect(88, 1<<20)
	chunk := bytes.Repeat([]byte{0x5a}, 50000)
	for range 4 { // 200000 bytes: within the 256 KiB the device advertised
		p := g.to(hostPort, 88, vsock.OpRW)
		p.payload = chunk
		g.send(p, true)
	}
	// The writer hands the data to the host socket; the guest's view of the
	// free space fell under the threshold, so a credit update comes.
	var upd pkt
	for upd.op != vsock.OpCreditUpdate {
		upd = g.recv()
	}
	if upd.fwdCnt == 0 || upd.bufAlloc != vsock.ConnBufSize {
		t.Fatalf("CREDIT_UPDATE %+v", upd)
	}
	if _, err := io.ReadFull(r, make([]byte, 200000)); err != nil {
		t.Fatal(err)
	}
	// A credit request is answered with the current counters, which reach
	// everything the host read.
	deadline := time.Now().Add(waitFor)
	for {
		g.send(g.to(hostPort, 88, vsock.OpCreditRequest), false)
		p := g.recvOp(vsock.OpCreditUpdate)
		if p.fwdCnt == 200000 {
			break
		}
		if p.fwdCnt > 200000 || time.Now().After(deadline) {
			t.Fatalf("fwd_cnt = %d, want 200000", p.fwdCnt)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Now overrun: post five 64 KiB packets in one batch, more than the
	// 256 KiB buffer, before the device can drain any of it.
	big := bytes.Repeat([]byte{1}, vsock.MaxPayload)
	vq := g.drv.Queues[vsock.TxQueue]
	vq.Hold = true
	for range 5 {
		p := g.to(hostPort, 88, vsock.OpRW)
		p.payload = big
		b := p.encode()
		gpa := g.mem.Alloc(t, uint64(len(b)), 8)
		g.mem.Put(gpa, b)
		vq.AddChain(testdriver.Buf{Addr: gpa, Len: uint32(len(b))})
	}
	vq.Hold = false
	vq.Flush()
	g.drv.Kick(vsock.TxQueue)
	g.recvOp(vsock.OpRst)
	if g.dev.Metrics().CreditViolations.Load() != 1 {
		t.Fatal("credit violation not counted")
	}
	c.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := io.Copy(io.Discard, r); err != nil {
		t.Fatalf("host socket not closed cleanly: %v", err)
	}
}

// TestHostileTx sends packets no driver should. Each is dropped or answered
// with RST; a probe after each shows the device kept going and sent nothing
// else.
func TestHostileTx(t *testing.T) {
	g := newGuest(t)
	probe := g.to(9999, 9999, vsock.OpCreditRequest) // unknown connection: RST
	top := uint64(len(g.mem.Raw))
	raw := func(p pkt, lenField uint32) []byte {
		b := p.encode()
		binary.LittleEndian.PutUint32(b[24:], lenField)
		return b
	}
	put := func(b []byte) uint64 {
		gpa := g.mem.Alloc(t, uint64(len(b))+1, 8)
		g.mem.Put(gpa, b)
		return gpa
	}
	for _, tc := range []struct {
		name    string
		bufs    func() []testdriver.Buf
		wantRst bool
	}{
		{"short header", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: put(make([]byte, 20)), Len: 20}}
		}, false},
		{"length beyond buffer", func() []testdriver.Buf {
			b := raw(g.to(1, 2, vsock.OpRW), 100)
			return []testdriver.Buf{{Addr: put(b), Len: uint32(len(b))}}
		}, false},
		{"length beyond maximum", func() []testdriver.Buf {
			b := raw(g.to(1, 2, vsock.OpRW), vsock.MaxPayload+1)
			return []testdriver.Buf{{Addr: put(b), Len: uint32(len(b))}}
		}, false},
		{"header write-only", func() []testdriver.Buf {
			b := g.to(1, 2, vsock.OpRequest).encode()
			return []testdriver.Buf{{Addr: put(b), Len: 44, Write: true}}
		}, false},
		{"buffer outside memory", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: top - 8, Len: 44}}
		}, false},
		{"spoofed source CID", func() []testdriver.Buf {
			p := g.to(5001, 1, vsock.OpRequest)
			p.srcCID = 99
			return []testdriver.Buf{{Addr: put(p.encode()), Len: 44}}
		}, false},
		{"other destination CID", func() []testdriver.Buf {
			p := g.to(5001, 1, vsock.OpRequest)
			p.dstCID = 7
			return []testdriver.Buf{{Addr: put(p.encode()), Len: 44}}
		}, true},
		{"seqpacket", func() []testdriver.Buf {
			p := g.to(5001, 1, vsock.OpRequest)
			p.typ = vsock.TypeSeqpacket
			return []testdriver.Buf{{Addr: put(p.encode()), Len: 44}}
		}, true},
		{"unknown op", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: put(g.to(1, 2, 99).encode()), Len: 44}}
		}, true},
		{"data without connection", func() []testdriver.Buf {
			p := g.to(1, 2, vsock.OpRW)
			p.payload = []byte("x")
			return []testdriver.Buf{{Addr: put(p.encode()), Len: 45}}
		}, true},
		{"reset without connection", func() []testdriver.Buf {
			return []testdriver.Buf{{Addr: put(g.to(1, 2, vsock.OpRst).encode()), Len: 44}}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g.t = t
			g.sendBufs(tc.bufs()...)
			if tc.wantRst {
				if p := g.recv(); p.op != vsock.OpRst || p.dstPort == 9999 {
					t.Fatalf("got %+v, want RST for the hostile packet", p)
				}
			}
			g.send(probe, false)
			if p := g.recv(); p.op != vsock.OpRst || p.srcPort != 9999 {
				t.Fatalf("got %+v, want the probe's RST", p)
			}
		})
	}
}

func TestSmallRxBuffer(t *testing.T) {
	mem := testdriver.NewMem(t, 1<<20)
	irq := testdriver.NewIRQ()
	dev, err := vsock.New(vsock.Config{GuestCID: guestCID, UDSPath: filepath.Join(t.TempDir(), "s")})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	tr, _ := mmio.New(dev, mmio.Config{Memory: mem, Interrupt: irq})
	defer tr.Close()
	d := testdriver.Init(t, tr, mem, irq, uint32(virtio.DeviceVsock), ^uint64(0), 8, 8, 8)
	small, good := mem.Alloc(t, 20, 8), mem.Alloc(t, 4096, 8)
	d.Queues[0].AddChain(testdriver.Buf{Addr: small, Len: 20, Write: true})
	d.Queues[0].AddChain(testdriver.Buf{Addr: good, Len: 4096, Write: true})
	p := pkt{srcCID: guestCID, dstCID: 2, srcPort: 1, dstPort: 2, typ: 1, op: vsock.OpCreditRequest}
	b := mem.Alloc(t, 44, 8)
	mem.Put(b, p.encode())
	d.Queues[1].AddChain(testdriver.Buf{Addr: b, Len: 44})
	d.Kick(1)
	if u := d.WaitUsed(t, 0, waitFor); u.Len != 0 {
		t.Fatalf("small buffer used len %d", u.Len)
	}
	if u := d.WaitUsed(t, 0, waitFor); u.Len != 44 || decode(mem.Bytes(good, 44)).op != vsock.OpRst {
		t.Fatalf("good buffer used len %d", u.Len)
	}
	if dev.Metrics().InvalidChains.Load() != 1 {
		t.Fatal("small buffer not counted")
	}
}

func TestBadHostConnect(t *testing.T) {
	g := newGuest(t)
	for _, line := range []string{"HELLO\n", "CONNECT x\n", "CONNECT 99999999999\n", strings.Repeat("C", 40)} {
		c, err := net.Dial("unix", g.path)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(waitFor))
		io.WriteString(c, line)
		// Closed by the device: EOF, or a reset if it left bytes unread.
		if n, err := c.Read(make([]byte, 8)); n != 0 || (err != io.EOF && !errors.Is(err, syscall.ECONNRESET)) {
			t.Fatalf("%q: read = %d, %v; want the connection closed", line, n, err)
		}
		c.Close()
	}
	// A connection the guest refuses.
	c, _ := net.Dial("unix", g.path)
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitFor))
	io.WriteString(c, "CONNECT 5\n")
	req := g.recvOp(vsock.OpRequest)
	g.send(g.to(req.srcPort, 5, vsock.OpRst), false)
	if n, err := c.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Fatalf("refused connection: read = %d, %v", n, err)
	}
}

func TestNoDriverRefusesHost(t *testing.T) {
	path := filepath.Join(t.TempDir(), "n")
	dev, err := vsock.New(vsock.Config{GuestCID: guestCID, UDSPath: path})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitFor))
	io.WriteString(c, "CONNECT 5\n")
	if n, err := c.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Fatalf("read = %d, %v; want EOF", n, err)
	}
	if _, err := vsock.New(vsock.Config{GuestCID: 2, UDSPath: path + "x"}); !errors.Is(err, vsock.ErrInvalidCID) {
		t.Fatalf("CID 2 accepted: %v", err)
	}
}

// TestRestoreSendsTransportReset snapshots a guest with an open connection
// and restores it into a new device: the connection is gone, the guest gets
// TRANSPORT_RESET, and new connections work. The first new connection, to
// the same guest port, waits until the guest has handled the event, and
// does not take the host port of the connection the guest may still hold
// (Linux would drop its REQUEST, or reset it with the event).
func TestRestoreSendsTransportReset(t *testing.T) {
	g := newGuest(t)
	c, r, hostPort := g.hostConnect(4242, 1<<20)
	g.tr.Pause()
	trState, err := g.tr.Save()
	if err != nil {
		t.Fatal(err)
	}
	devState := g.dev.Save()
	if devState.GuestCID != guestCID {
		t.Fatalf("state %+v", devState)
	}
	if err := g.tr.Close(); err != nil {
		t.Fatal(err)
	}
	if err := g.dev.Close(); err != nil {
		t.Fatal(err)
	}
	// The old process is gone: the host end sees the connection closed.
	c.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := r.ReadByte(); err != io.EOF {
		t.Fatalf("host read after device close: %v", err)
	}

	g.start()
	if err := g.dev.Restore(devState); err != nil {
		t.Fatal(err)
	}
	if err := g.tr.Restore(trState); err != nil {
		t.Fatal(err)
	}
	u := g.drv.WaitUsed(t, vsock.EventQueue, waitFor)
	if u.Len != 4 || binary.LittleEndian.Uint32(g.mem.Bytes(g.ev[u.ID], 4)) != vsock.EventTransportReset {
		t.Fatalf("event used %+v", u)
	}
	if g.dev.Metrics().TransportResets.Load() != 1 {
		t.Fatal("transport reset not counted")
	}
	// A host connection made before the guest handled the event waits.
	c1, err := net.Dial("unix", g.path)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	c1.SetDeadline(time.Now().Add(20 * time.Second))
	fmt.Fprintf(c1, "CONNECT 4242\n")
	if p, ok := g.tryRecv(300 * time.Millisecond); ok {
		t.Fatalf("the device sent %+v before the guest handled TRANSPORT_RESET", p)
	}
	// The guest handles it and posts the buffer again, as Linux does.
	if _, ok := g.drv.Queues[vsock.EventQueue].AddChain(testdriver.Buf{Addr: g.ev[u.ID], Len: 4, Write: true}); !ok {
		t.Fatal("event queue full")
	}
	g.drv.Kick(vsock.EventQueue)
	req := g.recvOp(vsock.OpRequest)
	if req.dstPort != 4242 || req.srcPort == hostPort || req.srcPort < vsock.HostPortBase {
		t.Fatalf("REQUEST after restore = %+v; the connection before the snapshot had host port %d", req, hostPort)
	}
	resp := g.to(req.srcPort, 4242, vsock.OpResponse)
	g.send(resp, false)
	r1 := bufio.NewReader(c1)
	if line, err := r1.ReadString('\n'); err != nil || line != fmt.Sprintf("OK %d\n", req.srcPort) {
		t.Fatalf("host got %q, %v", line, err)
	}
	// A second snapshot carries the port on again.
	if st := g.dev.Save(); st.NextHostPort <= req.srcPort {
		t.Fatalf("saved next host port %d, last used %d", st.NextHostPort, req.srcPort)
	}
	// Data on the old connection is refused.
	old := g.to(hostPort, 4242, vsock.OpRW)
	old.payload = []byte("stale")
	g.send(old, false)
	g.recvOp(vsock.OpRst)
	// A new connection works end to end.
	c2, r2, hp2 := g.hostConnect(4243, 1<<20)
	c2.Write([]byte("again"))
	if p := g.recvOp(vsock.OpRW); string(p.payload) != "again" {
		t.Fatalf("guest got %q", p.payload)
	}
	echo := g.to(hp2, 4243, vsock.OpRW)
	echo.payload = []byte("again")
	g.send(echo, false)
	buf := make([]byte, 5)
	if _, err := io.ReadFull(r2, buf); err != nil || string(buf) != "again" {
		t.Fatalf("host got %q, %v", buf, err)
	}
}

// TestDriverResetDropsConnections: a driver reset closes host sockets.
func TestDriverResetDropsConnections(t *testing.T) {
	g := newGuest(t)
	c, r, _ := g.hostConnect(1, 1<<20)
	g.drv.W32(testdriver.RegStatus, 0)
	c.SetReadDeadline(time.Now().Add(waitFor))
	if _, err := r.ReadByte(); err != io.EOF {
		t.Fatalf("host read after reset: %v", err)
	}
}

// TestRestoreHostPort: the host port a restored device goes on from, for
// snapshots with and without it, and one that is out of range.
func TestRestoreHostPort(t *testing.T) {
	for _, tc := range []struct {
		name     string
		next     uint32
		min, max uint32 // the first REQUEST's host port must be in [min, max]
		err      bool
	}{
		{"recorded", vsock.HostPortBase + 7, vsock.HostPortBase + 7, vsock.HostPortBase + 7, false},
		{"older snapshot", 0, vsock.HostPortBase + 1<<29, vsock.HostPortBase + 1<<30 - 1, false},
		{"below the range", 1234, 0, 0, true},
		{"end of the range", 0xffffffff, 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, err := vsock.New(vsock.Config{GuestCID: guestCID, UDSPath: filepath.Join(t.TempDir(), "v.sock")})
			if err != nil {
				t.Fatal(err)
			}
			defer dev.Close()
			err = dev.Restore(vsock.State{GuestCID: guestCID, NextHostPort: tc.next})
			if tc.err {
				if !errors.Is(err, vsock.ErrSnapshotMismatch) {
					t.Fatalf("Restore = %v, want ErrSnapshotMismatch", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p := dev.Save().NextHostPort; p < tc.min || p > tc.max {
				t.Fatalf("next host port %d, want [%d, %d]", p, tc.min, tc.max)
			}
		})
	}
}
