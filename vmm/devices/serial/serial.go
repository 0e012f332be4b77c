// Package serial emulates a 16550A UART (the PC's 8250-compatible serial
// port) as COM1: port 0x3f8, IRQ 4. Guest output goes to an io.Writer;
// host input is queued in a 64-byte receive FIFO and raises the receive
// interrupt. It models THR/RBR, IER, IIR/FCR, LCR with the divisor latch
// (DLAB), MCR with loopback, LSR, MSR and SCR — enough for Linux's 8250
// driver and for the polling and interrupt-driven test guests.
//
// Transmission is instantaneous: THR is always empty again right after a
// write, so LSR always reports THRE|TEMT.
//
// # Concurrency
//
// Register accesses come from vCPU threads and Input from host goroutines;
// mu guards all state. The interrupt line is driven while mu is held so
// that level changes reach KVM in the order they happen; the output writer
// is also called under mu, so a slow writer stalls the guest (backpressure),
// never reorders output.
package serial

import (
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/cubicle-dev/cubicle/vmm/devices"
)

// COM1 location (IBM PC/AT convention).
const (
	COM1Base = 0x3f8
	COM1IRQ  = 4
	// Size is the number of ports a UART occupies.
	Size = 8
	// FIFOSize is the depth of the receive FIFO. A 16550A has 16 bytes;
	// 64 (as on a 16750) lets the host push a short line at once.
	FIFOSize = 64
)

// Register offsets (include/uapi/linux/serial_reg.h).
const (
	regData = 0 // RBR (read) / THR (write); DLL with DLAB
	regIER  = 1 // DLM with DLAB
	regIIR  = 2 // IIR (read) / FCR (write)
	regLCR  = 3
	regMCR  = 4
	regLSR  = 5
	regMSR  = 6
	regSCR  = 7
)

// Register bits (include/uapi/linux/serial_reg.h).
const (
	ierRDI  = 0x01 // received data available
	ierTHRI = 0x02 // transmitter holding register empty
	ierRLSI = 0x04 // receiver line status
	ierMSI  = 0x08 // modem status
	ierMask = 0x0f

	iirNoInt = 0x01
	iirMSI   = 0x00
	iirTHRI  = 0x02
	iirRDI   = 0x04
	iirRLSI  = 0x06
	iirFIFO  = 0xc0 // both FIFO-enabled bits of a 16550A

	fcrEnable    = 0x01
	fcrClearRcvr = 0x02

	lcrDLAB = 0x80

	mcrDTR  = 0x01
	mcrRTS  = 0x02
	mcrOUT1 = 0x04
	mcrOUT2 = 0x08
	mcrLoop = 0x10
	mcrMask = 0x1f

	lsrDR   = 0x01
	lsrOE   = 0x02
	lsrTHRE = 0x20
	lsrTEMT = 0x40

	msrDelta = 0x0f
	msrCTS   = 0x10
	msrDSR   = 0x20
	msrRI    = 0x40
	msrDCD   = 0x80
	// msrIdle is what the modem lines read outside loopback: carrier,
	// data set ready and clear to send all asserted, like a null modem.
	msrIdle = msrDCD | msrDSR | msrCTS
)

// stateVersion is the first byte of SaveState's encoding.
const stateVersion = 1

// Serial is one UART.
type Serial struct {
	out io.Writer
	irq devices.InterruptLine
	log *slog.Logger

	mu          sync.Mutex
	ier         byte
	lcr         byte
	mcr         byte
	msr         byte
	scr         byte
	dll, dlm    byte
	fifo        bool // FCR enable bit
	thrIPending bool // THR-empty interrupt pending
	overrun     bool // LSR.OE
	rx          []byte
	level       bool // current level of the interrupt output
}

// New returns a UART that writes guest output to out and drives irq. A
// nil logger discards the (rare) interrupt-line errors.
func New(out io.Writer, irq devices.InterruptLine, log *slog.Logger) *Serial {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Serial{
		out: out, irq: irq, log: log,
		mcr: mcrOUT2, msr: msrIdle,
		dll: 0x0c, // 9600 baud, what firmware leaves behind
		rx:  make([]byte, 0, FIFOSize),
	}
}

// Read handles a guest IN from port base+offset.
func (s *Serial) Read(offset uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	clear(data)
	s.mu.Lock()
	defer s.mu.Unlock()
	data[0] = s.readReg(offset)
	s.updateIRQ()
}

// Write handles a guest OUT to port base+offset; only the low byte of a
// wider access reaches the register.
func (s *Serial) Write(offset uint64, data []byte) {
	if len(data) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writeReg(offset, data[0])
	s.updateIRQ()
}

func (s *Serial) readReg(offset uint64) byte {
	dlab := s.lcr&lcrDLAB != 0
	switch offset {
	case regData:
		if dlab {
			return s.dll
		}
		if len(s.rx) == 0 {
			return 0
		}
		b := s.rx[0]
		s.rx = append(s.rx[:0], s.rx[1:]...)
		return b
	case regIER:
		if dlab {
			return s.dlm
		}
		return s.ier
	case regIIR:
		iir := s.iir()
		if iir&^iirFIFO == iirTHRI {
			s.thrIPending = false // reading IIR clears a THRE interrupt
		}
		return iir
	case regLCR:
		return s.lcr
	case regMCR:
		return s.mcr
	case regLSR:
		lsr := byte(lsrTHRE | lsrTEMT)
		if len(s.rx) > 0 {
			lsr |= lsrDR
		}
		if s.overrun {
			lsr |= lsrOE
			s.overrun = false
		}
		return lsr
	case regMSR:
		m := s.msr
		s.msr &^= msrDelta
		return m
	case regSCR:
		return s.scr
	}
	return 0xff
}

func (s *Serial) writeReg(offset uint64, v byte) {
	dlab := s.lcr&lcrDLAB != 0
	switch offset {
	case regData:
		if dlab {
			s.dll = v
			return
		}
		if s.mcr&mcrLoop != 0 {
			s.push(v)
		} else if _, err := s.out.Write([]byte{v}); err != nil {
			s.log.Debug("serial: output", "err", err)
		}
		s.thrIPending = true // THR is empty again at once
	case regIER:
		if dlab {
			s.dlm = v
			return
		}
		if v&ierTHRI != 0 && s.ier&ierTHRI == 0 {
			s.thrIPending = true // enabling THRI with THR empty interrupts
		}
		s.ier = v & ierMask
	case regIIR: // FCR
		s.fifo = v&fcrEnable != 0
		if v&fcrClearRcvr != 0 {
			s.rx = s.rx[:0]
		}
	case regLCR:
		s.lcr = v
	case regMCR:
		s.mcr = v & mcrMask
		s.updateModemStatus()
	case regSCR:
		s.scr = v
	}
}

// updateModemStatus recomputes MSR from MCR: in loopback the modem outputs
// feed the inputs (RTS→CTS, DTR→DSR, OUT1→RI, OUT2→DCD); otherwise the
// inputs read as an idle null modem. Changes set the delta bits.
func (s *Serial) updateModemStatus() {
	var in byte = msrIdle
	if s.mcr&mcrLoop != 0 {
		in = 0
		if s.mcr&mcrRTS != 0 {
			in |= msrCTS
		}
		if s.mcr&mcrDTR != 0 {
			in |= msrDSR
		}
		if s.mcr&mcrOUT1 != 0 {
			in |= msrRI
		}
		if s.mcr&mcrOUT2 != 0 {
			in |= msrDCD
		}
	}
	changed := (s.msr ^ in) & 0xf0
	delta := s.msr & msrDelta
	if changed&msrCTS != 0 {
		delta |= 0x01
	}
	if changed&msrDSR != 0 {
		delta |= 0x02
	}
	if s.msr&msrRI != 0 && in&msrRI == 0 {
		delta |= 0x04 // trailing edge of RI
	}
	if changed&msrDCD != 0 {
		delta |= 0x08
	}
	s.msr = in | delta
}

func (s *Serial) push(b byte) bool {
	if len(s.rx) >= FIFOSize {
		s.overrun = true
		return false
	}
	s.rx = append(s.rx, b)
	return true
}

// iir returns the interrupt identification, highest priority first.
func (s *Serial) iir() byte {
	id := byte(iirNoInt)
	switch {
	case s.ier&ierRLSI != 0 && s.overrun:
		id = iirRLSI
	case s.ier&ierRDI != 0 && len(s.rx) > 0:
		id = iirRDI
	case s.ier&ierTHRI != 0 && s.thrIPending:
		id = iirTHRI
	case s.ier&ierMSI != 0 && s.msr&msrDelta != 0:
		id = iirMSI
	}
	if s.fifo {
		id |= iirFIFO
	}
	return id
}

// updateIRQ drives the interrupt line to the UART's INTR output.
func (s *Serial) updateIRQ() {
	level := s.iir()&iirNoInt == 0
	if level == s.level {
		return
	}
	s.level = level
	if s.irq == nil {
		return
	}
	if err := s.irq.SetLevel(level); err != nil {
		s.log.Warn("serial: interrupt line", "err", err)
	}
}

// Input queues bytes from the host for the guest to read and raises the
// receive interrupt if the guest enabled it. It returns how many bytes fit
// in the FIFO; in loopback mode the port is disconnected and nothing is
// accepted.
func (s *Serial) Input(p []byte) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mcr&mcrLoop != 0 {
		return 0
	}
	n := min(len(p), FIFOSize-len(s.rx))
	s.rx = append(s.rx, p[:n]...)
	s.updateIRQ()
	return n
}

// SaveState encodes the registers, the receive FIFO and the interrupt
// output level.
func (s *Serial) SaveState() ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := []byte{stateVersion, s.ier, s.lcr, s.mcr, s.msr, s.scr, s.dll, s.dlm,
		boolByte(s.fifo), boolByte(s.thrIPending), boolByte(s.overrun), boolByte(s.level),
		byte(len(s.rx))}
	return append(b, s.rx...), nil
}

// RestoreState loads state from SaveState into a UART that has not run.
// It does not touch the interrupt line: the level the line had is part of
// the restored interrupt-controller state.
func (s *Serial) RestoreState(data []byte) error {
	const hdr = 13
	if len(data) < hdr || data[0] != stateVersion {
		return fmt.Errorf("%w: serial: %d bytes, version %v", devices.ErrState, len(data), firstByte(data))
	}
	n := int(data[12])
	if n > FIFOSize || len(data) != hdr+n {
		return fmt.Errorf("%w: serial: fifo of %d bytes in %d", devices.ErrState, n, len(data))
	}
	for _, f := range data[8:12] {
		if f > 1 {
			return fmt.Errorf("%w: serial: flag byte %d", devices.ErrState, f)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ier, s.lcr, s.mcr, s.msr, s.scr, s.dll, s.dlm = data[1]&ierMask, data[2], data[3]&mcrMask, data[4], data[5], data[6], data[7]
	s.fifo, s.thrIPending, s.overrun, s.level = data[8] == 1, data[9] == 1, data[10] == 1, data[11] == 1
	s.rx = append(s.rx[:0], data[hdr:]...)
	return nil
}

func boolByte(b bool) byte {
	if b {
		return 1
	}
	return 0
}

func firstByte(b []byte) any {
	if len(b) == 0 {
		return "none"
	}
	return b[0]
}

var (
	_ devices.PIODevice = (*Serial)(nil)
	_ devices.Stateful  = (*Serial)(nil)
)
