// Package vsock is the virtio socket device (virtio 1.2 §5.10) implemented in
// userspace, as Firecracker does, because the hosts cubicle runs on have no
// vhost-vsock and a jailed VMM must not reach the host's AF_VSOCK anyway. The
// guest speaks AF_VSOCK; the host side is plain Unix sockets. Host programs
// reach a guest port by connecting to UDSPath and sending "CONNECT <port>\n";
// the device answers "OK <hostport>\n" once the guest accepts, and from then
// on the Unix socket is the stream. A guest connecting to host port P is
// connected to the Unix socket "<UDSPath>_<P>". The device runs the whole
// packet protocol (REQUEST/RESPONSE/RST/SHUTDOWN/RW/CREDIT_UPDATE/
// CREDIT_REQUEST) with per-connection credit accounting, so neither side can
// make the other buffer without bound. After a snapshot restore no Unix
// connection survives: the device tells the guest with a TRANSPORT_RESET event
// and the guest drops its sockets and re-reads its CID. Two things keep the
// first connection after a restore from meeting the guest's stale state: a
// host-initiated REQUEST waits until the guest has handled that event (it
// re-posts the event buffer), and host ports carry on from the snapshot
// instead of starting again at HostPortBase, so a new connection never has
// the addresses of one the guest still holds (Linux keeps a reset socket
// until its program closes it, and drops a REQUEST that matches it).
//
// Goroutines and ownership:
//   - the worker (Activate/Resume to Pause/Reset) owns the three queues and all
//     connection state (the muxer); everything else talks to it through
//     Device.events;
//   - the acceptor owns the listener for the device's lifetime and runs one
//     short-lived handshake goroutine per incoming connection;
//   - each established connection has a reader goroutine (reads the Unix
//     socket only when the worker grants it a credit budget, so the guest's
//     receive buffer is never overrun) and a writer goroutine (drains the
//     bytes the guest sent, which the worker appends under conn.outMu);
//   - dial goroutines connect guest-initiated connections without blocking
//     the worker.
//
// Lock order: the transport's lock, then the lock of Device.life (a
// virtio.Lifecycle), then conn.outMu. The worker takes only conn.outMu.
package vsock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// Queues and sizes (§5.10.2: rx, tx, event).
const (
	RxQueue    = 0
	TxQueue    = 1
	EventQueue = 2
	// QueueSize is the maximum size of each queue.
	QueueSize = 256
	// configSize is sizeof(struct virtio_vsock_config): le64 guest_cid.
	configSize = 8
)

// Tunables of the host side.
const (
	// ConnBufSize is the receive buffer each connection advertises to the
	// guest (buf_alloc): how many bytes the guest may send before the host
	// program reads them.
	ConnBufSize = 256 << 10
	// MaxConns bounds the connections of one device.
	MaxConns = 1024
	// HostPortBase is the first local port for host-initiated connections.
	HostPortBase = 1 << 30
	// DefaultConnectTimeout bounds how long a host-initiated connection
	// waits for the guest's RESPONSE, and a guest-initiated one for the
	// dial, unless Config.ConnectTimeout says otherwise (Firecracker: 2 s).
	DefaultConnectTimeout = 2 * time.Second
	// HandshakeTimeout bounds how long a host program may take to send its
	// CONNECT line.
	HandshakeTimeout = 2 * time.Second
	// ShutdownTimeout bounds how long a closing connection waits for the
	// other side before it is reset.
	ShutdownTimeout = 2 * time.Second
	// readChunk is the most the reader takes from a Unix socket at once.
	readChunk = 32 << 10
	// writeChunk is the most the writer hands a Unix socket at once before
	// it reports progress.
	writeChunk = 32 << 10
	// creditThreshold: a CREDIT_UPDATE is sent when the guest may believe it
	// has less than this much room left.
	creditThreshold = MaxPayload
	// maxPendingCtrl bounds control packets waiting for rx buffers; beyond
	// it the device stops reading the tx queue (back-pressure on the guest).
	maxPendingCtrl = 256
)

// Errors.
var (
	ErrInvalidCID       = errors.New("vsock: guest CID must be in 3..0xfffffffe")
	ErrQueuesMissing    = errors.New("vsock: rx, tx and event queues must all be enabled")
	ErrClosed           = errors.New("vsock: device closed")
	ErrSnapshotMismatch = errors.New("vsock: snapshot does not match the device")
)

// Config configures a vsock device.
type Config struct {
	GuestCID uint64
	// UDSPath is the host Unix socket for host-initiated connections; the
	// device creates it and removes it in Close. Guest-initiated connections
	// to port P go to UDSPath + "_" + P.
	UDSPath string
	// ConnectTimeout overrides DefaultConnectTimeout: how long a
	// host-initiated connection waits for the guest's RESPONSE, and a
	// guest-initiated one for its dial. A guest whose vCPUs are starved
	// (hundreds of clones on a few cores) needs longer.
	ConnectTimeout time.Duration
	Logger         *slog.Logger
}

// Metrics counts what the device did. Fields are updated atomically and may
// be read at any time.
type Metrics struct {
	TxPackets, RxPackets        atomic.Uint64
	TxBytes, RxBytes            atomic.Uint64 // payload bytes guest→host, host→guest
	ConnsOpened, ConnsClosed    atomic.Uint64
	HostConnects, GuestConnects atomic.Uint64
	ConnectFailures             atomic.Uint64 // dials, handshakes and refusals
	Resets                      atomic.Uint64 // RST packets sent
	InvalidPackets              atomic.Uint64 // malformed packets dropped
	InvalidChains               atomic.Uint64 // malformed chains returned unused
	CreditViolations            atomic.Uint64 // guest sent beyond its credit
	TransportResets, Interrupts atomic.Uint64
}

// Device is a virtio-vsock device.
type Device struct {
	cid            uint64
	udsPath        string
	connectTimeout time.Duration
	log            *slog.Logger
	ln             *net.UnixListener
	kicks          *virtio.Kicks
	events         chan event
	closed         chan struct{} // closed by Close
	bg             sync.WaitGroup
	live           atomic.Bool // a driver is active: host connections are accepted
	pendingReset   atomic.Bool // set by Restore: the next start owes the guest a TRANSPORT_RESET
	// nextPort is the host port the next host-initiated connection tries
	// first. Only the worker moves it; it is saved in snapshots so that a
	// restored device carries on where the guest last saw it.
	nextPort atomic.Uint32
	metrics  Metrics

	life   *virtio.Lifecycle // its lock guards the fields below
	worker virtio.Worker
	mux    *muxer
}

// New creates the device and starts listening on cfg.UDSPath.
func New(cfg Config) (*Device, error) {
	if cfg.GuestCID <= HostCID || cfg.GuestCID >= 0xffffffff {
		return nil, fmt.Errorf("%w: %d", ErrInvalidCID, cfg.GuestCID)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.UDSPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("vsock: listen on %s: %w", cfg.UDSPath, err)
	}
	d := &Device{
		cid:            cfg.GuestCID,
		udsPath:        cfg.UDSPath,
		connectTimeout: cfg.ConnectTimeout,
		log:            cfg.Logger,
		ln:             ln,
		kicks:          virtio.NewKicks(),
		events:         make(chan event, 64),
		closed:         make(chan struct{}),
	}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	if d.connectTimeout <= 0 {
		d.connectTimeout = DefaultConnectTimeout
	}
	d.log = d.log.With("device", "vsock", "cid", cfg.GuestCID)
	d.nextPort.Store(HostPortBase)
	d.mux = newMuxer(d)
	d.life = virtio.NewLifecycle(d.kicks, d.worker.Stop, ErrClosed)
	d.bg.Add(1)
	go d.acceptLoop()
	return d, nil
}

// Close stops the device, drops every connection and removes the listening
// socket. The transport must be closed (or reset) first.
func (d *Device) Close() error {
	err := d.life.Close(func() error {
		d.live.Store(false)
		close(d.closed)
		err := d.ln.Close()
		d.mux.closeAll()
		return err
	})
	d.bg.Wait()
	if err != nil {
		return fmt.Errorf("vsock: close listener: %w", err)
	}
	return nil
}

// GuestCID returns the guest's context ID.
func (d *Device) GuestCID() uint64 { return d.cid }

// Metrics returns the device's counters.
func (d *Device) Metrics() *Metrics { return &d.metrics }

// Type implements mmio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.DeviceVsock }

// Features implements mmio.Device. Stream sockets are implied without
// feature bits (§5.10.3).
func (d *Device) Features() uint64 { return virtio.CommonFeatures }

// QueueMaxSizes implements mmio.Device.
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize, QueueSize, QueueSize} }

// ReadConfig implements mmio.Device: struct virtio_vsock_config (§5.10.4).
func (d *Device) ReadConfig(offset uint64, data []byte) {
	clear(data)
	var cfg [configSize]byte
	binary.LittleEndian.PutUint64(cfg[:], d.cid)
	if offset < configSize {
		copy(data, cfg[offset:])
	}
}

// WriteConfig implements mmio.Device: the configuration is read-only.
func (d *Device) WriteConfig(offset uint64, data []byte) {}

// Activate implements mmio.Device.
func (d *Device) Activate(mem virtio.Memory, features uint64, qs []*queue.Queue, sig virtio.Signaler) error {
	if len(qs) != 3 || qs[RxQueue] == nil || qs[TxQueue] == nil || qs[EventQueue] == nil {
		return ErrQueuesMissing
	}
	return d.life.Activate(nil, func() { d.start(qs, sig) })
}

// start runs the worker. Called with the lifecycle's lock held.
func (d *Device) start(qs []*queue.Queue, sig virtio.Signaler) {
	mux := d.mux
	if d.pendingReset.Swap(false) {
		mux.pendingReset = true
	}
	d.live.Store(true)
	d.worker.Start(func(stop <-chan struct{}) { mux.run(qs, sig, stop) })
}

// Notify implements mmio.Device.
func (d *Device) Notify(i int) { d.life.Notify(i) }

// Pause implements mmio.Device. Connections stay open; their data waits.
func (d *Device) Pause() { d.life.Pause() }

// Resume implements mmio.Device.
func (d *Device) Resume() error { return d.life.Resume() }

// Reset implements mmio.Device: the driver went away, so every connection is
// dropped.
func (d *Device) Reset() {
	d.life.Reset(func() {
		d.live.Store(false)
		d.mux.closeAll()
		d.mux.pendingReset, d.mux.resetUnacked = false, false
	})
}

// State is the device's snapshot. Connections are not part of it: the host
// ends of them belong to the old process.
type State struct {
	GuestCID uint64 `json:"guest_cid"`
	// NextHostPort is the host port the next host-initiated connection
	// takes. The guest may still hold sockets for ports below it after the
	// restore (until its programs close them), so the restored device goes
	// on from here. Zero in snapshots of older versions.
	NextHostPort uint32 `json:"next_host_port,omitempty"`
}

// Save returns the device's snapshot. Call it while the device is paused.
func (d *Device) Save() State { return State{GuestCID: d.cid, NextHostPort: d.nextPort.Load()} }

// Restore prepares a new device for a guest restored from st: when the
// transport activates it, the guest receives a TRANSPORT_RESET event, drops
// the connections it had at snapshot time and re-reads its CID, which may
// differ from st's (a clone gets a new identity). Call it before the
// transport's Restore. Host-initiated connections go on with the host ports
// after those the snapshot's device had used.
func (d *Device) Restore(st State) error {
	if st.GuestCID <= HostCID || st.GuestCID >= 0xffffffff {
		return fmt.Errorf("%w: %w: %d", ErrSnapshotMismatch, ErrInvalidCID, st.GuestCID)
	}
	switch {
	case st.NextHostPort >= HostPortBase && st.NextHostPort != 0xffffffff:
		d.nextPort.Store(st.NextHostPort)
	case st.NextHostPort == 0:
		// A snapshot that did not record it: start somewhere in the upper
		// half of the range, far from the ports the guest is likely to
		// hold (the first ones after HostPortBase).
		d.nextPort.Store(HostPortBase + 1<<29 + rand.Uint32N(1<<29))
	default:
		return fmt.Errorf("%w: next host port %d is outside [%d, %d)", ErrSnapshotMismatch, st.NextHostPort, uint32(HostPortBase), uint32(0xffffffff))
	}
	d.pendingReset.Store(true)
	return nil
}
