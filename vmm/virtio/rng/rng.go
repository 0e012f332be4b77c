// Package rng is the virtio entropy device (virtio 1.2 §5.4): the guest posts
// device-writable buffers on its single request queue and the device fills
// them from the host's crypto/rand, so that a freshly restored sandbox can
// reseed its kernel RNG from the host instead of replaying the entropy it had
// when the template was snapshotted. The device has no configuration space
// and no state beyond its queue.
//
// Concurrency: the worker goroutine (started by Activate/Resume, stopped by
// Pause/Reset) owns the queue and the signaler. The lock of Device.life (a
// virtio.Lifecycle) guards the lifecycle fields and is taken after the
// transport's lock, never by the worker.
package rng

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync/atomic"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

const (
	// QueueSize is the maximum size of the request queue (§5.4.2: one
	// queue, requestq).
	QueueSize = 256
	// MaxBytesPerRequest caps the entropy written into one chain, so a guest
	// posting huge buffers cannot keep the worker busy.
	MaxBytesPerRequest = 64 << 10
)

// ErrNoQueue is returned by Activate when the driver did not enable the
// request queue.
var ErrNoQueue = errors.New("rng: request queue not enabled")

// Config configures an entropy device.
type Config struct {
	// Source is where entropy comes from; nil means crypto/rand.
	Source io.Reader
	Logger *slog.Logger
}

// Metrics counts what the device did. Fields are updated atomically by the
// worker and may be read at any time.
type Metrics struct {
	Requests      atomic.Uint64 // chains completed
	Bytes         atomic.Uint64 // entropy bytes written
	InvalidChains atomic.Uint64 // malformed chains returned unused
	SourceErrors  atomic.Uint64 // entropy source failures (chain returned empty)
	Interrupts    atomic.Uint64 // used-buffer interrupts raised
}

// Device is a virtio-rng device.
type Device struct {
	src     io.Reader
	log     *slog.Logger
	kicks   *virtio.Kicks
	metrics Metrics

	life   *virtio.Lifecycle // its lock guards worker
	worker virtio.Worker
}

// New returns an entropy device.
func New(cfg Config) *Device {
	d := &Device{src: cfg.Source, log: cfg.Logger, kicks: virtio.NewKicks()}
	if d.src == nil {
		d.src = rand.Reader
	}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	// The device has no Close, so the closed error is never returned.
	d.life = virtio.NewLifecycle(d.kicks, d.worker.Stop, nil)
	return d
}

// Metrics returns the device's counters.
func (d *Device) Metrics() *Metrics { return &d.metrics }

// Type implements mmio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.DeviceRNG }

// Features implements mmio.Device.
func (d *Device) Features() uint64 { return virtio.CommonFeatures }

// QueueMaxSizes implements mmio.Device.
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize} }

// ReadConfig implements mmio.Device: there is no configuration space.
func (d *Device) ReadConfig(offset uint64, data []byte) { clear(data) }

// WriteConfig implements mmio.Device.
func (d *Device) WriteConfig(offset uint64, data []byte) {}

// Activate implements mmio.Device.
func (d *Device) Activate(mem virtio.Memory, features uint64, qs []*queue.Queue, sig virtio.Signaler) error {
	if len(qs) != 1 || qs[0] == nil {
		return ErrNoQueue
	}
	q := qs[0]
	return d.life.Activate(nil, func() {
		d.worker.Start(func(stop <-chan struct{}) { d.run(q, sig, stop) })
	})
}

// Notify implements mmio.Device.
func (d *Device) Notify(i int) { d.life.Notify(i) }

// Pause implements mmio.Device.
func (d *Device) Pause() { d.life.Pause() }

// Resume implements mmio.Device.
func (d *Device) Resume() error { return d.life.Resume() }

// Reset implements mmio.Device.
func (d *Device) Reset() { d.life.Reset(nil) }

func (d *Device) run(q *queue.Queue, sig virtio.Signaler, stop <-chan struct{}) {
	var c queue.Chain
	buf := make([]byte, 4096)
	for {
		d.process(q, sig, &c, buf)
		select {
		case <-stop:
			return
		case <-d.kicks.C():
			d.kicks.Take()
		}
	}
}

func (d *Device) process(q *queue.Queue, sig virtio.Signaler, c *queue.Chain, buf []byte) {
	for {
		q.DisableNotify()
		for {
			ok, err := q.Pop(c)
			if errors.Is(err, queue.ErrBroken) {
				sig.NeedsReset(fmt.Errorf("rng: %w", err))
				return
			}
			if err != nil {
				d.metrics.InvalidChains.Add(1)
				d.log.Debug("invalid chain", "err", err)
				continue
			}
			if !ok {
				break
			}
			n := d.fill(c, buf)
			_ = q.Push(c.Head, n) // head came from Pop: in range
			d.metrics.Requests.Add(1)
		}
		if !q.EnableNotify() {
			break
		}
	}
	if q.NeedsInterrupt() {
		d.metrics.Interrupts.Add(1)
		if err := sig.SignalUsed(); err != nil {
			d.log.Warn("interrupt failed", "err", err)
		}
	}
}

// fill writes up to MaxBytesPerRequest random bytes into the chain's
// writable buffers and returns how many it wrote.
func (d *Device) fill(c *queue.Chain, buf []byte) uint32 {
	want := min(c.WritableLen(), MaxBytesPerRequest)
	var off uint64
	for off < want {
		b := buf[:min(uint64(len(buf)), want-off)]
		if _, err := io.ReadFull(d.src, b); err != nil {
			d.metrics.SourceErrors.Add(1)
			d.log.Warn("entropy source failed", "err", err)
			break
		}
		off += uint64(c.WriteAt(b, off))
	}
	d.metrics.Bytes.Add(off)
	return uint32(off)
}
