// Package virtio holds what every virtio device of the cubicle VMM shares: the
// spec's device types, status and feature bits, the view of guest memory the
// devices read and write (Memory), and the two small interfaces that connect a
// device to the rest of the VM — Interrupt, which the VM implements to raise
// the device's interrupt line, and Signaler, which the transport hands to a
// device so it can report used buffers, configuration changes and fatal errors.
// It also holds what the devices build their lifecycle from: Lifecycle (the
// Activate, Pause, Resume, Reset and Close sequence), Worker (one goroutine)
// and Kicks (queue notifications). The subpackages build on it: queue parses
// split virtqueues from untrusted guest memory, mmio is the virtio-mmio
// transport that the VM maps on its bus, and blk, net, rng and vsock are the
// device models, one folder each. All of them treat guest memory and everything
// in it as hostile input: a bad guest gets an error status or a dropped buffer,
// never a crash or a hang of the VMM.
package virtio

import "errors"

// DeviceType is a virtio device ID (virtio 1.2 §5 "Device Types").
type DeviceType uint32

// Device IDs used by cubicle (virtio 1.2 §5, table "Device ID").
const (
	DeviceNet   DeviceType = 1  // §5.1 network device
	DeviceBlock DeviceType = 2  // §5.2 block device
	DeviceRNG   DeviceType = 4  // §5.4 entropy device
	DeviceVsock DeviceType = 19 // §5.10 socket device
)

func (t DeviceType) String() string {
	switch t {
	case DeviceNet:
		return "net"
	case DeviceBlock:
		return "block"
	case DeviceRNG:
		return "rng"
	case DeviceVsock:
		return "vsock"
	}
	return "unknown"
}

// Device status bits (virtio 1.2 §2.1 "Device Status Field").
const (
	StatusAcknowledge      = 1   // guest OS found the device
	StatusDriver           = 2   // guest OS knows how to drive it
	StatusDriverOK         = 4   // driver is set up and ready
	StatusFeaturesOK       = 8   // driver accepted the feature set
	StatusDeviceNeedsReset = 64  // device hit an unrecoverable error
	StatusFailed           = 128 // driver gave up on the device
)

// Reserved feature bits that concern the transport and the rings (virtio 1.2 §6
// "Reserved Feature Bits"). Values are bit numbers; use 1<<bit as a mask.
const (
	FeatureRingIndirectDesc = 28 // VIRTIO_F_INDIRECT_DESC, §2.7.5.3
	FeatureRingEventIdx     = 29 // VIRTIO_F_EVENT_IDX, §2.7.7 and §2.7.10
	FeatureVersion1         = 32 // VIRTIO_F_VERSION_1: modern (non-legacy) device
	FeatureAccessPlatform   = 33 // VIRTIO_F_ACCESS_PLATFORM (IOMMU); never offered
	FeatureRingPacked       = 34 // VIRTIO_F_RING_PACKED; never offered
)

// CommonFeatures is the feature set every cubicle device offers on top of its
// own bits: a modern device with indirect descriptors and event-index
// notification suppression.
const CommonFeatures uint64 = 1<<FeatureVersion1 | 1<<FeatureRingIndirectDesc | 1<<FeatureRingEventIdx

// Interrupt status bits, as reported through the transport's interrupt status
// register (virtio 1.2 §4.2.2, InterruptStatus).
const (
	InterruptUsedBuffer   = 1 // a used ring was updated
	InterruptConfigChange = 2 // the configuration space changed
)

// ErrNotActivated is returned when a device is asked to work before the driver
// set DRIVER_OK.
var ErrNotActivated = errors.New("virtio: device not activated")

// Interrupt is the device's interrupt line, implemented by the VM (an irqfd or
// KVM_IRQ_LINE pulse). Trigger may be called from any goroutine.
type Interrupt interface {
	Trigger() error
}

// Signaler is implemented by the transport and handed to a device at
// activation. Its methods may be called from any goroutine and never block on
// the transport's register lock, so a device worker can call them while the
// transport waits for that worker to stop.
type Signaler interface {
	// SignalUsed reports that used rings changed and raises the interrupt.
	// Devices call it once per batch, when queue.Queue.NeedsInterrupt says so.
	SignalUsed() error
	// SignalConfig reports a configuration space change (it bumps the
	// configuration generation) and raises the interrupt.
	SignalConfig() error
	// NeedsReset marks the device broken (DEVICE_NEEDS_RESET, virtio 1.2
	// §2.1.2) and tells the driver with a configuration change interrupt. The
	// device stops using its queues until the driver resets it.
	NeedsReset(err error)
}

// HasFeature reports whether bit is set in features.
func HasFeature(features uint64, bit uint) bool { return features&(1<<bit) != 0 }
