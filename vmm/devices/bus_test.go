package devices

import (
	"errors"
	"testing"
)

// regDev records the accesses it gets.
type regDev struct {
	name string
	log  *[]string
}

func (d regDev) Read(off uint64, data []byte) {
	*d.log = append(*d.log, d.name+" r")
	for i := range data {
		data[i] = byte(off) + byte(i)
	}
}

func (d regDev) Write(off uint64, data []byte) {
	*d.log = append(*d.log, d.name+" w")
}

func TestBus(t *testing.T) {
	var log []string
	b := NewBus()
	if err := b.Insert("a", 0x100, 0x10, regDev{"a", &log}); err != nil {
		t.Fatal(err)
	}
	if err := b.Insert("c", 0x300, 0x10, regDev{"c", &log}); err != nil {
		t.Fatal(err)
	}
	if err := b.Insert("b", 0x200, 0x100, regDev{"b", &log}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct{ base, size uint64 }{{0x10f, 2}, {0x50, 0x200}, {0x2ff, 1}, {0x400, 0}, {^uint64(0), 2}} {
		if err := b.Insert("x", bad.base, bad.size, regDev{"x", &log}); !errors.Is(err, ErrOverlap) {
			t.Errorf("Insert(%#x, %#x) = %v, want ErrOverlap", bad.base, bad.size, err)
		}
	}
	data := make([]byte, 4)
	if !b.Read(0x204, data) || data[0] != 4 {
		t.Errorf("read at 0x204: %v %v", data, log)
	}
	if !b.Write(0x10c, data) || log[len(log)-1] != "a w" {
		t.Errorf("write at 0x10c: %v", log)
	}
	for _, addr := range []uint64{0, 0xff, 0x10d /* straddles the end of a */, 0x110, 0x2fe, 0x310, ^uint64(0)} {
		if b.Read(addr, data) {
			t.Errorf("read at %#x claimed", addr)
		}
	}
	if err := b.Remove(0x200); err != nil {
		t.Fatal(err)
	}
	if b.Read(0x204, data) {
		t.Error("removed device still answers")
	}
	if err := b.Remove(0x200); !errors.Is(err, ErrNotFound) {
		t.Errorf("second Remove = %v", err)
	}
	if e := b.Entries(); len(e) != 2 || e[0].Name != "a" || e[1].Name != "c" {
		t.Errorf("entries: %+v", e)
	}
}
