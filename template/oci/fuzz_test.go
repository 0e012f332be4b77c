package oci

import (
	"archive/tar"
	"bytes"
	"context"
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
	for _, s := range seeds {
		f.Add(tarBytes(f, s...))
	}
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{0}, 1024))
	f.Fuzz(func(t *testing.T, data []byte) {
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
	})
}
