package sparse

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func allocated(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return uint64(st.Blocks) * 512
}

// TestCopy: the copy equals the source, keeps its holes (allocates little
// more than its data) and refuses to overwrite a file.
func TestCopy(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "src"), filepath.Join(dir, "dst")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	const size = 64 << 20
	data := bytes.Repeat([]byte("cubicle!"), 8192) // 64 KiB
	for _, off := range []int64{0, 1 << 20, 40<<20 + 4096, size - int64(len(data))} {
		if _, err := f.WriteAt(data, off); err != nil {
			t.Fatal(err)
		}
	}
	f.Close()
	if err := Copy(src, dst); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if !bytes.Equal(a, b) {
		t.Fatal("copy differs from the source")
	}
	if alloc := allocated(t, dst); alloc > 1<<20 {
		t.Fatalf("copy allocates %d bytes for 256 KiB of data: holes were filled", alloc)
	}
	if err := Copy(src, dst); err == nil {
		t.Fatal("copy over an existing file succeeded")
	}
}
