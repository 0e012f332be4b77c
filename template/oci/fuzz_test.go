package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzUnpackLayer applies arbitrary bytes as a layer, twice over (so that
// the second copy meets what the first made: replacements, whiteouts, hard
// links to a lower layer), to a fresh directory beside a sentinel. It must
// never panic and never change anything outside the directory.
func FuzzUnpackLayer(f *testing.F) {
	seeds := [][]ent{
		{file("a", "a"), dir("d"), file("d/b", "b"), hardlink("d/c", "a"), symlink("l", "d")},
		{symlink("up", ".."), file("up/sentinel", "overwritten"), file("up/dst/x", "x")},
		{symlink("up", "../.."), dir("up/outside"), file("up/outside/f", "x")},
		{symlink("a", "/"), file("a/../sentinel", "x"), file("a/etc/x", "x")},
		{symlink("up", ".."), file("up/.wh.sentinel", ""), file("up/.wh..wh..opq", "")},
		{symlink("up", ".."), hardlink("s", "up/sentinel"), hardlink("t", "../sentinel")},
		{file("../sentinel", "x")},
		{symlink("f", "../sentinel"), file("f", "replaced")},
		{symlink("f", "../sentinel"), hardlink("g", "f"), file("g", "replaced")},
		{dir("d"), file("d/.wh..wh..opq", ""), file(".wh.d", ""), file(".wh.up", "")},
		{{name: "p", typ: tar.TypeFifo}, {name: "big", typ: tar.TypeReg, body: "xyz", mode: 0o4755, xattrs: map[string]string{"user.a": "b"}}},
	}
	// A host directory at a fixed path, which seeds can aim at with
	// absolute names and links (the sandbox's own path changes with every
	// input): anything that reaches it escaped.
	canary := filepath.Join(os.TempDir(), "cubicle-oci-fuzz-canary")
	seeds = append(seeds,
		[]ent{symlink("a", canary), file("a/f", "x"), file("a/canary", "overwritten")},
		[]ent{symlink("a", canary), dir("a"), dir("a/sub")},
		[]ent{symlink("a", canary), hardlink("h", "a/canary"), file("a/.wh.canary", ""), file("a/.wh..wh..opq", "")},
		[]ent{symlink("c", canary+"/canary"), file("c", "x"), hardlink("d", "c"), file("d", "y")},
		[]ent{file(canary+"/canary", "x"), symlink("up", "../../../../.."), file("up"+canary+"/f", "x")},
	)
	for _, s := range seeds {
		f.Add(tarBytes(f, s...))
	}
	f.Cleanup(func() { os.RemoveAll(canary) })
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{0}, 1024))
	f.Fuzz(func(t *testing.T, data []byte) {
		makeCanary(t, canary)
		tmp, dst := sandbox(t)
		before := snapshot(t, tmp)
		root, err := openRoot(dst)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(root)
		for range 2 {
			// Errors are expected (most inputs are no tar); only what
			// happened outside dst matters.
			_ = applyTar(context.Background(), root, bytes.NewReader(data))
		}
		checkConfined(t, tmp, before)
		checkCanary(t, canary)
	})
}

// makeCanary makes the canary directory (mode 0700) holding one file; it
// is made once and shared by fuzz workers, so it is left as it is found.
func makeCanary(t *testing.T, dir string) {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "canary")
	if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile(p, []byte("canary"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// checkCanary fails the test unless the canary directory is as made.
func checkCanary(t *testing.T, dir string) {
	t.Helper()
	fi, err := os.Lstat(dir)
	if err != nil || !fi.IsDir() || fi.Mode().Perm() != 0o700 {
		t.Fatalf("canary directory %s: %v, %v", dir, fi.Mode(), err)
	}
	names, err := os.ReadDir(dir)
	if err != nil || len(names) != 1 || names[0].Name() != "canary" {
		t.Fatalf("canary directory holds %v (%v)", names, err)
	}
	var st unix.Stat_t
	p := filepath.Join(dir, "canary")
	if err := unix.Lstat(p, &st); err != nil || st.Mode != unix.S_IFREG|0o600 || st.Nlink != 1 || st.Uid != uint32(os.Getuid()) {
		t.Fatalf("canary file: mode %#o nlink %d uid %d (%v)", st.Mode, st.Nlink, st.Uid, err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "canary" {
		t.Fatalf("canary file holds %q (%v)", b, err)
	}
}
