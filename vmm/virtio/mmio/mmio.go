// Package mmio is the virtio-mmio transport, version 2 (virtio 1.2 §4.2): the
// register window through which a guest driver discovers a device, negotiates
// features, programs its virtqueues and notifies it. The VM maps one Transport
// per device on its MMIO bus (Size bytes at some base), announces it to Linux
// with the Cmdline fragment, and routes the device's interrupt line to a
// virtio.Interrupt. Every register write is guest input: writes that the spec
// forbids in the current state are ignored, and a driver that programs
// impossible queues gets DEVICE_NEEDS_RESET rather than a running device. The
// transport also snapshots and restores the device-independent state
// (features, status, queue addresses and ring positions).
//
// Concurrency: Read and Write run on vCPU goroutines, possibly several at
// once; Transport.mu serialises them and the lifecycle calls (Pause, Resume,
// Save, Restore, Close). Lock order: Transport.mu, then the device's own
// lifecycle lock (taken inside Device.Activate/Pause/Resume/Reset). Device
// workers never take Transport.mu: the Signaler they are given uses atomics
// only, so Reset can wait for a worker while holding Transport.mu.
package mmio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// Register window facts (virtio 1.2 §4.2.2).
const (
	// Size is the length of one device's register window; Linux maps 512
	// bytes, the 4 KiB page keeps devices page-aligned.
	Size = 0x1000
	// MagicValue is "virt" in little endian (§4.2.2, MagicValue).
	MagicValue = 0x74726976
	// Version is the modern (non-legacy) virtio-mmio version (§4.2.2).
	Version = 2
	// VendorID is reported in VendorID: "cubi" in little endian.
	VendorID = 0x69627563
)

// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
const (
	RegMagicValue        = 0x000
	RegVersion           = 0x004
	RegDeviceID          = 0x008
	RegVendorID          = 0x00c
	RegDeviceFeatures    = 0x010
	RegDeviceFeaturesSel = 0x014
	RegDriverFeatures    = 0x020
	RegDriverFeaturesSel = 0x024
	RegQueueSel          = 0x030
	RegQueueNumMax       = 0x034
	RegQueueNum          = 0x038
	RegQueueReady        = 0x044
	RegQueueNotify       = 0x050
	RegInterruptStatus   = 0x060
	RegInterruptACK      = 0x064
	RegStatus            = 0x070
	RegQueueDescLow      = 0x080
	RegQueueDescHigh     = 0x084
	RegQueueDriverLow    = 0x090
	RegQueueDriverHigh   = 0x094
	RegQueueDeviceLow    = 0x0a0
	RegQueueDeviceHigh   = 0x0a4
	RegSHMSel            = 0x0ac
	RegSHMLenLow         = 0x0b0
	RegSHMLenHigh        = 0x0b4
	RegSHMBaseLow        = 0x0b8
	RegSHMBaseHigh       = 0x0bc
	RegQueueReset        = 0x0c0
	RegConfigGeneration  = 0x0fc
	RegConfig            = 0x100
)

// NotifyOffset is where the driver writes a queue index to notify the device;
// the VM registers an ioeventfd at Base+NotifyOffset (4 bytes, datamatch =
// queue index) and hands it to AttachIOEventFD.
const NotifyOffset = RegQueueNotify

// Errors.
var (
	ErrNotPaused       = errors.New("mmio: device must be paused to save")
	ErrRestoreMismatch = errors.New("mmio: snapshot does not match this device")
	ErrRestoreBusy     = errors.New("mmio: restore into a device the driver already set up")
	ErrActivate        = errors.New("mmio: device activation failed")
	ErrClosed          = errors.New("mmio: transport closed")
)

// MMIODevice is how the VM's bus sees a device: offsets are relative to the
// device's base, len(data) is 1, 2, 4 or 8. It is identical to the interface
// of package vmm, so a *Transport plugs into the VM's bus directly.
type MMIODevice interface {
	Read(offset uint64, data []byte)
	Write(offset uint64, data []byte)
}

var _ MMIODevice = (*Transport)(nil)

// Device is a virtio device model that the transport drives. Implementations
// run their queue work on their own worker goroutine between Activate and
// Pause/Reset.
type Device interface {
	// Type returns the virtio device ID.
	Type() virtio.DeviceType
	// Features returns the feature bits the device offers.
	Features() uint64
	// QueueMaxSizes returns the maximum size of each queue; its length is the
	// number of queues.
	QueueMaxSizes() []uint16
	// ReadConfig and WriteConfig access the device configuration space.
	// offset may lie beyond it: reads then return zeros, writes are ignored.
	ReadConfig(offset uint64, data []byte)
	WriteConfig(offset uint64, data []byte)
	// Activate starts the device with the negotiated features and queues
	// (nil for a queue the driver did not enable). Called on DRIVER_OK and on
	// restore of a running device.
	Activate(mem virtio.Memory, features uint64, queues []*queue.Queue, sig virtio.Signaler) error
	// Notify is the driver's notification for queue i. It must not block and
	// must be safe to call in any state, from any goroutine.
	Notify(i int)
	// Pause stops the worker (keeping queues and backend connections) and
	// returns once it has stopped; Resume starts it again.
	Pause()
	Resume() error
	// Reset stops the worker, drops queues and per-driver state, and returns
	// once it has stopped. It must be idempotent.
	Reset()
}

// Config says where the device sits in the VM.
type Config struct {
	Base      uint64           // guest physical base of the register window
	IRQ       uint32           // interrupt line (GSI)
	Memory    virtio.Memory    // guest RAM
	Interrupt virtio.Interrupt // the device's interrupt line
	Logger    *slog.Logger     // nil: discard
}

type queueRegs struct {
	cfg   queue.Config
	ready bool
}

// Transport is one virtio-mmio device window. See the package comment for
// concurrency.
type Transport struct {
	dev      Device
	cfg      Config
	log      *slog.Logger
	offered  uint64
	maxSizes []uint16

	mu             sync.Mutex // guards the fields below
	devFeatSel     uint32
	drvFeatSel     uint32
	queueSel       uint32
	shmSel         uint32
	driverFeatures uint64
	status         uint32
	queues         []queueRegs
	active         []*queue.Queue // non-nil while activated
	paused         bool
	closed         bool
	efds           []*os.File
	efdWG          sync.WaitGroup

	live       atomic.Bool // activated and not broken: notifications reach the device
	isr        atomic.Uint32
	configGen  atomic.Uint32
	needsReset atomic.Bool
}

// New wraps dev in a virtio-mmio transport.
func New(dev Device, cfg Config) (*Transport, error) {
	if dev == nil || cfg.Memory == nil || cfg.Interrupt == nil {
		return nil, errors.New("mmio: device, memory and interrupt are required")
	}
	sizes := dev.QueueMaxSizes()
	for i, s := range sizes {
		if s == 0 || s > queue.MaxSize || s&(s-1) != 0 {
			return nil, fmt.Errorf("mmio: %v queue %d has invalid max size %d", dev.Type(), i, s)
		}
	}
	t := &Transport{
		dev:      dev,
		cfg:      cfg,
		log:      cfg.Logger,
		offered:  dev.Features(),
		maxSizes: sizes,
	}
	if t.log == nil {
		t.log = slog.New(slog.DiscardHandler)
	}
	t.log = t.log.With("device", dev.Type().String(), "base", fmt.Sprintf("%#x", cfg.Base))
	t.resetRegs()
	return t, nil
}

// Cmdline returns the kernel command-line fragment that announces a
// virtio-mmio device to Linux (Documentation/admin-guide/kernel-parameters.txt,
// virtio_mmio.device=<size>@<baseaddr>:<irq>).
func Cmdline(base uint64, irq uint32) string {
	return fmt.Sprintf("virtio_mmio.device=%dK@%#x:%d", Size/1024, base, irq)
}

// Cmdline returns the kernel command-line fragment for this device.
func (t *Transport) Cmdline() string { return Cmdline(t.cfg.Base, t.cfg.IRQ) }

// Base returns the device's guest physical base address.
func (t *Transport) Base() uint64 { return t.cfg.Base }

// IRQ returns the device's interrupt line.
func (t *Transport) IRQ() uint32 { return t.cfg.IRQ }

// Device returns the device model.
func (t *Transport) Device() Device { return t.dev }

func (t *Transport) resetRegs() {
	t.devFeatSel, t.drvFeatSel, t.queueSel, t.shmSel = 0, 0, 0, 0
	t.driverFeatures = 0
	t.status = 0
	t.queues = make([]queueRegs, len(t.maxSizes))
	for i, s := range t.maxSizes {
		t.queues[i].cfg.Size = s // QueueNum resets to the maximum
	}
	t.active = nil
	t.paused = false
	t.live.Store(false)
	t.isr.Store(0)
	t.needsReset.Store(false)
}

// Read implements MMIODevice.
func (t *Transport) Read(offset uint64, data []byte) {
	if offset >= RegConfig {
		if offset < Size {
			t.dev.ReadConfig(offset-RegConfig, data)
		} else {
			clear(data)
		}
		return
	}
	clear(data)
	if len(data) != 4 || offset%4 != 0 {
		return // §4.2.2.2: control registers are 32-bit only
	}
	binary.LittleEndian.PutUint32(data, t.readReg(offset))
}

func (t *Transport) readReg(offset uint64) uint32 {
	switch offset {
	case RegMagicValue:
		return MagicValue
	case RegVersion:
		return Version
	case RegDeviceID:
		return uint32(t.dev.Type())
	case RegVendorID:
		return VendorID
	case RegInterruptStatus:
		return t.isr.Load()
	case RegConfigGeneration:
		return t.configGen.Load()
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch offset {
	case RegDeviceFeatures:
		if t.devFeatSel < 2 {
			return uint32(t.offered >> (32 * t.devFeatSel))
		}
	case RegQueueNumMax:
		if q := t.selected(); q != nil {
			return uint32(t.maxSizes[t.queueSel])
		}
	case RegQueueNum:
		if q := t.selected(); q != nil {
			return uint32(q.cfg.Size)
		}
	case RegQueueReady:
		if q := t.selected(); q != nil && q.ready {
			return 1
		}
	case RegQueueDescLow, RegQueueDescHigh, RegQueueDriverLow, RegQueueDriverHigh,
		RegQueueDeviceLow, RegQueueDeviceHigh:
		if q := t.selected(); q != nil {
			return uint32(*t.addrReg(q, offset&^4) >> (8 * (offset & 4)))
		}
	case RegStatus:
		s := t.status
		if t.needsReset.Load() {
			s |= virtio.StatusDeviceNeedsReset
		}
		return s
	case RegSHMLenLow, RegSHMLenHigh:
		return 0xffffffff // §4.2.2: no shared memory regions: length -1
	}
	return 0 // write-only and reserved registers read as zero
}

// Write implements MMIODevice.
func (t *Transport) Write(offset uint64, data []byte) {
	if offset >= RegConfig {
		if offset < Size {
			t.mu.Lock()
			t.dev.WriteConfig(offset-RegConfig, data)
			t.mu.Unlock()
		}
		return
	}
	if len(data) != 4 || offset%4 != 0 {
		return
	}
	v := binary.LittleEndian.Uint32(data)
	switch offset {
	case RegQueueNotify:
		t.notify(v)
		return
	case RegInterruptACK:
		t.isr.And(^v)
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	switch offset {
	case RegDeviceFeaturesSel:
		t.devFeatSel = v
	case RegDriverFeaturesSel:
		t.drvFeatSel = v
	case RegDriverFeatures:
		// §4.2.2.3 / §3.1.1: only between DRIVER and FEATURES_OK.
		if t.status&virtio.StatusDriver == 0 || t.status&virtio.StatusFeaturesOK != 0 || t.drvFeatSel >= 2 {
			return
		}
		sh := 32 * t.drvFeatSel
		t.driverFeatures = t.driverFeatures&^(0xffffffff<<sh) | uint64(v)<<sh
	case RegQueueSel:
		t.queueSel = v
	case RegQueueNum:
		if q := t.writableQueue(); q != nil {
			q.cfg.Size = 0 // validated at DRIVER_OK: 0 is never valid
			if v <= 0xffff {
				q.cfg.Size = uint16(v)
			}
		}
	case RegQueueReady:
		if q := t.selected(); q != nil && t.status&virtio.StatusDriverOK == 0 {
			q.ready = v == 1
		}
	case RegQueueDescLow, RegQueueDescHigh, RegQueueDriverLow, RegQueueDriverHigh,
		RegQueueDeviceLow, RegQueueDeviceHigh:
		if q := t.writableQueue(); q != nil {
			p := t.addrReg(q, offset&^4)
			sh := 8 * (offset & 4)
			*p = *p&^(0xffffffff<<sh) | uint64(v)<<sh
		}
	case RegStatus:
		t.writeStatus(v)
	case RegSHMSel:
		t.shmSel = v
	default:
		// RegQueueReset needs VIRTIO_F_RING_RESET, which is not offered;
		// read-only and reserved registers ignore writes.
	}
}

// selected returns the registers of the selected queue, or nil.
func (t *Transport) selected() *queueRegs {
	if t.queueSel >= uint32(len(t.queues)) {
		return nil
	}
	return &t.queues[t.queueSel]
}

// writableQueue returns the selected queue if the driver may still program it
// (§4.2.2.3: not while QueueReady is set).
func (t *Transport) writableQueue() *queueRegs {
	q := t.selected()
	if q == nil || q.ready || t.status&virtio.StatusDriverOK != 0 {
		return nil
	}
	return q
}

func (t *Transport) addrReg(q *queueRegs, low uint64) *uint64 {
	switch low {
	case RegQueueDescLow:
		return &q.cfg.DescAddr
	case RegQueueDriverLow:
		return &q.cfg.DriverAddr
	default:
		return &q.cfg.DeviceAddr
	}
}

func (t *Transport) notify(v uint32) {
	if t.live.Load() && v < uint32(len(t.maxSizes)) {
		t.dev.Notify(int(v))
	}
}

// writeStatus applies a driver write to the status register (§2.1, §3.1.1).
// Called with t.mu held.
func (t *Transport) writeStatus(v uint32) {
	if v == 0 {
		t.reset()
		return
	}
	old := t.status
	if v&old != old {
		t.log.Debug("driver tried to clear status bits", "old", old, "new", v)
		return
	}
	added := v &^ old
	if added&virtio.StatusFeaturesOK != 0 {
		switch {
		case v&virtio.StatusDriver == 0:
			v &^= virtio.StatusFeaturesOK
		case t.driverFeatures&^t.offered != 0:
			t.log.Debug("driver accepted features that were not offered", "features", t.driverFeatures, "offered", t.offered)
			v &^= virtio.StatusFeaturesOK
		case !virtio.HasFeature(t.driverFeatures, virtio.FeatureVersion1):
			t.log.Debug("legacy driver refused: VIRTIO_F_VERSION_1 not accepted")
			v &^= virtio.StatusFeaturesOK
		}
	}
	if added&virtio.StatusDriverOK != 0 {
		if v&virtio.StatusFeaturesOK == 0 {
			t.log.Debug("DRIVER_OK without FEATURES_OK")
			v &^= virtio.StatusDriverOK
		} else if err := t.activate(nil); err != nil {
			t.log.Warn("device activation failed", "err", err)
			t.markNeedsReset()
		}
	}
	t.status = v
}

// activate builds the ready queues (restored from st if given) and starts the
// device. Called with t.mu held.
func (t *Transport) activate(st []QueueState) error {
	qs := make([]*queue.Queue, len(t.queues))
	for i, qr := range t.queues {
		if !qr.ready {
			continue
		}
		if qr.cfg.Size > t.maxSizes[i] {
			return fmt.Errorf("%w: queue %d size %d above maximum %d", ErrActivate, i, qr.cfg.Size, t.maxSizes[i])
		}
		var err error
		if st != nil {
			qs[i], err = queue.Restore(t.cfg.Memory, st[i].State, t.driverFeatures)
		} else {
			qs[i], err = queue.New(t.cfg.Memory, qr.cfg, t.driverFeatures)
		}
		if err != nil {
			return fmt.Errorf("%w: queue %d: %w", ErrActivate, i, err)
		}
	}
	if err := t.dev.Activate(t.cfg.Memory, t.driverFeatures, qs, signaler{t}); err != nil {
		return fmt.Errorf("%w: %w", ErrActivate, err)
	}
	t.active = qs
	t.live.Store(true)
	return nil
}

// reset is the device reset of §2.1.1/§4.2.3.1: the worker stops, and every
// register returns to its initial value. Called with t.mu held.
func (t *Transport) reset() {
	t.live.Store(false)
	t.dev.Reset()
	t.resetRegs()
}

func (t *Transport) markNeedsReset() {
	t.live.Store(false)
	t.needsReset.Store(true)
	t.isr.Or(virtio.InterruptConfigChange)
	if err := t.cfg.Interrupt.Trigger(); err != nil {
		t.log.Warn("interrupt failed", "err", err)
	}
}

// signaler is the virtio.Signaler handed to the device.
type signaler struct{ t *Transport }

func (s signaler) SignalUsed() error {
	s.t.isr.Or(virtio.InterruptUsedBuffer)
	return s.t.cfg.Interrupt.Trigger()
}

func (s signaler) SignalConfig() error {
	s.t.configGen.Add(1)
	s.t.isr.Or(virtio.InterruptConfigChange)
	return s.t.cfg.Interrupt.Trigger()
}

func (s signaler) NeedsReset(err error) {
	s.t.log.Warn("device needs reset", "err", err)
	s.t.markNeedsReset()
}

// AttachIOEventFD makes the eventfd fd, which the VM registered with
// KVM_IOEVENTFD for Base+NotifyOffset with datamatch queue, deliver that
// queue's notifications without a vCPU exit to userspace. The transport owns
// fd from now on and closes it in Close.
func (t *Transport) AttachIOEventFD(queue int, fd int) error {
	if queue < 0 || queue >= len(t.maxSizes) {
		return fmt.Errorf("mmio: ioeventfd for queue %d: no such queue", queue)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return fmt.Errorf("mmio: ioeventfd: %w", err)
	}
	f := os.NewFile(uintptr(fd), "ioeventfd")
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		f.Close()
		return ErrClosed
	}
	t.efds = append(t.efds, f)
	t.efdWG.Add(1)
	go func() {
		defer t.efdWG.Done()
		var buf [8]byte
		for {
			if _, err := f.Read(buf[:]); err != nil {
				return // closed
			}
			t.notify(uint32(queue))
		}
	}()
	return nil
}

// Pause stops the device's worker so that its state can be saved. The driver
// sees nothing; notifications are kept and acted on after Resume.
func (t *Transport) Pause() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.active != nil && !t.paused {
		t.dev.Pause()
		t.paused = true
	}
}

// Resume restarts a paused device.
func (t *Transport) Resume() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.paused {
		return nil
	}
	t.paused = false
	if err := t.dev.Resume(); err != nil {
		return fmt.Errorf("mmio: resume %v: %w", t.dev.Type(), err)
	}
	return nil
}

// Close resets the device and stops the ioeventfd goroutines. The device
// model itself (its files and sockets) belongs to the caller.
func (t *Transport) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	t.reset()
	efds := t.efds
	t.efds = nil
	t.mu.Unlock()
	var errs []error
	for _, f := range efds {
		errs = append(errs, f.Close())
	}
	t.efdWG.Wait()
	return errors.Join(errs...)
}
