// Package net is the virtio network device (virtio 1.2 §5.1) backed by a
// Linux tap: one receive and one transmit queue, the MAC address in
// configuration space, and the guest's struct virtio_net_hdr_v1 passed through
// to the tap unchanged (the tap is opened with IFF_VNET_HDR), so checksum and
// segmentation offloads cost nothing in the VMM. The receive offloads the
// guest negotiates become the tap's TUNSETOFFLOAD flags, so the kernel only
// hands the device what the guest can take. Transmit writes a frame straight
// from guest memory (writev, no copy); receive reads a frame into a host
// buffer and copies it into one rx chain, or several with mergeable rx
// buffers. A malformed chain is returned unused, a frame that does not fit is
// dropped and counted, and the tap (the kernel) validates the header.
//
// Goroutines: the worker (Activate/Resume to Pause/Reset) owns both queues
// and writes to the tap; the reader reads frames from the tap into one of two
// buffers and hands them to the worker over a channel, so a guest that posts
// no rx buffers stops the reader rather than growing memory, and the kernel
// drops at the tap's queue. The lock of Device.life (a virtio.Lifecycle)
// guards the lifecycle fields and is taken after the transport's lock, never
// by the worker or the reader.
package net

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// Queues and sizes (§5.1.2: receiveq1, transmitq1; no control queue).
const (
	RxQueue   = 0
	TxQueue   = 1
	QueueSize = 256
	// NetHdrSize is sizeof(struct virtio_net_hdr_v1) (§5.1.6): with
	// VIRTIO_F_VERSION_1 the header always has num_buffers.
	NetHdrSize = 12
	// MaxFrame is the largest Ethernet frame (GSO included) a tap passes.
	MaxFrame = 65550
	// configSize covers mac[6] and status of struct virtio_net_config
	// (§5.1.4); status is unused since VIRTIO_NET_F_STATUS is not offered.
	configSize = 8
	// numBuffersOff is the offset of num_buffers in the header.
	numBuffersOff = 10
	// rxBurst bounds the frames moved per wakeup, so transmit keeps up.
	rxBurst = 64
)

// Feature bits (§5.1.3).
const (
	FeatureCsum      = 0  // VIRTIO_NET_F_CSUM: device handles partial checksums
	FeatureGuestCsum = 1  // VIRTIO_NET_F_GUEST_CSUM: guest handles partial checksums
	FeatureMTU       = 3  // VIRTIO_NET_F_MTU (not offered)
	FeatureMAC       = 5  // VIRTIO_NET_F_MAC
	FeatureGuestTSO4 = 7  // VIRTIO_NET_F_GUEST_TSO4
	FeatureGuestTSO6 = 8  // VIRTIO_NET_F_GUEST_TSO6
	FeatureGuestECN  = 9  // VIRTIO_NET_F_GUEST_ECN
	FeatureGuestUFO  = 10 // VIRTIO_NET_F_GUEST_UFO
	FeatureHostTSO4  = 11 // VIRTIO_NET_F_HOST_TSO4
	FeatureHostTSO6  = 12 // VIRTIO_NET_F_HOST_TSO6
	FeatureHostECN   = 13 // VIRTIO_NET_F_HOST_ECN
	FeatureHostUFO   = 14 // VIRTIO_NET_F_HOST_UFO
	FeatureMrgRxbuf  = 15 // VIRTIO_NET_F_MRG_RXBUF
	FeatureStatus    = 16 // VIRTIO_NET_F_STATUS (not offered)
)

// Errors.
var (
	ErrNoTap         = errors.New("net: a tap file or name is required")
	ErrQueuesMissing = errors.New("net: rx and tx queues must both be enabled")
	ErrOffload       = errors.New("net: TUNSETOFFLOAD refused the negotiated offloads")
	// ErrSnapshotMismatch is returned for device state that cannot be
	// decoded.
	ErrSnapshotMismatch = errors.New("net: snapshot does not match the device")
	// Per-frame errors, counted in Metrics.
	ErrShortFrame  = errors.New("net: tx chain shorter than the virtio-net header")
	ErrLongFrame   = errors.New("net: tx chain longer than a frame can be")
	ErrRxNoRoom    = errors.New("net: rx chain too small for the header")
	ErrFrameTooBig = errors.New("net: frame does not fit the rx buffers")
)

// Config configures a network device.
type Config struct {
	// Tap is an open tap (the device takes it over and closes it); if nil,
	// TapName is opened with OpenTap in the calling thread's namespace.
	Tap     *os.File
	TapName string
	MAC     [6]byte
	Logger  *slog.Logger
}

// Metrics counts what the device did. Fields are updated atomically and may
// be read at any time.
type Metrics struct {
	RxFrames, RxBytes atomic.Uint64
	RxDropped         atomic.Uint64 // frames that fit no rx buffer
	TxFrames, TxBytes atomic.Uint64
	TxDropped         atomic.Uint64 // tap queue full (EAGAIN)
	TxErrors          atomic.Uint64 // the tap refused the frame (bad header)
	TxMalformed       atomic.Uint64 // chains too short or too long for a frame
	InvalidChains     atomic.Uint64 // malformed chains returned unused
	TapReadErrors     atomic.Uint64
	Interrupts        atomic.Uint64
}

// State is the device's snapshot: the MAC the guest knows.
type State struct {
	MAC [6]byte `json:"mac"`
}

// Device is a virtio-net device.
type Device struct {
	tap     *os.File
	tapFD   int // tap's descriptor, for writev and ioctls; valid until Close
	log     *slog.Logger
	kicks   *virtio.Kicks
	metrics Metrics
	mac     atomic.Pointer[[6]byte]

	life    *virtio.Lifecycle // its lock guards the fields below
	worker  virtio.Worker
	reader  virtio.Worker
	frames  chan []byte // reader → worker: frames (header included)
	free    chan []byte // worker → reader: empty buffers
	pending []byte      // a frame waiting for rx buffers, kept across Pause
}

// New returns a network device over cfg's tap.
func New(cfg Config) (*Device, error) {
	var tap *os.File
	var err error
	switch {
	case cfg.Tap != nil:
		tap, err = adoptTap(cfg.Tap)
	case cfg.TapName != "":
		tap, _, err = OpenTap(cfg.TapName)
	default:
		err = ErrNoTap
	}
	if err != nil {
		return nil, err
	}
	d := &Device{tap: tap, log: cfg.Logger, kicks: virtio.NewKicks()}
	d.life = virtio.NewLifecycle(d.kicks, d.stop, os.ErrClosed)
	rc, err := tap.SyscallConn()
	if err == nil {
		err = rc.Control(func(fd uintptr) { d.tapFD = int(fd) })
	}
	if err != nil {
		tap.Close()
		return nil, fmt.Errorf("net: tap descriptor: %w", err)
	}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	mac := cfg.MAC
	d.mac.Store(&mac)
	return d, nil
}

// Close closes the tap. The device must be reset (or never activated).
func (d *Device) Close() error { return d.life.Close(d.tap.Close) }

// Metrics returns the device's counters.
func (d *Device) Metrics() *Metrics { return &d.metrics }

// MAC returns the MAC address in configuration space.
func (d *Device) MAC() [6]byte { return *d.mac.Load() }

// Save returns the device's snapshot.
func (d *Device) Save() State { return State{MAC: d.MAC()} }

// Restore puts the snapshot's MAC back in configuration space (the guest
// kernel already has it; a clone changes its address from inside). Call it
// before the transport's Restore.
func (d *Device) Restore(st State) error {
	mac := st.MAC
	d.mac.Store(&mac)
	return nil
}

// Type implements mmio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.DeviceNet }

// Features implements mmio.Device.
func (d *Device) Features() uint64 {
	return virtio.CommonFeatures | 1<<FeatureMAC | 1<<FeatureMrgRxbuf |
		1<<FeatureCsum | 1<<FeatureHostTSO4 | 1<<FeatureHostTSO6 | 1<<FeatureHostUFO |
		1<<FeatureGuestCsum | 1<<FeatureGuestTSO4 | 1<<FeatureGuestTSO6 | 1<<FeatureGuestUFO
}

// QueueMaxSizes implements mmio.Device.
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize, QueueSize} }

// ReadConfig implements mmio.Device.
func (d *Device) ReadConfig(offset uint64, data []byte) {
	clear(data)
	var cfg [configSize]byte
	mac := d.mac.Load()
	copy(cfg[:], mac[:])
	if offset < configSize {
		copy(data, cfg[offset:])
	}
}

// WriteConfig implements mmio.Device: the MAC is read-only for modern drivers
// (§5.1.4.1).
func (d *Device) WriteConfig(offset uint64, data []byte) {}

// Activate implements mmio.Device.
func (d *Device) Activate(mem virtio.Memory, features uint64, qs []*queue.Queue, sig virtio.Signaler) error {
	if len(qs) != 2 || qs[RxQueue] == nil || qs[TxQueue] == nil {
		return ErrQueuesMissing
	}
	setOffloads := func() error {
		if err := unix.IoctlSetInt(d.tapFD, unix.TUNSETOFFLOAD, tapOffloads(features)); err != nil {
			return fmt.Errorf("%w: features %#x: %w", ErrOffload, features, err)
		}
		return nil
	}
	mrg := virtio.HasFeature(features, FeatureMrgRxbuf)
	return d.life.Activate(setOffloads, func() { d.start(qs[RxQueue], qs[TxQueue], sig, mrg) })
}

// start runs the reader and the worker. Called with the lifecycle's lock
// held.
func (d *Device) start(rxq, txq *queue.Queue, sig virtio.Signaler, mrg bool) {
	d.frames, d.free = make(chan []byte), make(chan []byte, 2)
	for range 2 {
		d.free <- make([]byte, NetHdrSize+MaxFrame)
	}
	frames, free := d.frames, d.free
	_ = d.tap.SetReadDeadline(time.Time{})
	d.reader.Start(func(stop <-chan struct{}) { d.readLoop(frames, free, stop) })
	w := &worker{d: d, rxq: rxq, txq: txq, sig: sig, mrg: mrg, frames: frames, free: free, pending: d.pending}
	d.pending = nil
	d.worker.Start(func(stop <-chan struct{}) {
		w.run(stop)
		d.pending = w.pending // read by start after Stop returns
	})
}

// stop stops the worker and the reader. Called with the lifecycle's lock
// held.
func (d *Device) stop() {
	d.worker.Stop()
	if d.reader.Running() {
		_ = d.tap.SetReadDeadline(time.Unix(1, 0)) // wake a blocked read
		d.reader.Stop()
	}
}

// Notify implements mmio.Device.
func (d *Device) Notify(i int) { d.life.Notify(i) }

// Pause implements mmio.Device.
func (d *Device) Pause() { d.life.Pause() }

// Resume implements mmio.Device.
func (d *Device) Resume() error { return d.life.Resume() }

// Reset implements mmio.Device: queues and offloads are dropped. After Close
// the lifecycle skips this, so the closed tap is not touched.
func (d *Device) Reset() {
	d.life.Reset(func() {
		d.pending = nil
		_ = unix.IoctlSetInt(d.tapFD, unix.TUNSETOFFLOAD, 0)
	})
}

// readLoop is the reader goroutine: one frame per buffer.
func (d *Device) readLoop(frames chan<- []byte, free <-chan []byte, stop <-chan struct{}) {
	for {
		var buf []byte
		select {
		case buf = <-free:
		case <-stop:
			return
		}
		n, err := d.tap.Read(buf[:cap(buf)])
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, os.ErrClosed) {
				<-stop // being stopped
				return
			}
			d.metrics.TapReadErrors.Add(1)
			d.log.Warn("tap read failed", "err", err)
			select { // e.g. the interface went away: do not spin
			case <-time.After(100 * time.Millisecond):
			case <-stop:
				return
			}
			n = 0
		}
		if n < NetHdrSize {
			select {
			case frames <- buf[:0]: // hand the buffer back through the worker
			case <-stop:
				return
			}
			continue
		}
		select {
		case frames <- buf[:n]:
		case <-stop:
			return
		}
	}
}

// worker is the worker goroutine's state.
type worker struct {
	d        *Device
	rxq, txq *queue.Queue
	sig      virtio.Signaler
	mrg      bool
	frames   <-chan []byte
	free     chan<- []byte
	pending  []byte
	broken   bool
	chain    queue.Chain   // tx
	chains   []queue.Chain // rx, one per buffer of a mergeable frame
	iov      [][]byte
}

func (w *worker) run(stop <-chan struct{}) {
	for {
		w.processTx()
		w.processRx()
		need := w.rxq.NeedsInterrupt()
		need = w.txq.NeedsInterrupt() || need
		if need {
			w.d.metrics.Interrupts.Add(1)
			if err := w.sig.SignalUsed(); err != nil {
				w.d.log.Warn("interrupt failed", "err", err)
			}
		}
		frames := w.frames
		if w.pending != nil || w.broken {
			frames = nil // wait for rx buffers before taking more frames
		}
		select {
		case <-stop:
			return
		case <-w.d.kicks.C():
			w.d.kicks.Take()
		case f := <-frames:
			w.take(f)
		}
	}
}

// take accepts a frame from the reader; an empty one returns the reader's
// buffer after a failed or short read.
func (w *worker) take(f []byte) {
	if len(f) < NetHdrSize {
		w.release(f)
		return
	}
	w.pending = f
}

// release gives a frame buffer back to the reader. A frame kept across
// Pause came from the previous reader's pool; if the pool is full, the
// buffer is left to the garbage collector rather than blocking.
func (w *worker) release(f []byte) {
	select {
	case w.free <- f[:cap(f)]:
	default:
	}
}

// pop pops a chain into c, counting malformed ones; it reports whether c
// holds one, and whether malformed chains were skipped on the way.
func (w *worker) pop(q *queue.Queue, c *queue.Chain) (ok, skipped bool) {
	for !w.broken {
		ok, err := q.Pop(c)
		if errors.Is(err, queue.ErrBroken) {
			w.broken = true
			w.sig.NeedsReset(fmt.Errorf("net: %w", err))
			return false, skipped
		}
		if err != nil {
			w.d.metrics.InvalidChains.Add(1)
			skipped = true
			continue
		}
		return ok, skipped
	}
	return false, skipped
}

// processTx writes the guest's frames to the tap.
func (w *worker) processTx() {
	for !w.broken {
		w.txq.DisableNotify()
		for {
			if ok, _ := w.pop(w.txq, &w.chain); !ok {
				break
			}
			w.transmit()
			_ = w.txq.Push(w.chain.Head, 0) // head came from Pop: in range
		}
		if w.broken || !w.txq.EnableNotify() {
			return
		}
	}
}

// transmit writes one tx chain (header and frame, in any number of readable
// descriptors) to the tap with one writev.
func (w *worker) transmit() {
	n := w.chain.ReadableLen()
	switch {
	case n < NetHdrSize:
		w.d.metrics.TxMalformed.Add(1)
		w.d.log.Debug("tx dropped", "err", ErrShortFrame, "len", n)
		return
	case n > NetHdrSize+MaxFrame:
		w.d.metrics.TxMalformed.Add(1)
		w.d.log.Debug("tx dropped", "err", ErrLongFrame, "len", n)
		return
	}
	w.iov = w.chain.ReadableIovecs(w.iov[:0], 0, n)
	for {
		_, err := unix.Writev(w.d.tapFD, w.iov)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			w.d.metrics.TxDropped.Add(1)
		case err != nil:
			w.d.metrics.TxErrors.Add(1)
			w.d.log.Debug("tap refused frame", "err", err)
		default:
			w.d.metrics.TxFrames.Add(1)
			w.d.metrics.TxBytes.Add(n - NetHdrSize)
		}
		return
	}
}

// processRx moves frames from the reader into rx buffers.
func (w *worker) processRx() {
	for range rxBurst {
		if w.broken {
			return
		}
		if w.pending == nil {
			select {
			case f := <-w.frames:
				w.take(f)
				if w.pending == nil {
					continue
				}
			default:
				return
			}
		}
		delivered, dropped := w.receive(w.pending)
		if !delivered && !dropped {
			// No room yet: ask for a kick when buffers come, unless they
			// already did.
			if w.broken || !w.rxq.EnableNotify() {
				return
			}
			continue
		}
		w.release(w.pending)
		w.pending = nil
	}
	w.d.kicks.Kick(RxQueue) // burst used up: come back after tx
}

// receive writes frame f (tap's vnet header included) into rx chains: one
// chain, or with mergeable rx buffers as many as it takes, published together
// with num_buffers set (§5.1.6.4). It reports delivered, or dropped if f can
// never fit, or neither if the driver must post more buffers first.
func (w *worker) receive(f []byte) (delivered, dropped bool) {
	total := uint64(len(f))
	maxChains := 1
	if w.mrg {
		maxChains = int(w.rxq.Size())
	}
	var room uint64
	n, skipped := 0, false
	for room < total && n < maxChains {
		if len(w.chains) <= n {
			w.chains = append(w.chains, queue.Chain{})
		}
		c := &w.chains[n]
		ok, sk := w.pop(w.rxq, c)
		skipped = skipped || sk && n > 0
		if !ok {
			if w.broken {
				return false, false
			}
			if !skipped {
				w.rxq.UndoPop(uint16(n))
				return false, false
			}
			break // cannot rewind over a returned chain: drop instead
		}
		if n == 0 && c.WritableLen() < NetHdrSize {
			w.d.metrics.InvalidChains.Add(1)
			_ = w.rxq.Push(c.Head, 0) // head came from Pop: in range
			continue
		}
		room += c.WritableLen()
		n++
	}
	if room < total {
		// The frame fits no buffer the driver can post (without mergeable
		// buffers, one chain must hold it): drop it.
		w.d.metrics.RxDropped.Add(1)
		w.d.log.Debug("rx dropped", "err", ErrFrameTooBig, "len", total)
		if skipped {
			for i := range n {
				_ = w.rxq.Add(w.chains[i].Head, 0)
			}
			w.rxq.Publish()
		} else {
			w.rxq.UndoPop(uint16(n))
		}
		return false, true
	}
	binary.LittleEndian.PutUint16(f[numBuffersOff:], uint16(n))
	var off uint64
	for i := range n {
		c := &w.chains[i]
		k := min(c.WritableLen(), total-off)
		c.WriteAt(f[off:off+k], 0)
		_ = w.rxq.Add(c.Head, uint32(k)) // head came from Pop: in range
		off += k
	}
	w.rxq.Publish()
	w.d.metrics.RxFrames.Add(1)
	w.d.metrics.RxBytes.Add(total - NetHdrSize)
	return true, false
}
