// Package devices is the contract between the VMM and the devices it
// emulates: the interface the port-I/O and MMIO buses route guest accesses
// to, the Bus that does the routing, the InterruptLine a device raises, and
// the optional hooks (Stateful, Pausable) a device implements to take part
// in snapshots and pauses. Device models live in sub-packages (serial,
// i8042) and in package virtio; none of them knows about KVM.
//
// # Concurrency
//
// Bus accesses arrive on vCPU threads, several at once on a multi-vCPU
// guest, and host-side input arrives on other goroutines: every device
// synchronises its own state. Device methods must not block for long — a
// vCPU is stopped while its access is being handled.
package devices

import "errors"

// MMIODevice is a device mapped into guest-physical address space. The bus
// calls Read or Write for each guest access that falls inside the device's
// range; offset is relative to the start of that range and len(data) is
// the access width (1, 2, 4 or 8 bytes). Read fills data; Write consumes
// it. Neither may retain data after returning.
type MMIODevice interface {
	Read(offset uint64, data []byte)
	Write(offset uint64, data []byte)
}

// PIODevice is a device on the port-I/O bus. The contract is MMIODevice's,
// with offset relative to the device's first port and widths of 1, 2 or 4
// bytes.
type PIODevice = MMIODevice

// InterruptLine is one input of the guest's interrupt controllers (a GSI:
// 0..15 reach the PICs and the IOAPIC, 16..23 the IOAPIC only). A device
// drives its line either by level or by edges, never both.
type InterruptLine interface {
	// SetLevel drives a level-sensitive line: asserted until deasserted.
	// A guest that programs the pin edge-triggered sees an interrupt on
	// each deasserted→asserted transition.
	SetLevel(asserted bool) error
	// Trigger sends one edge (assert, then deassert) on the line.
	Trigger() error
}

// Stateful is implemented by devices whose state must survive a snapshot.
// SaveState is called while the VM is paused; RestoreState is called on a
// freshly built device of the same kind, before the restored VM runs. The
// encoding is the device's own and should carry a version byte.
type Stateful interface {
	SaveState() ([]byte, error)
	RestoreState(data []byte) error
}

// Pausable is implemented by devices with their own goroutines (for
// example virtio backends) that must stop touching guest memory while the
// VM is paused or being snapshotted. Pause is called after all vCPUs have
// stopped; Resume before they run again.
type Pausable interface {
	Pause() error
	Resume() error
}

// ErrState is wrapped by RestoreState implementations when saved device
// state is malformed or of an unknown version.
var ErrState = errors.New("devices: malformed device state")
