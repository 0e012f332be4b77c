//go:build linux

package memory

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestLayout(t *testing.T) {
	if l := Layout(64 << 20); len(l) != 1 || l[0] != (Region{0, 64 << 20, 0}) {
		t.Errorf("64 MiB: %+v", l)
	}
	if l := Layout(MMIOHoleStart); len(l) != 1 {
		t.Errorf("exactly 3 GiB: %+v", l)
	}
	l := Layout(5 << 30)
	want := []Region{{0, MMIOHoleStart, 0}, {MMIOHoleEnd, 2 << 30, MMIOHoleStart}}
	if len(l) != 2 || l[0] != want[0] || l[1] != want[1] {
		t.Errorf("5 GiB: %+v, want %+v", l, want)
	}
	for _, bad := range []uint64{0, 4096, MinSize + 1, MaxSize + PageSize} {
		if err := CheckSize(bad); !errors.Is(err, ErrSize) {
			t.Errorf("CheckSize(%d) = %v", bad, err)
		}
	}
}

func TestAccess(t *testing.T) {
	m, err := New(5 << 30)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if _, err := m.WriteAt([]byte("low"), 0x1000); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteAt([]byte("high"), 1<<32); err != nil {
		t.Fatal(err)
	}
	// The byte at 4 GiB lives at offset 3 GiB of the mapping.
	if s, _ := m.Slice(1<<32, 4); string(s) != "high" || string(m.mem[MMIOHoleStart:MMIOHoleStart+4]) != "high" {
		t.Errorf("high region maps wrongly")
	}
	for _, c := range []struct{ gpa, n uint64 }{
		{MMIOHoleStart, 1},         // in the hole
		{MMIOHoleStart - 2, 4},     // straddles RAM and hole
		{(1 << 32) + (2 << 30), 1}, // past the end
		{^uint64(0) - 1, 4},        // wraps
	} {
		if _, err := m.Slice(c.gpa, c.n); !errors.Is(err, ErrRange) {
			t.Errorf("Slice(%#x, %d) = %v, want ErrRange", c.gpa, c.n, err)
		}
	}
	if s, _ := m.Slice(0x1000, 3); cap(s) != 3 {
		t.Errorf("slice capacity %d reaches past the range", cap(s))
	}
	if _, err := m.ReadAt(make([]byte, 1), -1); !errors.Is(err, ErrRange) {
		t.Errorf("negative ReadAt: %v", err)
	}
}

// TestDumpAndMapFile dumps memory sparsely and maps it back copy-on-write.
func TestDumpAndMapFile(t *testing.T) {
	const size = 64 << 20
	m, err := New(size)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.WriteAt([]byte("first page"), 0)
	m.WriteAt(bytes.Repeat([]byte{0xab}, 3*PageSize), 10<<20)
	m.WriteAt([]byte("last"), size-4)
	path := filepath.Join(t.TempDir(), "mem")
	if err := m.Dump(path); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != size {
		t.Fatalf("file is %d bytes, want %d", st.Size(), size)
	}
	if blocks := st.Sys().(*syscall.Stat_t).Blocks * 512; blocks > 1<<20 {
		t.Errorf("dump of 5 non-zero pages uses %d bytes of disk: not sparse", blocks)
	}

	c, err := MapFile(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !bytes.Equal(c.mem, m.mem) {
		t.Fatal("mapped file differs from the dumped memory")
	}
	c.WriteAt([]byte("clone writes"), 0)
	raw, _ := os.ReadFile(path)
	if !bytes.HasPrefix(raw, []byte("first page")) {
		t.Error("a write to the MAP_PRIVATE mapping reached the file")
	}

	if _, err := MapFile(path, size*2); !errors.Is(err, ErrFileSize) {
		t.Errorf("MapFile with the wrong size = %v, want ErrFileSize", err)
	}
	if _, err := MapFile(filepath.Dir(path), size); !errors.Is(err, ErrFileSize) {
		t.Errorf("MapFile of a directory = %v, want ErrFileSize", err)
	}
}
