//go:build linux && amd64

package vmm

import (
	"encoding/binary"
	"fmt"
	"sync"

	"github.com/cubicle-dev/cubicle/vmm/devices"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"golang.org/x/sys/unix"
)

// irqLine is a devices.InterruptLine on the in-kernel irqchip. SetLevel
// uses KVM_IRQ_LINE; Trigger writes an eventfd registered with KVM_IRQFD
// (created on first use), which KVM turns into an edge without a VM ioctl.
// Both are safe from any goroutine.
type irqLine struct {
	vm  *kvm.VM
	gsi uint32

	once sync.Once
	efd  int // eventfd for Trigger; -1 if none
	err  error
}

var _ devices.InterruptLine = (*irqLine)(nil)

func (l *irqLine) SetLevel(asserted bool) error { return l.vm.IRQLine(l.gsi, asserted) }

func (l *irqLine) Trigger() error {
	l.once.Do(func() {
		l.efd = -1
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			l.err = fmt.Errorf("vmm: eventfd for GSI %d: %w", l.gsi, err)
			return
		}
		if err := l.vm.RegisterIRQFD(fd, l.gsi); err != nil {
			unix.Close(fd)
			l.err = err
			return
		}
		l.efd = fd
	})
	if l.err != nil {
		return l.err
	}
	var one [8]byte
	binary.LittleEndian.PutUint64(one[:], 1)
	if _, err := unix.Write(l.efd, one[:]); err != nil && err != unix.EAGAIN {
		// EAGAIN: the counter is saturated, an interrupt is pending anyway.
		return fmt.Errorf("vmm: irqfd write for GSI %d: %w", l.gsi, err)
	}
	return nil
}

// close releases the eventfd; KVM drops the irqfd when it is closed.
func (l *irqLine) close() error {
	var err error
	l.once.Do(func() { l.efd = -1 }) // never triggered: nothing to close
	if l.efd >= 0 {
		err = unix.Close(l.efd)
		l.efd = -1
	}
	return err
}
