package testguest

import (
	"debug/elf"
	"os"
	"path/filepath"
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

// TestPrebuilt: with $CUBICLE_TESTGUEST_DIR set, Build returns the images
// in that directory and compiles nothing; a directory without them is an
// error, not a silent build.
func TestPrebuilt(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"guest.elf", "guest.bzImage"} {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv(PrebuiltEnv, dir)
	imgs, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	if want := (Images{ELF: filepath.Join(dir, "guest.elf"), BzImage: filepath.Join(dir, "guest.bzImage")}); *imgs != want {
		t.Errorf("Build = %+v, want %+v", *imgs, want)
	}
	t.Setenv(PrebuiltEnv, t.TempDir())
	if imgs, err := Build(); err == nil {
		t.Errorf("Build with an empty %s = %+v, want an error", PrebuiltEnv, *imgs)
	}
}
