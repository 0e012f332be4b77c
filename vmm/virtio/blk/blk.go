// Package blk is the virtio block device (virtio 1.2 §5.2) backed by a raw
// image file: the sandbox's root disk. Requests are served synchronously on
// the device's worker goroutine with preadv/pwritev straight between the file
// and guest memory (no bounce buffer), FLUSH maps to fdatasync, and GET_ID
// returns the configured serial. Every request is checked before any I/O: the
// header must be complete, the data a whole number of sectors inside the
// disk, a read-only disk refuses writes; a bad request completes with
// VIRTIO_BLK_S_IOERR (or VIRTIO_BLK_S_UNSUPP for unknown types), and a chain
// with nowhere to put a status byte is returned unused.
//
// Concurrency: the worker goroutine owns the queue, the signaler and all I/O
// on the file between Activate/Resume and Pause/Reset. The lock of
// Device.life (a virtio.Lifecycle) guards the lifecycle fields; it is taken
// after the transport's lock and never by the worker. Close must come after
// the transport's Close (or Reset).
package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// Geometry and sizes.
const (
	// SectorSize is the unit of capacity and request offsets (§5.2.4: "in
	// 512-byte sectors").
	SectorSize = 512
	// QueueSize is the maximum size of the request queue (§5.2.2: one
	// requestq without VIRTIO_BLK_F_MQ).
	QueueSize = 256
	// SegMax is the most data segments per request the device advertises
	// (VIRTIO_BLK_F_SEG_MAX); header and status take the other two slots of a
	// chain no longer than the queue.
	SegMax = QueueSize - 2
	// IDBytes is the length of a GET_ID answer (VIRTIO_BLK_ID_BYTES, §5.2.6).
	IDBytes = 20
	// configSize is the part of struct virtio_blk_config this device fills
	// (§5.2.4, up to and including blk_size).
	configSize = 24
	// reqHeaderSize is sizeof(struct virtio_blk_req header): le32 type, le32
	// reserved, le64 sector (§5.2.6).
	reqHeaderSize = 16
)

// Feature bits (§5.2.3).
const (
	FeatureSizeMax = 1  // VIRTIO_BLK_F_SIZE_MAX
	FeatureSegMax  = 2  // VIRTIO_BLK_F_SEG_MAX
	FeatureRO      = 5  // VIRTIO_BLK_F_RO
	FeatureBlkSize = 6  // VIRTIO_BLK_F_BLK_SIZE
	FeatureFlush   = 9  // VIRTIO_BLK_F_FLUSH
	FeatureDiscard = 13 // VIRTIO_BLK_F_DISCARD (not offered)
)

// Request types (§5.2.6, VIRTIO_BLK_T_*).
const (
	TypeIn          = 0
	TypeOut         = 1
	TypeFlush       = 4
	TypeGetID       = 8
	TypeGetLifetime = 10
	TypeDiscard     = 11
	TypeWriteZeroes = 13
)

// Request status values (§5.2.6, VIRTIO_BLK_S_*).
const (
	StatusOK     = 0
	StatusIOErr  = 1
	StatusUnsupp = 2
)

// Errors.
var (
	ErrNoQueue          = errors.New("blk: request queue not enabled")
	ErrSerialTooLong    = fmt.Errorf("blk: serial longer than %d bytes", IDBytes)
	ErrSnapshotMismatch = errors.New("blk: snapshot does not match the disk")
	// Request errors, counted in Metrics and reported as VIRTIO_BLK_S_IOERR.
	ErrShortHeader     = errors.New("blk: request header shorter than 16 bytes")
	ErrNoStatus        = errors.New("blk: request has no writable status byte")
	ErrUnaligned       = errors.New("blk: data length is not a multiple of 512")
	ErrOutOfRange      = errors.New("blk: request beyond the end of the disk")
	ErrReadOnly        = errors.New("blk: write to a read-only disk")
	ErrUnsupportedType = errors.New("blk: unsupported request type")
)

// Config configures a block device.
type Config struct {
	Path string // raw disk image (regular file or block device)
	// File, if set, is the already open disk image (opened read-write
	// unless ReadOnly): the device takes it over, and Path only names it
	// in messages. A jailed VMM gets its disks this way.
	File     *os.File
	ReadOnly bool
	Serial   string // GET_ID answer, at most IDBytes bytes
	Logger   *slog.Logger
}

// Metrics counts what the device did. Fields are updated atomically by the
// worker and may be read at any time.
type Metrics struct {
	Reads, Writes, Flushes, GetIDs atomic.Uint64
	ReadBytes, WriteBytes          atomic.Uint64
	IOErrors                       atomic.Uint64 // requests completed with IOERR
	Unsupported                    atomic.Uint64 // requests completed with UNSUPP
	InvalidChains                  atomic.Uint64 // chains returned unused
	Interrupts                     atomic.Uint64
}

// State is the device's snapshot: the disk as the guest knew it. Restore
// checks that the disk behind the new device still matches.
type State struct {
	Capacity uint64 `json:"capacity"` // sectors
	ReadOnly bool   `json:"read_only"`
	Serial   string `json:"serial"`
}

// Device is a virtio-blk device.
type Device struct {
	file     *os.File
	fd       int // file's descriptor, for preadv/pwritev/fdatasync
	ro       bool
	capacity uint64 // sectors
	serial   [IDBytes]byte
	serialS  string
	config   [configSize]byte
	log      *slog.Logger
	kicks    *virtio.Kicks
	metrics  Metrics

	life   *virtio.Lifecycle // its lock guards worker
	worker virtio.Worker
}

// New opens the disk image and returns a block device over it.
func New(cfg Config) (*Device, error) {
	if len(cfg.Serial) > IDBytes {
		if cfg.File != nil {
			cfg.File.Close()
		}
		return nil, ErrSerialTooLong
	}
	f := cfg.File
	if f == nil {
		flags := os.O_RDWR
		if cfg.ReadOnly {
			flags = os.O_RDONLY
		}
		var err error
		if f, err = os.OpenFile(cfg.Path, flags|unix.O_CLOEXEC, 0); err != nil {
			return nil, fmt.Errorf("blk: open disk: %w", err)
		}
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("blk: size of %s: %w", cfg.Path, err)
	}
	d := &Device{
		file:     f,
		fd:       int(f.Fd()),
		ro:       cfg.ReadOnly,
		capacity: uint64(size) / SectorSize,
		serialS:  cfg.Serial,
		log:      cfg.Logger,
		kicks:    virtio.NewKicks(),
	}
	d.life = virtio.NewLifecycle(d.kicks, d.worker.Stop, os.ErrClosed)
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	if size%SectorSize != 0 {
		d.log.Warn("disk size is not a whole number of sectors; the tail is unreachable", "path", cfg.Path, "size", size)
	}
	copy(d.serial[:], cfg.Serial)
	// struct virtio_blk_config (§5.2.4): capacity le64 @0, size_max le32 @8,
	// seg_max le32 @12, geometry @16, blk_size le32 @20.
	binary.LittleEndian.PutUint64(d.config[0:], d.capacity)
	binary.LittleEndian.PutUint32(d.config[12:], SegMax)
	binary.LittleEndian.PutUint32(d.config[20:], SectorSize)
	return d, nil
}

// Close closes the disk file. The device must be reset (or never activated).
func (d *Device) Close() error { return d.life.Close(d.file.Close) }

// Capacity returns the disk size in sectors.
func (d *Device) Capacity() uint64 { return d.capacity }

// Metrics returns the device's counters.
func (d *Device) Metrics() *Metrics { return &d.metrics }

// Save returns the device's snapshot.
func (d *Device) Save() State {
	return State{Capacity: d.capacity, ReadOnly: d.ro, Serial: d.serialS}
}

// Restore checks that st describes this device's disk. It must be called
// before the transport's Restore.
func (d *Device) Restore(st State) error {
	if st != d.Save() {
		return fmt.Errorf("%w: snapshot %+v, device %+v", ErrSnapshotMismatch, st, d.Save())
	}
	return nil
}

// Type implements mmio.Device.
func (d *Device) Type() virtio.DeviceType { return virtio.DeviceBlock }

// Features implements mmio.Device.
func (d *Device) Features() uint64 {
	f := virtio.CommonFeatures | 1<<FeatureSegMax | 1<<FeatureBlkSize | 1<<FeatureFlush
	if d.ro {
		f |= 1 << FeatureRO
	}
	return f
}

// QueueMaxSizes implements mmio.Device.
func (d *Device) QueueMaxSizes() []uint16 { return []uint16{QueueSize} }

// ReadConfig implements mmio.Device.
func (d *Device) ReadConfig(offset uint64, data []byte) {
	clear(data)
	if offset < configSize {
		copy(data, d.config[offset:])
	}
}

// WriteConfig implements mmio.Device: the configuration is read-only
// (VIRTIO_BLK_F_CONFIG_WCE is not offered).
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
	r := &request{}
	for {
		d.process(q, sig, r)
		select {
		case <-stop:
			return
		case <-d.kicks.C():
			d.kicks.Take()
		}
	}
}

func (d *Device) process(q *queue.Queue, sig virtio.Signaler, r *request) {
	for {
		q.DisableNotify()
		for {
			ok, err := q.Pop(&r.chain)
			if errors.Is(err, queue.ErrBroken) {
				sig.NeedsReset(fmt.Errorf("blk: %w", err))
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
			_ = q.Push(r.chain.Head, d.handle(r)) // head came from Pop: in range
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
