package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/cubicle-dev/cubicle/vmm/memory"
)

// Intel MultiProcessor Specification 1.4, chapter 4: the floating pointer
// structure and the MP configuration table with its base entries.
const (
	mpfSize          = 16
	mpcHeaderSize    = 44
	mpProcessorSize  = 20
	mpEntrySize      = 8 // bus, I/O APIC, I/O and local interrupt entries
	mpSpecRev        = 4 // version 1.4
	mpEntryProcessor = 0
	mpEntryBus       = 1
	mpEntryIOAPIC    = 2
	mpEntryIOIntr    = 3
	mpEntryLocalIntr = 4
	mpCPUEnabled     = 0x01
	mpCPUBootstrap   = 0x02
	mpIntrINT        = 0 // vectored interrupt
	mpIntrNMI        = 1
	mpIntrExtINT     = 3
	mpAPICVersion    = 0x14 // integrated local APIC
	mpIOAPICVersion  = 0x11
	mpCPUSignature   = 0x600 // family 6
	mpCPUFeatures    = 0x201 // CPUID.1:EDX FPU | APIC
	ioapicPins       = 24    // KVM_IOAPIC_NUM_PINS
	mpTableLimit     = 0xA0000 - MPTableAddr
)

// WriteMPTable writes an MP floating pointer and configuration table for
// vcpus processors (APIC ids 0..vcpus-1, vCPU 0 the bootstrap processor),
// one ISA bus, the IOAPIC (id vcpus) with ISA IRQ n wired to pin n for all
// 24 pins, ExtINT on LINT0 and NMI on LINT1.
func WriteMPTable(mem *memory.Memory, vcpus int) error {
	if vcpus < 1 || vcpus > MaxVCPUs {
		return fmt.Errorf("%w: %d (1..%d)", ErrVCPUs, vcpus, MaxVCPUs)
	}
	le := binary.LittleEndian
	var t []byte
	// Processor entries.
	for i := range vcpus {
		e := make([]byte, mpProcessorSize)
		e[0] = mpEntryProcessor
		e[1] = byte(i)
		e[2] = mpAPICVersion
		e[3] = mpCPUEnabled
		if i == 0 {
			e[3] |= mpCPUBootstrap
		}
		le.PutUint32(e[4:], mpCPUSignature)
		le.PutUint32(e[8:], mpCPUFeatures)
		t = append(t, e...)
	}
	// The ISA bus.
	t = append(t, mpEntryBus, 0, 'I', 'S', 'A', ' ', ' ', ' ')
	// The IOAPIC.
	ioapicID := byte(vcpus)
	io := make([]byte, mpEntrySize)
	io[0], io[1], io[2], io[3] = mpEntryIOAPIC, ioapicID, mpIOAPICVersion, 1
	le.PutUint32(io[4:], IOAPICAddr)
	t = append(t, io...)
	// I/O interrupt assignments: ISA IRQ n → IOAPIC pin n, bus-default
	// polarity and trigger.
	for pin := range byte(ioapicPins) {
		t = append(t, mpEntryIOIntr, mpIntrINT, 0, 0, 0, pin, ioapicID, pin)
	}
	// Local interrupts: ExtINT to LINT0, NMI to LINT1 of every local APIC.
	t = append(t, mpEntryLocalIntr, mpIntrExtINT, 0, 0, 0, 0, 0xff, 0)
	t = append(t, mpEntryLocalIntr, mpIntrNMI, 0, 0, 0, 0, 0xff, 1)
	entries := vcpus + 1 + 1 + ioapicPins + 2

	hdr := make([]byte, mpcHeaderSize)
	copy(hdr[0:], "PCMP")
	le.PutUint16(hdr[4:], uint16(mpcHeaderSize+len(t)))
	hdr[6] = mpSpecRev
	copy(hdr[8:], "CUBICLE ")
	copy(hdr[16:], "MICROVM     ")
	le.PutUint16(hdr[34:], uint16(entries))
	le.PutUint32(hdr[36:], LAPICAddr)
	table := append(hdr, t...)
	table[7] = checksum(table)

	mpf := make([]byte, mpfSize)
	copy(mpf[0:], "_MP_")
	le.PutUint32(mpf[4:], MPTableAddr+mpfSize)
	mpf[8] = 1 // length in 16-byte units
	mpf[9] = mpSpecRev
	mpf[10] = checksum(mpf)

	all := append(mpf, table...)
	if len(all) > mpTableLimit {
		return fmt.Errorf("boot: MP table of %d bytes does not fit in the EBDA", len(all))
	}
	if _, err := mem.WriteAt(all, MPTableAddr); err != nil {
		return fmt.Errorf("boot: MP table: %w", err)
	}
	return nil
}

// checksum returns the byte that makes b sum to zero (b's checksum field
// must be zero when called).
func checksum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return -s
}
