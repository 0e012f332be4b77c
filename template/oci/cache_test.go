package oci

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/google/go-containerregistry/pkg/compression"
)

// TestCacheUnpacksOnce: concurrent and later callers get the same tree,
// and the layer is fetched from the registry once.
func TestCacheUnpacksOnce(t *testing.T) {
	l := layerOf(t, compression.GZip, file("hello", "cached"))
	digest, _ := l.Digest()
	var fetches atomic.Int32
	host := startRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+digest.String()) {
				fetches.Add(1)
			}
			h.ServeHTTP(w, r)
		})
	})
	push(t, host+"/test/cached:1", imageOf(t, runtime.GOARCH, l))
	fetches.Store(0)

	c := Cache{Dir: filepath.Join(t.TempDir(), "images")}
	dirs := make([]string, 4)
	var wg sync.WaitGroup
	for i := range dirs {
		wg.Go(func() {
			img, err := Resolve(context.Background(), host+"/test/cached:1", Options{})
			if err != nil {
				t.Error(err)
				return
			}
			dir, cfg, err := c.Unpacked(context.Background(), img)
			if err != nil {
				t.Error(err)
				return
			}
			if cfg.Cmd[0] != testConfig.Cmd[0] {
				t.Errorf("Config %+v", cfg)
			}
			dirs[i] = dir
		})
	}
	wg.Wait()
	for _, d := range dirs {
		if d != dirs[0] {
			t.Fatalf("callers got different trees: %v", dirs)
		}
	}
	if got := readFile(t, filepath.Join(dirs[0], "hello")); got != "cached" {
		t.Errorf("hello = %q", got)
	}
	if n := fetches.Load(); n != 1 {
		t.Errorf("the layer was fetched %d times, want once", n)
	}
	if fi, err := os.Stat(c.Dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("cache directory: %v, %v; want mode 0700", fi.Mode(), err)
	}
	entries, _ := os.ReadDir(c.Dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("left behind: %s", e.Name())
		}
	}
}

// TestCacheFailureLeavesNothing: a corrupt layer leaves neither a tree nor
// a temporary directory, and a dead unpacker's leftovers are swept.
func TestCacheFailureLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	good := hostImage(t, []ent{file("f", "f")})
	c := Cache{Dir: filepath.Join(dir, "images")}
	d, _ := good.Digest()
	stale := filepath.Join(c.Dir, "."+Key(d)+".tmp-dead")
	if err := os.MkdirAll(filepath.Join(stale, "x"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.Unpacked(context.Background(), good); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); err == nil {
		t.Error("a dead unpacker's temporary directory was not removed")
	}

	l := layerOf(t, compression.GZip, file("f", "the real content"))
	img := imageOf(t, runtime.GOARCH, l)
	// Serve it from a layout whose blob was swapped.
	layoutDir := t.TempDir()
	writeLayout(t, layoutDir, img)
	ld, _ := l.Digest()
	other := compressedBytes(t, layerOf(t, compression.GZip, file("f", "something else!!")))
	if err := os.WriteFile(filepath.Join(layoutDir, "blobs", ld.Algorithm, ld.Hex), other, 0o644); err != nil {
		t.Fatal(err)
	}
	resolved, err := Resolve(context.Background(), "oci-layout://"+layoutDir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = c.Unpacked(context.Background(), resolved)
	wantErr(t, "Unpacked", err, ErrCorrupt)
	entries, _ := os.ReadDir(c.Dir)
	var names []string
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".lock") {
			names = append(names, e.Name())
		}
	}
	if len(names) != 1 || names[0] != Key(d) {
		t.Errorf("cache holds %v, want only %s", names, Key(d))
	}
}
