package builder

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/template"
	"github.com/cubicle-dev/cubicle/template/oci"
	"github.com/cubicle-dev/cubicle/template/uploads"
)

type noRunner struct{}

func (noRunner) Run(context.Context, string, Command, io.Writer) (int, error) { return 0, nil }

type noTemplates struct{}

func (noTemplates) Base(string, string) (template.Template, string, error) {
	return template.Template{}, "", template.ErrNotFound
}

// TestCollectGarbage: the least recently used artifacts go first until
// the rest fit the cap; half-made trees and the image cache's own files
// stay; no cap removes nothing.
func TestCollectGarbage(t *testing.T) {
	dir := t.TempDir()
	reg, err := template.Open(filepath.Join(dir, "data"))
	if err != nil {
		t.Fatal(err)
	}
	ups, err := uploads.New(filepath.Join(dir, "uploads"), uploads.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := New(Options{Registry: reg, Templates: noTemplates{}, Uploads: ups, Runner: noRunner{},
		Images: oci.Cache{Dir: filepath.Join(dir, "images")}, CacheDir: filepath.Join(dir, "cache")})
	if err != nil {
		t.Fatal(err)
	}
	base := time.Now().Add(-time.Hour)
	mk := func(path string, size int, age int) {
		t.Helper()
		os.MkdirAll(path, 0o700)
		if err := os.WriteFile(filepath.Join(path, "f"), bytes.Repeat([]byte{1}, size), 0o600); err != nil {
			t.Fatal(err)
		}
		at := base.Add(time.Duration(age) * time.Minute)
		os.Chtimes(path, at, at)
	}
	const mib = 1 << 20
	mk(filepath.Join(dir, "cache", "steps", "oldest"), 4*mib, 0)
	mk(filepath.Join(dir, "images", "v1-sha256-aa"), 4*mib, 10)
	mk(filepath.Join(dir, "cache", "steps", "newest"), 4*mib, 30)
	mk(filepath.Join(dir, "cache", "steps", "x.tmp-1-2"), 4*mib, -10) // a build's half-made tree
	mk(filepath.Join(dir, "images", ".v1-sha256-bb.tmp-3"), 4*mib, -10)
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: "a", Mode: 0o644, Size: 3, Typeflag: tar.TypeReg})
	tw.Write([]byte("abc"))
	tw.Close()
	hash := strings.Repeat("c", 64)
	if _, err := ups.Put(hash, bytes.NewReader(tb.Bytes())); err != nil {
		t.Fatal(err)
	}

	rep, err := b.CollectGarbage(context.Background(), -1)
	if err != nil || rep.Removed != 0 || rep.Artifacts != 4 || rep.Bytes < 12*mib {
		t.Fatalf("no cap: %+v, %v", rep, err)
	}
	// A cap that holds two of the three trees: the oldest goes.
	rep, err = b.CollectGarbage(context.Background(), 9*mib)
	if err != nil || rep.Removed != 1 {
		t.Fatalf("cap 9 MiB: %+v, %v", rep, err)
	}
	exists := func(p string) bool { _, err := os.Stat(p); return err == nil }
	for p, want := range map[string]bool{
		"cache/steps/oldest": false, "images/v1-sha256-aa": true, "cache/steps/newest": true,
		"cache/steps/x.tmp-1-2": true, "images/.v1-sha256-bb.tmp-3": true,
	} {
		if exists(filepath.Join(dir, p)) != want {
			t.Errorf("%s exists: %v, want %v", p, !want, want)
		}
	}
	// A cap of nothing: everything collectable goes, the upload included.
	if rep, err = b.CollectGarbage(context.Background(), 0); err != nil || rep.Removed != 3 {
		t.Fatalf("cap 0: %+v, %v", rep, err)
	}
	if ups.Has(hash) || exists(filepath.Join(dir, "images/v1-sha256-aa")) {
		t.Error("artifacts left under a cap of 0")
	}
}
