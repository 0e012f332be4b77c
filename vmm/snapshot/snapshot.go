//go:build linux && amd64

// Package snapshot defines cubicle's VM state file: the versioned,
// checksummed binary encoding of everything a paused VM needs to continue
// elsewhere except its memory (which lives in a separate memory file, see
// package memory). It knows the layout of the file, not how to gather or
// apply the state; package vmm does that.
//
// # File format (version 1, all integers little-endian)
//
//	magic    [8]byte  "CUBSNAP\x00"
//	version  uint32   1
//	length   uint64   length of body
//	body     [length]byte
//	checksum uint64   CRC-64/ECMA-182 of magic, version, length and body
//
// The body is a sequence of records, each a uint16 tag, a uint32 payload
// length and the payload: exactly one memory record (guest RAM size and
// slot layout), exactly one VM record (three irqchips, PIT, kvmclock), one
// record per vCPU, and one per device; optionally one memory-ID record
// (the memory file's content identity, memory.ContentID) and one diff
// record (base content ID and page count of a diff snapshot, whose memory
// file holds only the pages changed since that base). KVM structures are stored as their
// exact uapi bytes, so their sizes are fixed and checked. Decoding checks
// every length and count against the data and against fixed limits: a
// malformed file yields an error wrapping ErrCorrupt, never a panic or an
// outsized allocation.
package snapshot

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc64"
	"io"
	"os"
	"path/filepath"
	"unsafe"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
)

// Format constants.
const (
	Magic   = "CUBSNAP\x00"
	Version = 1
	// MaxFileSize bounds a state file (64 MiB): far above any real one
	// (a few KiB per vCPU plus device state), low enough to read whole.
	MaxFileSize = 64 << 20
	// Limits on counts and sizes inside a state file.
	MaxVCPUs        = 256
	MaxRegions      = 8
	MaxCPUIDEntries = 256
	MaxMSRs         = 4096
	MaxXSaveSize    = 1 << 20
	MaxDevices      = 256
	MaxDeviceName   = 128
	MaxDeviceState  = 16 << 20

	headerSize  = len(Magic) + 4 + 8
	trailerSize = 8
)

// Record tags.
const (
	tagMemory uint16 = 1
	tagVM     uint16 = 2
	tagVCPU   uint16 = 3
	tagDevice uint16 = 4
	// tagMemoryID (optional) holds the ContentID of the memory file.
	tagMemoryID uint16 = 5
	// tagDiff (optional) marks a diff snapshot: base ContentID, pages.
	tagDiff uint16 = 6
)

var (
	// ErrNotSnapshot is returned when the data does not start with Magic.
	ErrNotSnapshot = errors.New("snapshot: not a cubicle state file")
	// ErrVersion is returned for a state file of another format version.
	ErrVersion = errors.New("snapshot: unsupported state file version")
	// ErrChecksum is returned when the CRC-64 does not match.
	ErrChecksum = errors.New("snapshot: state file checksum mismatch")
	// ErrCorrupt is returned for a state file whose body is malformed.
	ErrCorrupt = errors.New("snapshot: malformed state file")
	// ErrTooLarge is returned for a state file over MaxFileSize.
	ErrTooLarge = errors.New("snapshot: state file too large")
)

// crcTable returns the CRC-64/ECMA-182 table (hash/crc64 builds it once
// and caches it).
func crcTable() *crc64.Table { return crc64.MakeTable(crc64.ECMA) }

// State is everything about a paused VM except guest memory.
type State struct {
	// MemSize is the guest RAM size; the memory file must be exactly
	// this long.
	MemSize uint64
	// Regions is the guest-physical slot layout of RAM.
	Regions []Region
	VM      VMState
	VCPUs   []VCPUState
	Devices []DeviceState
	// MemoryID, when non-zero, is the memory file's content identity
	// (memory.ContentID). A diff snapshot has none.
	MemoryID uint64
	// Diff, when set, marks a diff snapshot: its memory file holds only
	// the pages that changed since the full memory file it is based on.
	Diff *Diff
}

// Diff is what a diff snapshot's state file says about its memory file.
type Diff struct {
	// BaseID is the content identity (memory.ContentID) of the base
	// memory file the diff applies to.
	BaseID uint64
	// Pages is the number of pages the diff memory file holds.
	Pages uint64
}

// Region is one KVM memory slot: guest-physical range and its offset in
// the memory file.
type Region struct {
	GuestAddr, Size, Offset uint64
}

// VMState is the VM-wide KVM state.
type VMState struct {
	// IRQChips holds PIC master, PIC slave and IOAPIC, in ChipID order.
	IRQChips [kvm.NumIRQChips]kvm.IRQChip
	PIT      kvm.PITState2
	Clock    kvm.ClockData
}

// VCPUState is one vCPU's KVM state.
type VCPUState struct {
	ID        uint32
	TSCKHz    uint32
	CPUID     []kvm.CPUIDEntry
	Regs      kvm.Regs
	Sregs     kvm.Sregs
	FPU       kvm.FPU
	XSave     []byte
	XCRs      kvm.XCRs
	LAPIC     kvm.LAPICState
	MSRs      []kvm.MSREntry
	Events    kvm.VCPUEvents
	MPState   kvm.MPState
	DebugRegs kvm.DebugRegs
}

// DeviceState is one device's opaque state, keyed by the device's name on
// the VM.
type DeviceState struct {
	Name string
	Data []byte
}

// raw views a plain-data KVM struct as its bytes (x86-64 little-endian,
// which is the uapi layout).
func raw[T any](p *T) []byte {
	return unsafe.Slice((*byte)(unsafe.Pointer(p)), unsafe.Sizeof(*p))
}

// rawSlice views a slice of plain-data structs as bytes.
func rawSlice[T any](s []T) []byte {
	if len(s) == 0 {
		return nil
	}
	var z T
	return unsafe.Slice((*byte)(unsafe.Pointer(&s[0])), len(s)*int(unsafe.Sizeof(z)))
}

// Encode serialises s. It validates s first, so that whatever Encode
// produces, Decode accepts.
func Encode(s *State) ([]byte, error) {
	if err := s.validate(); err != nil {
		return nil, err
	}
	var body []byte
	rec := func(tag uint16, payload []byte) {
		body = binary.LittleEndian.AppendUint16(body, tag)
		body = binary.LittleEndian.AppendUint32(body, uint32(len(payload)))
		body = append(body, payload...)
	}
	var w writer
	w.u64(s.MemSize)
	w.u32(uint32(len(s.Regions)))
	for _, r := range s.Regions {
		w.u64(r.GuestAddr)
		w.u64(r.Size)
		w.u64(r.Offset)
	}
	rec(tagMemory, w.b)

	w = writer{}
	for i := range s.VM.IRQChips {
		w.bytes(raw(&s.VM.IRQChips[i]))
	}
	w.bytes(raw(&s.VM.PIT))
	w.bytes(raw(&s.VM.Clock))
	rec(tagVM, w.b)

	for i := range s.VCPUs {
		c := &s.VCPUs[i]
		w = writer{}
		w.u32(c.ID)
		w.u32(c.TSCKHz)
		w.u32(uint32(len(c.CPUID)))
		w.bytes(rawSlice(c.CPUID))
		w.bytes(raw(&c.Regs))
		w.bytes(raw(&c.Sregs))
		w.bytes(raw(&c.FPU))
		w.u32(uint32(len(c.XSave)))
		w.bytes(c.XSave)
		w.bytes(raw(&c.XCRs))
		w.bytes(raw(&c.LAPIC))
		w.u32(uint32(len(c.MSRs)))
		w.bytes(rawSlice(c.MSRs))
		w.bytes(raw(&c.Events))
		w.bytes(raw(&c.MPState))
		w.bytes(raw(&c.DebugRegs))
		rec(tagVCPU, w.b)
	}
	for _, d := range s.Devices {
		w = writer{}
		w.u16(uint16(len(d.Name)))
		w.bytes([]byte(d.Name))
		w.u32(uint32(len(d.Data)))
		w.bytes(d.Data)
		rec(tagDevice, w.b)
	}

	if s.MemoryID != 0 {
		w = writer{}
		w.u64(s.MemoryID)
		rec(tagMemoryID, w.b)
	}
	if s.Diff != nil {
		w = writer{}
		w.u64(s.Diff.BaseID)
		w.u64(s.Diff.Pages)
		rec(tagDiff, w.b)
	}

	out := make([]byte, 0, headerSize+len(body)+trailerSize)
	out = append(out, Magic...)
	out = binary.LittleEndian.AppendUint32(out, Version)
	out = binary.LittleEndian.AppendUint64(out, uint64(len(body)))
	out = append(out, body...)
	out = binary.LittleEndian.AppendUint64(out, crc64.Checksum(out, crcTable()))
	if len(out) > MaxFileSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrTooLarge, len(out))
	}
	return out, nil
}

// Decode parses a state file.
func Decode(b []byte) (*State, error) {
	if len(b) > MaxFileSize {
		return nil, fmt.Errorf("%w: %d bytes", ErrTooLarge, len(b))
	}
	if len(b) < len(Magic) || string(b[:len(Magic)]) != Magic {
		return nil, ErrNotSnapshot
	}
	if len(b) < headerSize+trailerSize {
		return nil, fmt.Errorf("%w: %d bytes is shorter than header and checksum", ErrCorrupt, len(b))
	}
	if v := binary.LittleEndian.Uint32(b[len(Magic):]); v != Version {
		return nil, fmt.Errorf("%w: %d (this build reads %d)", ErrVersion, v, Version)
	}
	n := binary.LittleEndian.Uint64(b[len(Magic)+4:])
	if n != uint64(len(b)-headerSize-trailerSize) {
		return nil, fmt.Errorf("%w: body length %d, file has %d", ErrCorrupt, n, len(b)-headerSize-trailerSize)
	}
	end := len(b) - trailerSize
	if want, got := binary.LittleEndian.Uint64(b[end:]), crc64.Checksum(b[:end], crcTable()); want != got {
		return nil, fmt.Errorf("%w: stored %#016x, computed %#016x", ErrChecksum, want, got)
	}
	return decodeBody(b[headerSize:end])
}

func decodeBody(body []byte) (*State, error) {
	s := &State{}
	var sawMem, sawVM bool
	r := reader{b: body}
	for r.len() > 0 {
		tag := r.u16()
		n := r.u32()
		payload := r.take(int(n))
		if r.err != nil {
			return nil, r.err
		}
		p := reader{b: payload}
		switch tag {
		case tagMemory:
			if sawMem {
				return nil, corrupt("second memory record")
			}
			sawMem = true
			s.MemSize = p.u64()
			nr := p.count(MaxRegions, 24)
			for range nr {
				s.Regions = append(s.Regions, Region{GuestAddr: p.u64(), Size: p.u64(), Offset: p.u64()})
			}
		case tagVM:
			if sawVM {
				return nil, corrupt("second VM record")
			}
			sawVM = true
			for i := range s.VM.IRQChips {
				p.into(raw(&s.VM.IRQChips[i]))
			}
			p.into(raw(&s.VM.PIT))
			p.into(raw(&s.VM.Clock))
		case tagVCPU:
			if len(s.VCPUs) == MaxVCPUs {
				return nil, corrupt("more than %d vCPUs", MaxVCPUs)
			}
			var c VCPUState
			c.ID = p.u32()
			c.TSCKHz = p.u32()
			c.CPUID = make([]kvm.CPUIDEntry, p.count(MaxCPUIDEntries, int(unsafe.Sizeof(kvm.CPUIDEntry{}))))
			p.into(rawSlice(c.CPUID))
			p.into(raw(&c.Regs))
			p.into(raw(&c.Sregs))
			p.into(raw(&c.FPU))
			c.XSave = make([]byte, p.count(MaxXSaveSize, 1))
			p.into(c.XSave)
			p.into(raw(&c.XCRs))
			p.into(raw(&c.LAPIC))
			c.MSRs = make([]kvm.MSREntry, p.count(MaxMSRs, int(unsafe.Sizeof(kvm.MSREntry{}))))
			p.into(rawSlice(c.MSRs))
			p.into(raw(&c.Events))
			p.into(raw(&c.MPState))
			p.into(raw(&c.DebugRegs))
			s.VCPUs = append(s.VCPUs, c)
		case tagDevice:
			if len(s.Devices) == MaxDevices {
				return nil, corrupt("more than %d devices", MaxDevices)
			}
			name := p.take(int(p.u16()))
			data := p.take(p.count(MaxDeviceState, 1))
			s.Devices = append(s.Devices, DeviceState{Name: string(name), Data: append([]byte(nil), data...)})
		case tagMemoryID:
			if s.MemoryID != 0 {
				return nil, corrupt("second memory ID record")
			}
			if s.MemoryID = p.u64(); s.MemoryID == 0 && p.err == nil {
				return nil, corrupt("memory ID 0")
			}
		case tagDiff:
			if s.Diff != nil {
				return nil, corrupt("second diff record")
			}
			s.Diff = &Diff{BaseID: p.u64(), Pages: p.u64()}
		default:
			return nil, corrupt("unknown record tag %d", tag)
		}
		if p.err != nil {
			return nil, fmt.Errorf("record %d: %w", tag, p.err)
		}
		if p.len() != 0 {
			return nil, corrupt("record %d has %d trailing bytes", tag, p.len())
		}
	}
	if !sawMem || !sawVM {
		return nil, corrupt("memory or VM record missing")
	}
	if err := s.validate(); err != nil {
		return nil, err
	}
	return s, nil
}

// validate checks the invariants Encode relies on and Restore needs.
func (s *State) validate() error {
	if s.MemSize == 0 || s.MemSize%4096 != 0 {
		return corrupt("guest memory size %d", s.MemSize)
	}
	if len(s.Regions) == 0 || len(s.Regions) > MaxRegions {
		return corrupt("%d memory regions", len(s.Regions))
	}
	var total uint64
	for _, r := range s.Regions {
		if r.Size == 0 || r.Offset > s.MemSize || r.Size > s.MemSize-r.Offset || r.GuestAddr+r.Size < r.GuestAddr {
			return corrupt("memory region %+v outside %d bytes", r, s.MemSize)
		}
		total += r.Size
	}
	if total != s.MemSize {
		return corrupt("memory regions cover %d of %d bytes", total, s.MemSize)
	}
	for i, c := range s.VM.IRQChips {
		if c.ChipID != uint32(i) {
			return corrupt("irqchip %d has id %d", i, c.ChipID)
		}
	}
	if len(s.VCPUs) == 0 || len(s.VCPUs) > MaxVCPUs {
		return corrupt("%d vCPUs", len(s.VCPUs))
	}
	ids := map[uint32]bool{}
	for _, c := range s.VCPUs {
		if ids[c.ID] {
			return corrupt("vCPU %d twice", c.ID)
		}
		ids[c.ID] = true
		if len(c.CPUID) > MaxCPUIDEntries || len(c.MSRs) > MaxMSRs {
			return corrupt("vCPU %d: %d CPUID entries, %d MSRs", c.ID, len(c.CPUID), len(c.MSRs))
		}
		if len(c.XSave) < kvm.XSaveLegacySize || len(c.XSave) > MaxXSaveSize {
			return corrupt("vCPU %d: XSAVE area of %d bytes", c.ID, len(c.XSave))
		}
	}
	if d := s.Diff; d != nil {
		if d.Pages > s.MemSize/4096 {
			return corrupt("diff of %d pages in %d bytes of memory", d.Pages, s.MemSize)
		}
		if s.MemoryID != 0 {
			return corrupt("diff snapshot with a memory ID")
		}
	}
	names := map[string]bool{}
	for _, d := range s.Devices {
		if d.Name == "" || len(d.Name) > MaxDeviceName || names[d.Name] {
			return corrupt("device name %q empty, too long or repeated", d.Name)
		}
		names[d.Name] = true
		if len(d.Data) > MaxDeviceState {
			return corrupt("device %q: %d bytes of state", d.Name, len(d.Data))
		}
	}
	return nil
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
}

// WriteFile encodes s and writes it to path atomically (a temporary file
// in the same directory, synced and renamed into place).
func WriteFile(path string, s *State) error {
	b, err := Encode(s)
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("snapshot: %w", err)
	}
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return fmt.Errorf("snapshot: writing %s: %w", path, err)
	}
	return nil
}

// ReadFile reads and decodes the state file at path.
func ReadFile(path string) (*State, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("snapshot: reading %s: %w", path, err)
	}
	s, err := Decode(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return s, nil
}
