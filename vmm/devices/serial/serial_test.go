package serial

import (
	"bytes"
	"errors"
	"testing"

	"github.com/cubicle-dev/cubicle/vmm/devices"
)

// levels records what the UART drives its interrupt line to.
type levels struct{ got []bool }

func (l *levels) SetLevel(a bool) error { l.got = append(l.got, a); return nil }
func (l *levels) Trigger() error        { return errors.New("serial must not pulse") }
func (l *levels) last() bool            { return len(l.got) > 0 && l.got[len(l.got)-1] }

func rd(s *Serial, off uint64) byte {
	b := []byte{0xee}
	s.Read(off, b)
	return b[0]
}

func wr(s *Serial, off uint64, v byte) { s.Write(off, []byte{v}) }

func TestOutputAndTHRInterrupt(t *testing.T) {
	var out bytes.Buffer
	irq := &levels{}
	s := New(&out, irq, nil)
	if rd(s, regLSR)&(lsrTHRE|lsrTEMT) != lsrTHRE|lsrTEMT {
		t.Fatal("transmitter not empty at reset")
	}
	for _, c := range []byte("hi\n") {
		wr(s, regData, c)
	}
	if out.String() != "hi\n" {
		t.Errorf("output %q", out.String())
	}
	if len(irq.got) != 0 {
		t.Errorf("interrupt without IER: %v", irq.got)
	}
	wr(s, regIER, ierTHRI) // enabling THRI with THR empty interrupts at once
	if !irq.last() || rd(s, regIIR)&0x0f != iirTHRI {
		t.Fatalf("no THRE interrupt: %v", irq.got)
	}
	if irq.last() || rd(s, regIIR)&0x0f != iirNoInt {
		t.Error("reading IIR did not clear the THRE interrupt")
	}
	wr(s, regData, 'x')
	if !irq.last() {
		t.Error("no THRE interrupt after a write")
	}
	wr(s, regIER, 0)
	if irq.last() {
		t.Error("line still up with IER 0")
	}
}

func TestInputInterruptAndFIFO(t *testing.T) {
	irq := &levels{}
	s := New(&bytes.Buffer{}, irq, nil)
	wr(s, regIIR, fcrEnable)
	wr(s, regIER, ierRDI)
	if n := s.Input([]byte("ab")); n != 2 {
		t.Fatalf("Input took %d", n)
	}
	if !irq.last() || rd(s, regIIR) != iirFIFO|iirRDI || rd(s, regLSR)&lsrDR == 0 {
		t.Fatalf("no receive interrupt: %v", irq.got)
	}
	if rd(s, regData) != 'a' || !irq.last() || rd(s, regData) != 'b' {
		t.Fatal("wrong bytes")
	}
	if irq.last() || rd(s, regLSR)&lsrDR != 0 || rd(s, regIIR) != iirFIFO|iirNoInt {
		t.Error("interrupt or DR still set after draining")
	}
	if n := s.Input(make([]byte, FIFOSize+10)); n != FIFOSize {
		t.Errorf("FIFO took %d of %d", n, FIFOSize+10)
	}
	wr(s, regIIR, fcrEnable|fcrClearRcvr)
	if rd(s, regLSR)&lsrDR != 0 {
		t.Error("FCR did not clear the receive FIFO")
	}
}

func TestDivisorLoopbackScratch(t *testing.T) {
	var out bytes.Buffer
	s := New(&out, &levels{}, nil)
	wr(s, regLCR, lcrDLAB|3)
	wr(s, regData, 0x01)
	wr(s, regIER, 0x02)
	if rd(s, regData) != 0x01 || rd(s, regIER) != 0x02 {
		t.Error("divisor latch not kept")
	}
	wr(s, regLCR, 3)
	if rd(s, regIER) != 0 {
		t.Error("IER changed by a DLM write")
	}
	wr(s, regSCR, 0x5a)
	if rd(s, regSCR) != 0x5a {
		t.Error("scratch register")
	}
	// Loopback (as Linux's 8250 probe does it): output comes back as
	// input, the modem outputs show up in MSR.
	wr(s, regMCR, mcrLoop|mcrOUT2|mcrRTS)
	if msr := rd(s, regMSR); msr&0xf0 != msrDCD|msrCTS {
		t.Errorf("loopback MSR %#x", msr)
	}
	wr(s, regData, 'L')
	if out.Len() != 0 || rd(s, regData) != 'L' {
		t.Error("loopback byte went out or did not come back")
	}
	if s.Input([]byte("x")) != 0 {
		t.Error("input accepted in loopback")
	}
	wr(s, regMCR, mcrOUT2)
	if rd(s, regMSR)&0xf0 != msrIdle {
		t.Error("MSR not idle after loopback")
	}
}

func TestState(t *testing.T) {
	irq := &levels{}
	s := New(&bytes.Buffer{}, irq, nil)
	wr(s, regIER, ierRDI)
	wr(s, regSCR, 9)
	s.Input([]byte("xyz"))
	st, err := s.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	irq2 := &levels{}
	c := New(&bytes.Buffer{}, irq2, nil)
	if err := c.RestoreState(st); err != nil {
		t.Fatal(err)
	}
	if len(irq2.got) != 0 {
		t.Error("RestoreState drove the line")
	}
	if rd(c, regSCR) != 9 || rd(c, regData) != 'x' || rd(c, regData) != 'y' {
		t.Error("state did not carry over")
	}
	for _, bad := range [][]byte{nil, {2}, st[:5], append(st[:12:12], 200), append(append([]byte{}, st...), 0)} {
		if err := New(nil, nil, nil).RestoreState(bad); !errors.Is(err, devices.ErrState) {
			t.Errorf("RestoreState(% x) = %v", bad, err)
		}
	}
}
