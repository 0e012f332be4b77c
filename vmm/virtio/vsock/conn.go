package vsock

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

type connState int

const (
	stateConnecting  connState = iota // host-initiated: REQUEST sent, waiting for RESPONSE
	stateDialing                      // guest-initiated: dialing <uds>_<port>
	stateEstablished                  // data flows
)

// connKey names a connection: local is the host-side port, peer the guest's.
type connKey struct{ local, peer uint32 }

// conn is one vsock stream. Fields without a comment are owned by the
// worker; the reader and writer goroutines touch only what is marked.
type conn struct {
	key   connKey
	state connState
	uds   *net.UnixConn // nil while dialing
	dead  chan struct{} // closed on removal: the connection's goroutines exit
	// removed is set when the connection left the muxer; late events for it
	// are dropped.
	removed bool
	// requestHeld: host-initiated, its REQUEST waits in muxer.held.
	requestHeld bool
	timer       *time.Timer
	timerSeq    uint64

	// Host → guest. The reader owns rbuf between a grant on readReq and the
	// readEvent it sends back.
	readReq       chan int
	reading       bool
	rbuf          []byte
	rx            []byte // read from the host, not yet sent to the guest
	hostEOF       bool   // the host sent no more: SHUTDOWN(SEND) once rx drains
	shutSent      bool
	inReady       bool   // queued in muxer.ready
	txCnt         uint32 // payload bytes sent to the guest
	peerBufAlloc  uint32 // guest's buf_alloc
	peerFwdCnt    uint32 // guest's fwd_cnt
	creditReqSent bool

	// Guest → host. out, spare and closeWrite are guarded by outMu and
	// shared with the writer goroutine.
	outMu        sync.Mutex
	out          []byte
	spare        []byte
	closeWrite   bool
	wkick        chan struct{}
	rxCnt        uint32 // payload bytes received from the guest
	fwdCnt       uint32 // of those, bytes written to the host socket
	lastFwdSent  uint32 // fwd_cnt last told to the guest
	updateQueued bool   // a CREDIT_UPDATE waits in muxer.ctrl
	peerShutRcv  bool
	peerShutSend bool
}

func newConn(key connKey, state connState) *conn {
	return &conn{
		key:     key,
		state:   state,
		dead:    make(chan struct{}),
		readReq: make(chan int, 1),
		wkick:   make(chan struct{}, 1),
	}
}

// peerFree is how many payload bytes the guest can take now (§5.10.6.3:
// buf_alloc - (tx_cnt - fwd_cnt)).
func (c *conn) peerFree() uint32 {
	inFlight := c.txCnt - c.peerFwdCnt
	if inFlight > c.peerBufAlloc {
		return 0
	}
	return c.peerBufAlloc - inFlight
}

// guestView is how much room the guest believes it has in our buffer.
func (c *conn) guestView() uint32 {
	used := c.rxCnt - c.lastFwdSent
	if used > ConnBufSize {
		return 0
	}
	return ConnBufSize - used
}

// readLoop is the connection's reader goroutine.
func (c *conn) readLoop(d *Device) {
	defer d.bg.Done()
	for {
		var budget int
		select {
		case budget = <-c.readReq:
		case <-c.dead:
			return
		}
		n, err := c.uds.Read(c.rbuf[:budget])
		select {
		case d.events <- readEvent{c: c, n: n, err: err}:
		case <-c.dead:
			return
		}
		if err != nil {
			return
		}
	}
}

// writeLoop is the connection's writer goroutine: it drains out to the host
// socket and reports progress, so the worker can return credit to the guest.
func (c *conn) writeLoop(d *Device) {
	defer d.bg.Done()
	shut := false
	for {
		select {
		case <-c.wkick:
		case <-c.dead:
			return
		}
		for {
			c.outMu.Lock()
			buf := c.out
			c.out, c.spare = c.spare[:0], nil
			cw := c.closeWrite
			c.outMu.Unlock()
			if len(buf) == 0 {
				c.outMu.Lock()
				c.spare = buf
				c.outMu.Unlock()
				if cw && !shut {
					shut = true
					_ = c.uds.CloseWrite() // the guest sent SHUTDOWN(SEND)
				}
				break
			}
			// Write in pieces and report each, so credit flows back to the
			// guest while a slow host program catches up.
			var err error
			for off := 0; off < len(buf) && err == nil; {
				var n int
				n, err = c.uds.Write(buf[off:min(len(buf), off+writeChunk)])
				off += n
				select {
				case d.events <- writeEvent{c: c, n: n, err: err}:
				case <-c.dead:
					return
				}
			}
			c.outMu.Lock()
			c.spare = buf[:0]
			c.outMu.Unlock()
			if err != nil {
				return
			}
		}
	}
}

// kickWriter wakes the writer goroutine.
func (c *conn) kickWriter() {
	select {
	case c.wkick <- struct{}{}:
	default:
	}
}

// Events from the device's goroutines to the worker.
type event interface{}

type hostConnectEvent struct {
	uds  *net.UnixConn
	port uint32
}

type dialEvent struct {
	c   *conn
	uds *net.UnixConn
	err error
}

type readEvent struct {
	c   *conn
	n   int
	err error
}

type writeEvent struct {
	c   *conn
	n   int
	err error
}

type timeoutEvent struct {
	c   *conn
	seq uint64
}

// ErrBadConnect is a host program's malformed CONNECT line.
var ErrBadConnect = errors.New(`vsock: expected "CONNECT <port>\n"`)

// acceptLoop owns the listener: it accepts host connections and hands each
// to a handshake goroutine.
func (d *Device) acceptLoop() {
	defer d.bg.Done()
	for {
		uds, err := d.ln.AcceptUnix()
		if err != nil {
			select {
			case <-d.closed:
				return
			case <-time.After(10 * time.Millisecond): // e.g. EMFILE: back off
				continue
			}
		}
		d.bg.Add(1)
		go d.handshake(uds)
	}
}

// handshake reads "CONNECT <port>\n" and passes the connection to the worker.
func (d *Device) handshake(uds *net.UnixConn) {
	defer d.bg.Done()
	_ = uds.SetReadDeadline(time.Now().Add(HandshakeTimeout))
	port, err := readConnect(uds)
	if err == nil && !d.live.Load() {
		err = fmt.Errorf("vsock: no guest driver")
	}
	if err != nil {
		d.metrics.ConnectFailures.Add(1)
		d.log.Debug("host connection refused", "err", err)
		uds.Close()
		return
	}
	_ = uds.SetReadDeadline(time.Time{})
	select {
	case d.events <- hostConnectEvent{uds: uds, port: port}:
	case <-d.closed:
		uds.Close()
	}
}

// readConnect reads the CONNECT line byte by byte, so that nothing the host
// sends after it is consumed here.
func readConnect(uds *net.UnixConn) (uint32, error) {
	var line []byte
	var b [1]byte
	for len(line) < 32 {
		n, err := uds.Read(b[:])
		if err != nil {
			return 0, fmt.Errorf("%w: %w", ErrBadConnect, err)
		}
		if n == 0 {
			continue
		}
		if b[0] != '\n' {
			line = append(line, b[0])
			continue
		}
		port, ok := strings.CutPrefix(string(line), "CONNECT ")
		if !ok {
			return 0, ErrBadConnect
		}
		p, err := strconv.ParseUint(strings.TrimSpace(port), 10, 32)
		if err != nil {
			return 0, fmt.Errorf("%w: %w", ErrBadConnect, err)
		}
		return uint32(p), nil
	}
	return 0, ErrBadConnect
}
