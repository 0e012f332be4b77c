//go:build linux

package memory

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestDiffFiles: a diff holds exactly the written pages (a page written
// back to zero included), applies onto a mapping of its base, merges into
// the same full file, and content IDs agree however they are computed.
func TestDiffFiles(t *testing.T) {
	const size = 4 << 20
	dir := t.TempDir()
	m, err := New(size)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	m.EnableWriteTracking()
	for _, gpa := range []int64{0, 5 * PageSize, 700 * PageSize} {
		if _, err := m.WriteAt(bytes.Repeat([]byte{byte(gpa/PageSize + 1)}, PageSize), gpa); err != nil {
			t.Fatal(err)
		}
	}
	basePath := filepath.Join(dir, "base")
	baseID, err := m.DumpID(basePath)
	if err != nil {
		t.Fatal(err)
	}
	if fid, err := FileID(basePath); err != nil || fid != baseID || m.ContentID() != baseID {
		t.Fatalf("FileID = %#x, %v; ContentID %#x; DumpID %#x", fid, err, m.ContentID(), baseID)
	}
	bm := make([]uint64, m.BitmapWords())
	m.TakeWriteLog(bm)
	if n := CountPages(bm); n != 3 {
		t.Fatalf("write log has %d pages, want 3", n)
	}
	clear(bm)
	m.TakeWriteLog(bm)
	if n := CountPages(bm); n != 0 {
		t.Fatalf("write log not reset: %d pages", n)
	}
	// Change page 5 to zeros, write page 9 and, through a slice, page 1000.
	if _, err := m.WriteAt(make([]byte, PageSize), 5*PageSize); err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteAt([]byte("nine"), 9*PageSize+100); err != nil {
		t.Fatal(err)
	}
	s, err := m.Slice(1000*PageSize, 8)
	if err != nil {
		t.Fatal(err)
	}
	copy(s, "thousand")
	m.TakeWriteLog(bm)
	diffPath := filepath.Join(dir, "diff")
	n, err := m.DumpPages(diffPath, bm)
	if err != nil || n != 3 {
		t.Fatalf("DumpPages = %d, %v; want 3 pages", n, err)
	}
	var st fileStat
	st.of(t, diffPath)
	if st.size != size || st.alloc > 3*PageSize+64<<10 {
		t.Fatalf("diff file: size %d, %d bytes allocated", st.size, st.alloc)
	}
	want := m.ContentID()

	r, err := MapFile(basePath, size)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.ApplyDiff(diffPath, 2); !errors.Is(err, ErrDiff) {
		t.Fatalf("ApplyDiff with 2 declared pages = %v, want ErrDiff", err)
	}
	applied, err := r.ApplyDiff(diffPath, 3)
	if err != nil {
		t.Fatal(err)
	}
	if CountPages(applied) != 3 || !bitSet(applied, 5) || !bitSet(applied, 9) || !bitSet(applied, 1000) {
		t.Fatalf("applied pages %v", applied)
	}
	if !bytes.Equal(r.mem, m.mem) || r.ContentID() != want {
		t.Fatal("base + diff differs from the memory the diff was taken of")
	}
	mergedPath := filepath.Join(dir, "merged")
	id, err := MergeFiles(basePath, diffPath, mergedPath)
	if err != nil || id != want {
		t.Fatalf("MergeFiles = %#x, %v; want %#x", id, err, want)
	}
	got, err := os.ReadFile(mergedPath)
	if err != nil || !bytes.Equal(got, m.mem) {
		t.Fatalf("merged file differs (%v)", err)
	}
	short := filepath.Join(dir, "short")
	if err := os.WriteFile(short, []byte{1}, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ApplyDiff(short, 3); !errors.Is(err, ErrDiff) {
		t.Fatalf("ApplyDiff of a short file = %v", err)
	}
	if _, err := MergeFiles(basePath, short, mergedPath); !errors.Is(err, ErrDiff) {
		t.Fatalf("MergeFiles with a short diff = %v", err)
	}
}

type fileStat struct{ size, alloc int64 }

func (s *fileStat) of(t *testing.T, path string) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	s.size = fi.Size()
	s.alloc = AllocatedBytes(fi)
}
