// Package i8042 emulates the PC keyboard controller just far enough for a
// guest to reset the machine: the controller command 0xFE ("pulse output
// line 0", wired to the CPU reset line on every PC) written to port 0x64
// calls the VMM's reset callback, which ends the VM cleanly. Linux reboots
// this way with reboot=k. The controller also answers the probe commands
// Linux's i8042 driver sends (self test, command byte, port tests), has no
// keyboard or mouse attached, and raises no interrupts.
//
// # Concurrency
//
// mu guards the controller state. The reset callback is called without mu
// held, on the vCPU thread that wrote the command.
package i8042

import (
	"fmt"
	"sync"

	"github.com/cubicle-dev/cubicle/vmm/devices"
)

// Ports (IBM PC/AT): the device occupies 0x60..0x64; 0x61 (port B) is
// answered by KVM's in-kernel PIT and never reaches this device.
const (
	Base        = 0x60
	Size        = 5
	offData     = 0 // port 0x60: data
	offCommand  = 4 // port 0x64: status (read) / command (write)
	maxOutQueue = 16
)

// Controller commands (port 0x64) and replies, per the IBM PC/AT technical
// reference and Linux's drivers/input/serio/i8042.h.
const (
	CmdReadCTR       = 0x20
	CmdWriteCTR      = 0x60
	CmdDisableAux    = 0xA7
	CmdEnableAux     = 0xA8
	CmdTestAux       = 0xA9
	CmdSelfTest      = 0xAA
	CmdTestKbd       = 0xAB
	CmdDisableKbd    = 0xAD
	CmdEnableKbd     = 0xAE
	CmdWriteOutPort  = 0xD1
	CmdWriteAux      = 0xD4
	CmdPulseReset    = 0xFE // pulse output line 0: CPU reset
	replySelfTestOK  = 0x55
	replyPortTestOK  = 0x00
	replyAck         = 0xFA
	replyResend      = 0xFE
	statusOBF        = 0x01 // output buffer full
	statusSystemFlag = 0x04 // set after a successful self test
	statusCommand    = 0x08 // last write went to the command port
	ctrKbdDisabled   = 0x10
	ctrAuxDisabled   = 0x20
	outPortResetLow  = 0x01 // output port bit 0: 0 asserts CPU reset
	stateVersion     = 1
)

// Device is the controller.
type Device struct {
	onReset func()

	mu      sync.Mutex
	status  byte
	ctr     byte   // controller configuration ("command") byte
	pending byte   // command waiting for its data byte on port 0x60, or 0
	out     []byte // replies waiting to be read from port 0x60
}

// New returns a controller that calls onReset when the guest asks for a
// CPU reset.
func New(onReset func()) *Device {
	return &Device{onReset: onReset, status: statusSystemFlag, ctr: 0x47}
}

// Read handles a guest IN from 0x60 (next reply) or 0x64 (status).
func (d *Device) Read(offset uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	clear(data)
	d.mu.Lock()
	defer d.mu.Unlock()
	switch offset {
	case offData:
		if len(d.out) > 0 {
			data[0] = d.out[0]
			d.out = d.out[1:]
		}
	case offCommand:
		data[0] = d.status
		if len(d.out) > 0 {
			data[0] |= statusOBF
		}
	default:
		data[0] = 0xff
	}
}

// Write handles a guest OUT to 0x60 (data) or 0x64 (command).
func (d *Device) Write(offset uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	reset := false
	d.mu.Lock()
	switch offset {
	case offData:
		d.status &^= statusCommand
		reset = d.writeData(data[0])
	case offCommand:
		d.status |= statusCommand
		reset = d.command(data[0])
	}
	d.mu.Unlock()
	if reset && d.onReset != nil {
		d.onReset()
	}
}

func (d *Device) reply(b ...byte) {
	if len(d.out)+len(b) <= maxOutQueue {
		d.out = append(d.out, b...)
	}
}

// command executes a controller command; it reports whether the guest
// asked for a reset.
func (d *Device) command(c byte) bool {
	d.pending = 0
	switch c {
	case CmdReadCTR:
		d.reply(d.ctr)
	case CmdWriteCTR, CmdWriteOutPort, CmdWriteAux:
		d.pending = c
	case CmdDisableAux:
		d.ctr |= ctrAuxDisabled
	case CmdEnableAux:
		d.ctr &^= ctrAuxDisabled
	case CmdTestAux, CmdTestKbd:
		d.reply(replyPortTestOK)
	case CmdSelfTest:
		d.status |= statusSystemFlag
		d.reply(replySelfTestOK)
	case CmdDisableKbd:
		d.ctr |= ctrKbdDisabled
	case CmdEnableKbd:
		d.ctr &^= ctrKbdDisabled
	case CmdPulseReset:
		return true
	}
	return false
}

// writeData takes a byte written to port 0x60: the argument of a pending
// controller command, or a byte for the (absent) keyboard.
func (d *Device) writeData(b byte) bool {
	switch c := d.pending; c {
	case CmdWriteCTR:
		d.ctr = b
	case CmdWriteOutPort:
		d.pending = 0
		return b&outPortResetLow == 0
	case CmdWriteAux:
		d.reply(replyResend) // no mouse
	default:
		d.reply(replyAck) // keyboard bytes are acknowledged and ignored
	}
	d.pending = 0
	return false
}

// SaveState encodes the controller state.
func (d *Device) SaveState() ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := []byte{stateVersion, d.status, d.ctr, d.pending, byte(len(d.out))}
	return append(b, d.out...), nil
}

// RestoreState loads state saved by SaveState.
func (d *Device) RestoreState(data []byte) error {
	if len(data) < 5 || data[0] != stateVersion || int(data[4]) > maxOutQueue || len(data) != 5+int(data[4]) {
		return fmt.Errorf("%w: i8042: %d bytes", devices.ErrState, len(data))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.status, d.ctr, d.pending = data[1], data[2], data[3]
	d.out = append([]byte(nil), data[5:]...)
	return nil
}

var (
	_ devices.PIODevice = (*Device)(nil)
	_ devices.Stateful  = (*Device)(nil)
)
