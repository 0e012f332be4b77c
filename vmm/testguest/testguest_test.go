package testguest

import (
	"debug/elf"
	"os"
	"testing"
)

func TestBuild(t *testing.T) {
	imgs, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open(imgs.ELF)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if f.Entry != loadAddr+0x200 {
		t.Errorf("entry %#x, want %#x", f.Entry, loadAddr+0x200)
	}
	notes := 0
	for _, p := range f.Progs {
		if p.Type == elf.PT_NOTE {
			notes++
		}
	}
	if notes != 1 {
		t.Errorf("%d PT_NOTE segments, want 1 (the PVH note)", notes)
	}
	b, err := os.ReadFile(imgs.BzImage)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 0x1000 || string(b[0x202:0x206]) != "HdrS" {
		t.Errorf("bzImage has no setup header")
	}
	// Build again: served from the cache.
	again, err := Build()
	if err != nil || *again != *imgs {
		t.Errorf("second Build = %+v, %v; want %+v", again, err, imgs)
	}
}
