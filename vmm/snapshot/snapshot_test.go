//go:build linux && amd64

package snapshot

import (
	"encoding/binary"
	"errors"
	"hash/crc64"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
)

// sampleState is a small but complete state: two vCPUs, two devices.
func sampleState() *State {
	s := &State{
		MemSize: 64 << 20,
		Regions: []Region{{GuestAddr: 0, Size: 64 << 20, Offset: 0}},
		Devices: []DeviceState{{Name: "serial0", Data: []byte{1, 2, 3}}, {Name: "i8042"}},
	}
	for i := range s.VM.IRQChips {
		s.VM.IRQChips[i].ChipID = uint32(i)
		s.VM.IRQChips[i].Chip[7] = byte(i + 1)
	}
	s.VM.PIT.Channels[0].Count = 0x10000
	s.VM.Clock.Clock = 123456789
	for i := range 2 {
		c := VCPUState{
			ID:     uint32(i),
			TSCKHz: 2600000,
			CPUID:  []kvm.CPUIDEntry{{Function: 1, EBX: uint32(i) << 24}, {Function: 0x40000000, EAX: 0x40000001}},
			XSave:  make([]byte, kvm.XSaveLegacySize),
			MSRs:   []kvm.MSREntry{{Index: kvm.MSRIA32TSC, Data: 1e9}, {Index: 0x4b564d01, Data: 0x5001}},
		}
		c.Regs.RIP = 0x100200 + uint64(i)
		c.Sregs.CR0 = 0x80000011
		c.FPU.FCW = 0x37f
		c.XSave[512] = 7
		c.XCRs.NrXCRs = 1
		c.LAPIC.Set32(kvm.LAPICRegID, uint32(i)<<24)
		c.Events.Flags = kvm.VCPUEventValidNMIPending
		c.MPState.State = kvm.MPStateRunnable
		c.DebugRegs.DR7 = 0x400
		s.VCPUs = append(s.VCPUs, c)
	}
	return s
}

// sampleDiff is sampleState as a diff snapshot.
func sampleDiff() *State {
	s := sampleState()
	s.Diff = &Diff{BaseID: 0x0123456789abcdef, Pages: 17}
	return s
}

func TestRoundTrip(t *testing.T) {
	full := sampleState()
	full.MemoryID = 0xfeedface
	for _, s := range []*State{sampleState(), full, sampleDiff()} {
		roundTrip(t, s)
	}
}

func roundTrip(t *testing.T, s *State) {
	t.Helper()
	b, err := Encode(s)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, s) {
		t.Fatal("round trip changed the state")
	}
	path := filepath.Join(t.TempDir(), "vm.state")
	if err := WriteFile(path, s); err != nil {
		t.Fatal(err)
	}
	if got, err := ReadFile(path); err != nil || !reflect.DeepEqual(got, s) {
		t.Fatalf("file round trip: %v", err)
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("WriteFile left %d files", len(entries))
	}
}

func TestRejects(t *testing.T) {
	good, err := Encode(sampleState())
	if err != nil {
		t.Fatal(err)
	}
	// Every truncation fails cleanly.
	for n := 0; n < len(good); n++ {
		if _, err := Decode(good[:n]); err == nil {
			t.Fatalf("truncated to %d bytes: decoded", n)
		}
	}
	// Every single-bit flip is caught (the CRC covers everything).
	for i := 0; i < len(good); i += 7 {
		b := append([]byte(nil), good...)
		b[i] ^= 1 << (i % 8)
		if _, err := Decode(b); err == nil {
			t.Fatalf("bit flip at %d: decoded", i)
		}
	}
	v2 := append([]byte(nil), good...)
	binary.LittleEndian.PutUint32(v2[len(Magic):], 2)
	if _, err := Decode(v2); !errors.Is(err, ErrVersion) {
		t.Errorf("version 2: %v", err)
	}
	flip := append([]byte(nil), good...)
	flip[headerSize+3] ^= 0xff
	if _, err := Decode(flip); !errors.Is(err, ErrChecksum) {
		t.Errorf("flipped body: %v", err)
	}
	if _, err := Decode([]byte("ELF")); !errors.Is(err, ErrNotSnapshot) {
		t.Errorf("not a snapshot: %v", err)
	}

	// States that encode but must not: each breaks one invariant.
	for name, mutate := range map[string]func(*State){
		"no vcpus":         func(s *State) { s.VCPUs = nil },
		"duplicate vcpu":   func(s *State) { s.VCPUs[1].ID = 0 },
		"odd memory":       func(s *State) { s.MemSize++ },
		"region past end":  func(s *State) { s.Regions[0].Size *= 2 },
		"region gap":       func(s *State) { s.MemSize *= 2 },
		"irqchip order":    func(s *State) { s.VM.IRQChips[0].ChipID = 2 },
		"short xsave":      func(s *State) { s.VCPUs[0].XSave = s.VCPUs[0].XSave[:100] },
		"duplicate device": func(s *State) { s.Devices[1].Name = "serial0" },
		"unnamed device":   func(s *State) { s.Devices[0].Name = "" },
		"diff too large":   func(s *State) { s.Diff = &Diff{BaseID: 1, Pages: s.MemSize/4096 + 1} },
		"diff with id":     func(s *State) { s.Diff, s.MemoryID = &Diff{BaseID: 1}, 2 },
	} {
		s := sampleState()
		mutate(s)
		if _, err := Encode(s); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: Encode = %v, want ErrCorrupt", name, err)
		}
	}

	// Bodies with valid framing but bad records.
	body := good[headerSize : len(good)-trailerSize]
	for name, b := range map[string][]byte{
		"unknown tag":   append([]byte{9, 0, 0, 0, 0, 0}, body...),
		"huge length":   append([]byte{1, 0, 0xff, 0xff, 0xff, 0x7f}, body...),
		"second vm rec": append(append([]byte(nil), body...), body[:6+int(binary.LittleEndian.Uint32(body[2:]))]...),
		"no records":    {},
		"memory id 0":   append(append([]byte(nil), body...), 5, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
		"short diff":    append(append([]byte(nil), body...), 6, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0),
		"second diff":   twice(t, sampleDiff(), 20),
		"second mem id": twice(t, func() *State { s := sampleState(); s.MemoryID = 3; return s }(), 14),
	} {
		if _, err := Decode(frame(b)); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// twice returns the body of s with its last record (of n bytes) repeated.
func twice(t *testing.T, s *State, n int) []byte {
	t.Helper()
	b, err := Encode(s)
	if err != nil {
		t.Fatal(err)
	}
	body := b[headerSize : len(b)-trailerSize]
	return append(append([]byte(nil), body...), body[len(body)-n:]...)
}

// frame wraps body in a valid header and checksum.
func frame(body []byte) []byte {
	out := append([]byte(Magic), 0, 0, 0, 0)
	binary.LittleEndian.PutUint32(out[len(Magic):], Version)
	out = binary.LittleEndian.AppendUint64(out, uint64(len(body)))
	out = append(out, body...)
	return binary.LittleEndian.AppendUint64(out, crc64.Checksum(out, crcTable()))
}

// checkDecoded is the fuzz oracle: whatever decodes must encode again and
// decode to the same state.
func checkDecoded(t *testing.T, s *State) {
	b, err := Encode(s)
	if err != nil {
		t.Fatalf("decoded state does not encode: %v", err)
	}
	s2, err := Decode(b)
	if err != nil {
		t.Fatalf("re-encoded state does not decode: %v", err)
	}
	if !reflect.DeepEqual(s, s2) {
		t.Fatal("decode(encode(s)) != s")
	}
}

// FuzzDecode feeds arbitrary files to the decoder.
func FuzzDecode(f *testing.F) {
	good, err := Encode(sampleState())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)/2])
	diff, err := Encode(sampleDiff())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(diff)
	f.Add([]byte(Magic))
	f.Fuzz(func(t *testing.T, b []byte) {
		if s, err := Decode(b); err == nil {
			checkDecoded(t, s)
		}
	})
}

// FuzzDecodeBody fuzzes the record parser behind a valid frame and
// checksum, which random files almost never get past.
func FuzzDecodeBody(f *testing.F) {
	good, err := Encode(sampleState())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good[headerSize : len(good)-trailerSize])
	f.Add([]byte{1, 0, 4, 0, 0, 0, 0, 0, 0, 4})
	diff, err := Encode(sampleDiff())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(diff[headerSize : len(diff)-trailerSize])
	f.Fuzz(func(t *testing.T, body []byte) {
		if s, err := Decode(frame(body)); err == nil {
			checkDecoded(t, s)
		}
	})
}
