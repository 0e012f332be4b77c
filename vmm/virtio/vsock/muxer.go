package vsock

import (
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"time"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// muxer is the worker's state: the connections and the packets waiting for
// the guest. Only the worker goroutine touches it, except closeAll, which the
// device calls while the worker is stopped.
type muxer struct {
	d     *Device
	conns map[connKey]*conn
	// ctrl holds control packets (RESPONSE, RST, SHUTDOWN, credit) in order;
	// they go to the guest before any data.
	ctrl []ctrlPkt
	// ready holds connections with host data for the guest, round robin.
	ready        []*conn
	pendingReset bool // a TRANSPORT_RESET event is owed to the guest
	// resetUnacked: the TRANSPORT_RESET went out and the guest has not yet
	// shown that it handled it, by making an event buffer available again
	// (resetAvail is the event queue's available index when it went out).
	// Until then host-initiated REQUESTs wait in held: a REQUEST the guest
	// handled before the event would be answered with its old CID, or
	// become a socket that the event then resets.
	resetUnacked bool
	resetAvail   uint16
	held         []*conn

	rxq, txq, evq *queue.Queue
	sig           virtio.Signaler
	broken        bool
	chain         queue.Chain
}

// ctrlPkt is a control packet waiting for an rx buffer. For a live
// connection, the credit fields are filled in when it is written.
type ctrlPkt struct {
	hdr header
	c   *conn
}

func newMuxer(d *Device) *muxer {
	return &muxer{d: d, conns: map[connKey]*conn{}}
}

// run is the worker goroutine.
func (m *muxer) run(qs []*queue.Queue, sig virtio.Signaler, stop <-chan struct{}) {
	m.rxq, m.txq, m.evq, m.sig = qs[RxQueue], qs[TxQueue], qs[EventQueue], sig
	m.broken = false
	for {
		m.pump()
		select {
		case <-stop:
			return
		case <-m.d.kicks.C():
			m.d.kicks.Take()
		case ev := <-m.d.events:
			m.handle(ev)
			for range 32 { // take a burst before pumping the queues
				select {
				case ev := <-m.d.events:
					m.handle(ev)
					continue
				default:
				}
				break
			}
		}
	}
}

// pump moves packets between the queues and the connections until nothing
// more can move, then raises at most one interrupt.
func (m *muxer) pump() {
	if m.broken {
		return
	}
	m.sendEvents()
	m.releaseHeld()
	for i := 0; ; i++ {
		progress := m.processTx()
		progress = m.fillRx() || progress
		if !progress || m.broken {
			break
		}
		if i == 16 { // let events in; come back for the rest
			m.d.kicks.Kick(TxQueue)
			break
		}
	}
	need := false
	for _, q := range []*queue.Queue{m.rxq, m.txq, m.evq} {
		need = q.NeedsInterrupt() || need
	}
	if need {
		m.d.metrics.Interrupts.Add(1)
		if err := m.sig.SignalUsed(); err != nil {
			m.d.log.Warn("interrupt failed", "err", err)
		}
	}
}

// pop pops a chain, counting malformed ones, and reports whether c holds one.
func (m *muxer) pop(q *queue.Queue) bool {
	for {
		ok, err := q.Pop(&m.chain)
		if errors.Is(err, queue.ErrBroken) {
			m.broken = true
			m.sig.NeedsReset(fmt.Errorf("vsock: %w", err))
			return false
		}
		if err != nil {
			m.d.metrics.InvalidChains.Add(1)
			continue
		}
		return ok
	}
}

// processTx handles the guest's packets. It stops early when too many
// replies wait for rx buffers.
func (m *muxer) processTx() bool {
	progress := false
	for {
		m.txq.DisableNotify()
		for len(m.ctrl) < maxPendingCtrl {
			if !m.pop(m.txq) {
				break
			}
			progress = true
			m.handleTx(&m.chain)
			_ = m.txq.Push(m.chain.Head, 0) // head came from Pop: in range
		}
		if m.broken || len(m.ctrl) >= maxPendingCtrl || !m.txq.EnableNotify() {
			return progress
		}
	}
}

// fillRx writes pending packets into the guest's rx buffers.
func (m *muxer) fillRx() bool {
	progress := false
	for m.hasRxWork() {
		if !m.pop(m.rxq) {
			if m.broken || !m.rxq.EnableNotify() {
				return progress
			}
			continue
		}
		progress = true
		n, err := m.writeRxPacket(&m.chain)
		if err != nil {
			m.d.metrics.InvalidChains.Add(1)
		}
		_ = m.rxq.Push(m.chain.Head, n) // head came from Pop: in range
	}
	return progress
}

// hasRxWork reports whether a packet waits for the guest, dropping ready
// connections that can no longer send.
func (m *muxer) hasRxWork() bool {
	if len(m.ctrl) > 0 {
		return true
	}
	for len(m.ready) > 0 {
		c := m.ready[0]
		if !c.removed && len(c.rx) > 0 && c.peerFree() > 0 {
			return true
		}
		m.ready = m.ready[1:]
		c.inReady = false
		if !c.removed && len(c.rx) > 0 {
			m.creditBlocked(c)
		}
	}
	return false
}

// writeRxPacket writes the next control or data packet into chain c.
func (m *muxer) writeRxPacket(ch *queue.Chain) (uint32, error) {
	if len(m.ctrl) > 0 {
		p := m.ctrl[0]
		live := p.c != nil && !p.c.removed
		if live {
			p.hdr.bufAlloc, p.hdr.fwdCnt = ConnBufSize, p.c.fwdCnt
		}
		n, err := writeRx(ch, &p.hdr, nil)
		if err != nil {
			return 0, err // the packet stays first in line
		}
		if live {
			p.c.lastFwdSent = p.hdr.fwdCnt
			if p.hdr.op == OpCreditUpdate {
				p.c.updateQueued = false
			}
		}
		m.ctrl[0] = ctrlPkt{}
		m.ctrl = m.ctrl[1:]
		if p.hdr.op == OpRst {
			m.d.metrics.Resets.Add(1)
		}
		m.d.metrics.RxPackets.Add(1)
		return n, nil
	}
	c := m.ready[0]
	room := ch.WritableLen()
	if room <= HeaderSize {
		return 0, fmt.Errorf("%w: %d bytes", ErrNoRxBufferRoom, room)
	}
	n := min(uint64(len(c.rx)), uint64(c.peerFree()), room-HeaderSize, MaxPayload)
	h := m.hdrFor(c, OpRW, 0)
	h.length = uint32(n)
	used, err := writeRx(ch, &h, c.rx[:n])
	if err != nil {
		return 0, err
	}
	c.lastFwdSent = c.fwdCnt
	c.txCnt += uint32(n)
	c.rx = c.rx[n:]
	m.d.metrics.RxPackets.Add(1)
	m.d.metrics.RxBytes.Add(n)
	m.ready = m.ready[1:]
	c.inReady = false
	switch {
	case len(c.rx) == 0:
		m.rxDrained(c)
	case c.peerFree() > 0:
		m.markReady(c)
	default:
		m.creditBlocked(c)
	}
	return used, nil
}

// hdrFor returns a host→guest header for connection c.
func (m *muxer) hdrFor(c *conn, op uint16, flags uint32) header {
	return header{
		srcCID: HostCID, dstCID: m.d.cid,
		srcPort: c.key.local, dstPort: c.key.peer,
		typ: TypeStream, op: op, flags: flags,
		bufAlloc: ConnBufSize, fwdCnt: c.fwdCnt,
	}
}

func (m *muxer) queueCtrl(c *conn, op uint16, flags uint32) {
	m.ctrl = append(m.ctrl, ctrlPkt{hdr: m.hdrFor(c, op, flags), c: c})
}

// rstReply answers a guest packet that has no connection with a reset whose
// addresses mirror it, so the guest finds the socket it came from.
func (m *muxer) rstReply(h *header) {
	m.ctrl = append(m.ctrl, ctrlPkt{hdr: header{
		srcCID: h.dstCID, dstCID: h.srcCID, srcPort: h.dstPort, dstPort: h.srcPort,
		typ: h.typ, op: OpRst,
	}})
}

// handleTx handles one packet from the guest.
func (m *muxer) handleTx(ch *queue.Chain) {
	var h header
	if err := parseTx(ch, &h); err != nil {
		m.d.metrics.InvalidPackets.Add(1)
		m.d.log.Debug("invalid packet", "err", err)
		return
	}
	m.d.metrics.TxPackets.Add(1)
	if h.srcCID != m.d.cid {
		m.d.metrics.InvalidPackets.Add(1) // spoofed source: drop
		return
	}
	if h.dstCID != HostCID || h.typ != TypeStream {
		if h.op != OpRst {
			m.rstReply(&h)
		}
		return
	}
	key := connKey{local: h.dstPort, peer: h.srcPort}
	c := m.conns[key]
	if c == nil {
		switch h.op {
		case OpRequest:
			m.guestConnect(&h, key)
		case OpRst:
		default:
			m.rstReply(&h)
		}
		return
	}
	c.peerBufAlloc, c.peerFwdCnt = h.bufAlloc, h.fwdCnt
	switch {
	case h.op == OpRst:
		m.remove(c)
		return
	case h.op == OpResponse && c.state == stateConnecting:
		m.hostConnected(c)
	case c.state != stateEstablished:
		m.reset(c) // anything else before the connection is up
		return
	case h.op == OpRW:
		m.guestData(c, ch, h.length)
	case h.op == OpShutdown:
		m.guestShutdown(c, h.flags)
	case h.op == OpCreditUpdate:
	case h.op == OpCreditRequest:
		m.creditUpdate(c)
	default: // REQUEST or RESPONSE on an established connection, or unknown
		m.reset(c)
		return
	}
	if !c.removed {
		m.creditChanged(c)
	}
}

// guestConnect starts a guest-initiated connection: dial <uds>_<port>.
func (m *muxer) guestConnect(h *header, key connKey) {
	m.d.metrics.GuestConnects.Add(1)
	if len(m.conns) >= MaxConns {
		m.d.metrics.ConnectFailures.Add(1)
		m.rstReply(h)
		return
	}
	c := newConn(key, stateDialing)
	c.peerBufAlloc, c.peerFwdCnt = h.bufAlloc, h.fwdCnt
	m.conns[key] = c
	path := fmt.Sprintf("%s_%d", m.d.udsPath, key.local)
	d := m.d
	d.bg.Add(1)
	go func() {
		defer d.bg.Done()
		nc, err := net.DialTimeout("unix", path, m.d.connectTimeout)
		var uds *net.UnixConn
		if err == nil {
			uds = nc.(*net.UnixConn)
		}
		select {
		case d.events <- dialEvent{c: c, uds: uds, err: err}:
		case <-c.dead:
			if uds != nil {
				uds.Close()
			}
		case <-d.closed:
			if uds != nil {
				uds.Close()
			}
		}
	}()
}

// hostConnect starts a host-initiated connection: REQUEST to the guest.
func (m *muxer) hostConnect(uds *net.UnixConn, port uint32) {
	m.d.metrics.HostConnects.Add(1)
	if len(m.conns) >= MaxConns {
		m.d.metrics.ConnectFailures.Add(1)
		uds.Close()
		return
	}
	var key connKey
	for {
		next := m.d.nextPort.Load()
		key = connKey{local: next, peer: port}
		next++
		if next == 0xffffffff {
			next = HostPortBase
		}
		m.d.nextPort.Store(next)
		if m.conns[key] == nil {
			break // at most MaxConns keys are taken: this ends
		}
	}
	c := newConn(key, stateConnecting)
	c.uds = uds
	m.conns[key] = c
	if m.pendingReset || m.resetUnacked {
		c.requestHeld = true
		m.held = append(m.held, c)
	} else {
		m.queueCtrl(c, OpRequest, 0)
	}
	m.startTimer(c, m.d.connectTimeout)
}

// releaseHeld sends the held REQUESTs once the guest has handled the
// TRANSPORT_RESET. Linux's event work re-posts the event buffer right after
// handling the event (and only then), and notifies the device, which
// NotifyOnNext asks for even while other event buffers wait unused.
func (m *muxer) releaseHeld() {
	if !m.resetUnacked || !m.evq.NotifyOnNext(m.resetAvail) {
		return
	}
	m.resetUnacked = false
	for _, c := range m.held {
		if !c.removed {
			c.requestHeld = false
			m.queueCtrl(c, OpRequest, 0)
		}
	}
	m.held = nil
}

// hostConnected handles the guest's RESPONSE to a host-initiated connection:
// the host program gets "OK <port>\n" and data starts to flow.
func (m *muxer) hostConnected(c *conn) {
	ok := fmt.Sprintf("OK %d\n", c.key.local)
	_ = c.uds.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	if _, err := io.WriteString(c.uds, ok); err != nil {
		m.d.metrics.ConnectFailures.Add(1)
		m.reset(c)
		return
	}
	_ = c.uds.SetWriteDeadline(time.Time{})
	m.establish(c)
}

// establish starts the connection's reader and writer.
func (m *muxer) establish(c *conn) {
	c.state = stateEstablished
	c.timerSeq++
	if c.timer != nil {
		c.timer.Stop()
	}
	c.rbuf = make([]byte, readChunk)
	m.d.metrics.ConnsOpened.Add(1)
	m.d.bg.Add(2)
	go c.readLoop(m.d)
	go c.writeLoop(m.d)
	m.requestRead(c)
}

// guestData queues an RW payload for the host program.
func (m *muxer) guestData(c *conn, ch *queue.Chain, n uint32) {
	if c.peerShutSend {
		m.reset(c)
		return
	}
	if n == 0 {
		return
	}
	if c.rxCnt-c.fwdCnt+n > ConnBufSize {
		m.d.metrics.CreditViolations.Add(1)
		m.reset(c)
		return
	}
	c.outMu.Lock()
	old := len(c.out)
	c.out = slices.Grow(c.out, int(n))[:old+int(n)]
	ch.ReadAt(c.out[old:], HeaderSize)
	c.outMu.Unlock()
	c.rxCnt += n
	m.d.metrics.TxBytes.Add(uint64(n))
	c.kickWriter()
	m.maybeCreditUpdate(c)
}

// maybeCreditUpdate tells the guest about consumed data when it may be
// running out of room, so a sender waiting for credit is never stuck.
func (m *muxer) maybeCreditUpdate(c *conn) {
	if c.guestView() < creditThreshold && c.fwdCnt != c.lastFwdSent {
		m.creditUpdate(c)
	}
}

// guestShutdown handles SHUTDOWN. When the guest is done both ways the
// connection is reset as soon as its data reached the host (Linux waits for
// that RST to finish close()).
func (m *muxer) guestShutdown(c *conn, flags uint32) {
	if flags&ShutdownRcv != 0 {
		c.peerShutRcv = true
		c.rx = nil
	}
	if flags&ShutdownSend != 0 && !c.peerShutSend {
		c.peerShutSend = true
		c.outMu.Lock()
		c.closeWrite = true
		c.outMu.Unlock()
		c.kickWriter()
	}
	if c.peerShutRcv && c.peerShutSend {
		m.startTimer(c, ShutdownTimeout)
		m.maybeFinish(c)
	}
}

// maybeFinish resets a connection the guest closed once everything it sent
// was written to the host.
func (m *muxer) maybeFinish(c *conn) {
	if c.peerShutRcv && c.peerShutSend && c.rxCnt == c.fwdCnt {
		m.reset(c)
	}
}

// creditUpdate queues a CREDIT_UPDATE unless one is already waiting.
func (m *muxer) creditUpdate(c *conn) {
	if !c.updateQueued {
		c.updateQueued = true
		m.queueCtrl(c, OpCreditUpdate, 0)
	}
}

// creditChanged resumes host→guest data after the guest's credit may have
// grown.
func (m *muxer) creditChanged(c *conn) {
	if c.peerFree() == 0 {
		return
	}
	c.creditReqSent = false
	if len(c.rx) > 0 {
		m.markReady(c)
	} else {
		m.requestRead(c)
	}
}

// creditBlocked asks the guest for credit once while host data waits.
func (m *muxer) creditBlocked(c *conn) {
	if !c.creditReqSent {
		c.creditReqSent = true
		m.queueCtrl(c, OpCreditRequest, 0)
	}
}

func (m *muxer) markReady(c *conn) {
	if !c.inReady {
		c.inReady = true
		m.ready = append(m.ready, c)
	}
}

// rxDrained runs when everything read from the host reached the guest.
func (m *muxer) rxDrained(c *conn) {
	if c.hostEOF {
		if !c.shutSent {
			c.shutSent = true
			m.queueCtrl(c, OpShutdown, ShutdownSend)
		}
		return
	}
	m.requestRead(c)
}

// requestRead grants the reader a budget the guest has room for.
func (m *muxer) requestRead(c *conn) {
	if c.reading || c.removed || c.state != stateEstablished || c.hostEOF || c.peerShutRcv || len(c.rx) > 0 {
		return
	}
	free := c.peerFree()
	if free == 0 {
		return
	}
	c.reading = true
	c.readReq <- int(min(free, readChunk)) // never blocks: one grant at a time
}

// handle processes one event from the device's goroutines.
func (m *muxer) handle(ev event) {
	switch ev := ev.(type) {
	case hostConnectEvent:
		m.hostConnect(ev.uds, ev.port)
	case dialEvent:
		c := ev.c
		if c.removed {
			if ev.uds != nil {
				ev.uds.Close()
			}
			return
		}
		if ev.err != nil {
			m.d.metrics.ConnectFailures.Add(1)
			m.d.log.Debug("guest connection refused by host", "port", c.key.local, "err", ev.err)
			m.reset(c)
			return
		}
		c.uds = ev.uds
		m.queueCtrl(c, OpResponse, 0)
		m.establish(c)
	case readEvent:
		c := ev.c
		c.reading = false
		if c.removed {
			return
		}
		if ev.n > 0 {
			c.rx = c.rbuf[:ev.n]
			m.markReady(c)
		}
		switch {
		case errors.Is(ev.err, io.EOF):
			c.hostEOF = true
			if len(c.rx) == 0 {
				m.rxDrained(c)
			}
		case ev.err != nil:
			m.reset(c)
		case ev.n == 0:
			m.requestRead(c)
		}
	case writeEvent:
		c := ev.c
		if c.removed {
			return
		}
		c.fwdCnt += uint32(ev.n)
		if ev.err != nil {
			m.reset(c) // the host program went away
			return
		}
		m.maybeCreditUpdate(c)
		m.maybeFinish(c)
	case timeoutEvent:
		c := ev.c
		if c.removed || ev.seq != c.timerSeq {
			return
		}
		if c.state != stateEstablished {
			m.d.metrics.ConnectFailures.Add(1)
		}
		m.reset(c)
	}
}

// startTimer arms the connection's single timer; a later call replaces it.
func (m *muxer) startTimer(c *conn, d time.Duration) {
	if c.timer != nil {
		c.timer.Stop()
	}
	c.timerSeq++
	seq, dev := c.timerSeq, m.d
	c.timer = time.AfterFunc(d, func() {
		select {
		case dev.events <- timeoutEvent{c: c, seq: seq}:
		case <-c.dead:
		case <-dev.closed:
		}
	})
}

// reset sends RST for c and removes it; a connection whose REQUEST is still
// held is only removed: the guest never heard of it.
func (m *muxer) reset(c *conn) {
	if !c.requestHeld {
		m.ctrl = append(m.ctrl, ctrlPkt{hdr: m.hdrFor(c, OpRst, 0)})
	}
	m.remove(c)
}

// remove forgets c and closes its host socket; its goroutines exit.
func (m *muxer) remove(c *conn) {
	if c.removed {
		return
	}
	c.removed = true
	delete(m.conns, c.key)
	close(c.dead)
	if c.timer != nil {
		c.timer.Stop()
	}
	if c.uds != nil {
		c.uds.Close()
	}
	if c.state == stateEstablished {
		m.d.metrics.ConnsClosed.Add(1)
	}
}

// closeAll drops every connection without telling the guest (its driver is
// gone or about to be reset). Called only while the worker is stopped.
func (m *muxer) closeAll() {
	for _, c := range m.conns {
		m.remove(c)
	}
	m.ctrl, m.ready, m.held = nil, nil, nil
}

// sendEvents delivers a pending TRANSPORT_RESET on the event queue.
func (m *muxer) sendEvents() {
	if !m.pendingReset || m.broken {
		return
	}
	for m.pop(m.evq) {
		var ev [eventSize]byte // le32 id = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
		if m.chain.WriteAt(ev[:], 0) != eventSize {
			m.d.metrics.InvalidChains.Add(1)
			_ = m.evq.Push(m.chain.Head, 0)
			continue
		}
		_ = m.evq.Push(m.chain.Head, eventSize)
		m.pendingReset = false
		m.resetUnacked, m.resetAvail = true, m.evq.AvailIdx()
		m.d.metrics.TransportResets.Add(1)
		return
	}
	if !m.broken && m.evq.EnableNotify() {
		m.d.kicks.Kick(EventQueue)
	}
}
