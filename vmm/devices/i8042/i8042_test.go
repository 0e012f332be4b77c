package i8042

import (
	"errors"
	"testing"

	"github.com/cubicle-dev/cubicle/vmm/devices"
)

func cmd(d *Device, c byte)   { d.Write(offCommand, []byte{c}) }
func data(d *Device, b byte)  { d.Write(offData, []byte{b}) }
func status(d *Device) byte   { b := []byte{0}; d.Read(offCommand, b); return b[0] }
func readData(d *Device) byte { b := []byte{0}; d.Read(offData, b); return b[0] }
func newDev(n *int) *Device   { return New(func() { *n++ }) }

func TestReset(t *testing.T) {
	var resets int
	d := newDev(&resets)
	cmd(d, CmdPulseReset)
	if resets != 1 {
		t.Fatalf("0xFE on port 0x64: %d resets", resets)
	}
	// Writing the output port with bit 0 clear also resets.
	cmd(d, CmdWriteOutPort)
	data(d, 0xfe)
	if resets != 2 {
		t.Fatalf("output port write: %d resets", resets)
	}
	cmd(d, CmdWriteOutPort)
	data(d, 0x01)
	data(d, 0xfe) // a keyboard byte, not a reset
	if resets != 2 {
		t.Fatalf("spurious reset: %d", resets)
	}
}

func TestProbeCommands(t *testing.T) {
	var resets int
	d := newDev(&resets)
	cmd(d, CmdSelfTest)
	if status(d)&statusOBF == 0 || readData(d) != replySelfTestOK {
		t.Error("self test")
	}
	if status(d)&statusOBF != 0 {
		t.Error("output buffer still full")
	}
	cmd(d, CmdWriteCTR)
	data(d, 0x65)
	cmd(d, CmdReadCTR)
	if readData(d) != 0x65 {
		t.Error("command byte not kept")
	}
	cmd(d, CmdTestKbd)
	if readData(d) != replyPortTestOK {
		t.Error("keyboard port test")
	}
	data(d, 0xff) // keyboard reset: acknowledged
	if readData(d) != replyAck {
		t.Error("keyboard byte not acknowledged")
	}
	for range 100 {
		cmd(d, CmdSelfTest) // replies queue up to a bound
	}
	st, err := d.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	c := newDev(&resets)
	if err := c.RestoreState(st); err != nil {
		t.Fatal(err)
	}
	if readData(c) != replySelfTestOK {
		t.Error("state did not carry over")
	}
	if err := c.RestoreState(st[:3]); !errors.Is(err, devices.ErrState) {
		t.Errorf("truncated state: %v", err)
	}
	if resets != 0 {
		t.Errorf("%d resets", resets)
	}
}
