//go:build linux && amd64

package vmm

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/memory"
	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	"github.com/cubicle-dev/cubicle/vmm/virtio/mmio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/net"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

// virtioStateVersion is the version of the snapshot encoding of a virtio
// device (virtioState); RestoreState refuses any other.
const virtioStateVersion = 1

// ErrVirtioState is wrapped by the errors of a virtio device's snapshot
// state that cannot be restored (unknown version, another device type or
// place, malformed data).
var ErrVirtioState = errors.New("vmm: virtio device state does not fit")

// VirtioDevice is a virtio device model on the VM: its virtio-mmio
// transport in one page of the MMIO window (MMIOBase up), its interrupt
// line (an irqfd on the in-kernel IOAPIC) and one ioeventfd per queue, so
// that a guest's QueueNotify write wakes the device without a vCPU exit to
// the VMM. It is created by VM.AddVirtio (or AddBlock, AddRNG, AddVsock,
// AddNet) and belongs to the VM, which closes it.
type VirtioDevice struct {
	name string
	base uint64
	irq  uint32
	dev  mmio.Device
	tr   *mmio.Transport
	vm   *kvm.VM
	// efds are the registered ioeventfds (the transport owns their fds).
	efds []*kvm.IOEventFD
}

// virtioState is what a snapshot holds for one virtio device: where it
// sits, the transport's state and the device model's own state (for
// models that implement devices.Stateful).
type virtioState struct {
	Version   int               `json:"version"`
	Type      virtio.DeviceType `json:"type"`
	Base      uint64            `json:"base"`
	IRQ       uint32            `json:"irq"`
	Transport mmio.State        `json:"transport"`
	Device    []byte            `json:"device,omitempty"`
}

// stateful is devices.Stateful, spelled out so that device models need not
// import package devices.
type stateful interface {
	SaveState() ([]byte, error)
	RestoreState(data []byte) error
}

// Name returns the name the device's snapshot state is kept under.
func (d *VirtioDevice) Name() string { return d.name }

// Base returns the guest-physical address of the register window.
func (d *VirtioDevice) Base() uint64 { return d.base }

// IRQ returns the device's interrupt line (GSI).
func (d *VirtioDevice) IRQ() uint32 { return d.irq }

// Type returns the virtio device type.
func (d *VirtioDevice) Type() virtio.DeviceType { return d.dev.Type() }

// Device returns the device model (a *blk.Device, *rng.Device, ...).
func (d *VirtioDevice) Device() mmio.Device { return d.dev }

// Cmdline returns the kernel command-line fragment that announces the
// device to Linux.
func (d *VirtioDevice) Cmdline() string { return mmio.Cmdline(d.base, d.irq) }

// Read implements devices.MMIODevice.
func (d *VirtioDevice) Read(offset uint64, data []byte) { d.tr.Read(offset, data) }

// Write implements devices.MMIODevice.
func (d *VirtioDevice) Write(offset uint64, data []byte) { d.tr.Write(offset, data) }

// Pause implements devices.Pausable: the device's worker stops.
func (d *VirtioDevice) Pause() error {
	d.tr.Pause()
	return nil
}

// Resume implements devices.Pausable.
func (d *VirtioDevice) Resume() error { return d.tr.Resume() }

// SaveState implements devices.Stateful. The VM is paused, so the
// device's worker is stopped and its rings are still.
func (d *VirtioDevice) SaveState() ([]byte, error) {
	ts, err := d.tr.Save()
	if err != nil {
		return nil, err
	}
	st := virtioState{Version: virtioStateVersion, Type: d.dev.Type(), Base: d.base, IRQ: d.irq, Transport: ts}
	if s, ok := d.dev.(stateful); ok {
		if st.Device, err = s.SaveState(); err != nil {
			return nil, err
		}
	}
	return json.Marshal(st)
}

// RestoreState implements devices.Stateful: the device model's state
// first, then the transport's, which re-activates a device the driver had
// running (its worker then picks up requests the guest posted before the
// snapshot).
func (d *VirtioDevice) RestoreState(data []byte) error {
	st, err := decodeVirtioState(data)
	if err != nil {
		return err
	}
	if st.Type != d.dev.Type() || st.Base != d.base || st.IRQ != d.irq {
		return fmt.Errorf("%w: snapshot has %v at %#x IRQ %d, device is %v at %#x IRQ %d",
			ErrVirtioState, st.Type, st.Base, st.IRQ, d.dev.Type(), d.base, d.irq)
	}
	if s, ok := d.dev.(stateful); ok {
		if err := s.RestoreState(st.Device); err != nil {
			return err
		}
	} else if len(st.Device) > 0 {
		return fmt.Errorf("%w: snapshot has device state for a %v device, which keeps none", ErrVirtioState, st.Type)
	}
	return d.tr.Restore(st.Transport)
}

func decodeVirtioState(data []byte) (*virtioState, error) {
	var st virtioState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrVirtioState, err)
	}
	if st.Version != virtioStateVersion {
		return nil, fmt.Errorf("%w: version %d, this VMM reads %d", ErrVirtioState, st.Version, virtioStateVersion)
	}
	return &st, nil
}

// unregisterNotify takes the ioeventfds off the VM; KVM finds them by
// descriptor, so this comes before the transport closes them.
func (d *VirtioDevice) unregisterNotify() error {
	var errs []error
	for _, e := range d.efds {
		errs = append(errs, d.vm.UnregisterIOEventFD(e))
	}
	d.efds = nil
	return errors.Join(errs...)
}

// close takes the ioeventfds off the VM, stops the transport (the
// device's worker and the ioeventfd goroutines) and closes the device
// model. Guest memory must still be mapped: a worker may be using it until
// the transport has stopped it.
func (d *VirtioDevice) close() error {
	errs := []error{d.unregisterNotify(), d.tr.Close()}
	if c, ok := d.dev.(io.Closer); ok {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// AddVirtio puts a virtio device model on the VM behind a virtio-mmio
// transport, and takes ownership of dev (Close closes it if it is an
// io.Closer). On a new VM it allocates the next page of the MMIO window
// and the next interrupt line, and LoadKernel announces the device on the
// kernel command line (virtio_mmio.device=4K@<base>:<irq>), so devices
// are added before LoadKernel, in the order the guest should number them.
// On a VM restored from a snapshot the device takes the place, and the
// transport and device state, saved under name; a name the snapshot does
// not have is an error wrapping ErrIncompatible.
func (vm *VM) AddVirtio(name string, dev mmio.Device) (_ *VirtioDevice, err error) {
	if name == "" || dev == nil {
		return nil, errors.New("vmm: a virtio device needs a name and a device model")
	}
	base, irq, fragment, err := vm.placeVirtio(name)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil && fragment != "" {
			vm.mu.Lock()
			vm.cmdlineExtra = removeString(vm.cmdlineExtra, fragment)
			vm.mu.Unlock()
		}
	}()
	vm.mu.Lock()
	line := vm.line(irq)
	vm.mu.Unlock()
	tr, err := mmio.New(dev, mmio.Config{Base: base, IRQ: irq, Memory: vm.mem, Interrupt: line, Logger: vm.log})
	if err != nil {
		return nil, err
	}
	d := &VirtioDevice{name: name, base: base, irq: irq, dev: dev, tr: tr, vm: vm.kvm}
	defer func() {
		if err != nil {
			_ = d.unregisterNotify()
			_ = tr.Close()
		}
	}()
	for q := range dev.QueueMaxSizes() {
		if err := d.attachNotify(q); err != nil {
			return nil, err
		}
	}
	if err := vm.addDevice(vm.mmio, name, base, mmio.Size, d); err != nil {
		return nil, err
	}
	vm.mu.Lock()
	vm.virtio = append(vm.virtio, d)
	vm.mu.Unlock()
	return d, nil
}

// attachNotify routes the guest's QueueNotify writes of queue q through
// an ioeventfd (4-byte write of q at base+QueueNotify) to the transport.
func (d *VirtioDevice) attachNotify(q int) error {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("vmm: eventfd for %s queue %d: %w", d.name, q, err)
	}
	e := &kvm.IOEventFD{FD: fd, Addr: d.base + mmio.NotifyOffset, Len: 4, Datamatch: uint64(q), HasDatamatch: true}
	if err := d.vm.RegisterIOEventFD(e); err != nil {
		unix.Close(fd)
		return err
	}
	d.efds = append(d.efds, e)
	return d.tr.AttachIOEventFD(q, fd) // the transport owns fd, even on error
}

// placeVirtio decides where the device named name sits: from the
// snapshot on a restored VM, from the allocators on a new one (whose
// command-line fragment it then records and returns).
func (vm *VM) placeVirtio(name string) (base uint64, irq uint32, fragment string, err error) {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	if vm.st != stateCreated {
		return 0, 0, "", fmt.Errorf("%w: adding virtio device %s to a %v VM", ErrState, name, vm.st)
	}
	if vm.fromSnapshot {
		data, ok := vm.restored[name]
		if !ok {
			return 0, 0, "", fmt.Errorf("%w: the snapshot has no device %q", ErrIncompatible, name)
		}
		st, err := decodeVirtioState(data)
		if err != nil {
			return 0, 0, "", fmt.Errorf("%w: device %s: %w", ErrIncompatible, name, err)
		}
		if st.Base < MMIOBase || st.Base%memory.PageSize != 0 || st.Base+mmio.Size > MMIOLimit ||
			st.IRQ < FirstDeviceIRQ || st.IRQ > LastDeviceIRQ {
			return 0, 0, "", fmt.Errorf("%w: device %s at %#x IRQ %d lies outside the device window or IRQ range",
				ErrIncompatible, name, st.Base, st.IRQ)
		}
		// Later allocations go past what the snapshot uses.
		vm.nextMMIO = max(vm.nextMMIO, st.Base+mmio.Size)
		vm.nextIRQ = max(vm.nextIRQ, st.IRQ+1)
		return st.Base, st.IRQ, "", nil
	}
	if vm.bootReady || vm.preparing {
		return 0, 0, "", fmt.Errorf("%w: virtio device %s added after LoadKernel; the kernel command line announces virtio devices, so add them first", ErrState, name)
	}
	if base, err = vm.allocateMMIOLocked(mmio.Size); err != nil {
		return 0, 0, "", err
	}
	if irq, err = vm.allocateIRQLocked(); err != nil {
		return 0, 0, "", err
	}
	fragment = mmio.Cmdline(base, irq)
	vm.cmdlineExtra = append(vm.cmdlineExtra, fragment)
	return base, irq, fragment, nil
}

func removeString(s []string, v string) []string {
	for i, x := range s {
		if x == v {
			return append(s[:i:i], s[i+1:]...)
		}
	}
	return s
}

// fullCmdline adds the virtio devices' fragments to cmdline's kernel
// parameters: at the end, or before a "--" word, since the kernel hands
// everything after "--" to init as its arguments (cubicle init's
// command line ends in "-- init").
func fullCmdline(cmdline string, extra []string) string {
	if len(extra) == 0 {
		return cmdline
	}
	words := strings.Fields(cmdline)
	for i, w := range words {
		if w == "--" {
			params := append(words[:i:i], extra...)
			return strings.Join(append(params, words[i:]...), " ")
		}
	}
	return strings.TrimSpace(cmdline + " " + strings.Join(extra, " "))
}

// VirtioDevices returns the VM's virtio devices in the order they were
// added.
func (vm *VM) VirtioDevices() []*VirtioDevice {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return append([]*VirtioDevice(nil), vm.virtio...)
}

// AddBlock adds a virtio-blk disk (see AddVirtio).
func (vm *VM) AddBlock(name string, cfg blk.Config) (*blk.Device, error) {
	cfg.Logger = cmp.Or(cfg.Logger, vm.log)
	d, err := blk.New(cfg)
	return addOwned(vm, name, d, err)
}

// AddRNG adds a virtio-rng entropy device (see AddVirtio).
func (vm *VM) AddRNG(name string, cfg rng.Config) (*rng.Device, error) {
	cfg.Logger = cmp.Or(cfg.Logger, vm.log)
	d := rng.New(cfg)
	if _, err := vm.AddVirtio(name, d); err != nil {
		return nil, err
	}
	return d, nil
}

// AddVsock adds a virtio-vsock device whose host side is the Unix socket
// cfg.UDSPath (see AddVirtio and package vsock). On a restored VM the
// guest is told, with a transport reset, that its connections are gone.
func (vm *VM) AddVsock(name string, cfg vsock.Config) (*vsock.Device, error) {
	cfg.Logger = cmp.Or(cfg.Logger, vm.log)
	d, err := vsock.New(cfg)
	return addOwned(vm, name, d, err)
}

// AddNet adds a virtio-net device on a tap (see AddVirtio and package
// net).
func (vm *VM) AddNet(name string, cfg net.Config) (*net.Device, error) {
	cfg.Logger = cmp.Or(cfg.Logger, vm.log)
	d, err := net.New(cfg)
	return addOwned(vm, name, d, err)
}

// addOwned adds d, which its package's New returned with err, to the VM (see
// AddVirtio). If either failed it returns the error and no device, closing d
// when the VM did not take it, so its file, socket or tap does not leak.
func addOwned[D interface {
	mmio.Device
	io.Closer
}](vm *VM, name string, d D, err error) (D, error) {
	if err == nil {
		if _, err = vm.AddVirtio(name, d); err != nil {
			d.Close()
		}
	}
	if err != nil {
		var none D
		return none, err
	}
	return d, nil
}
