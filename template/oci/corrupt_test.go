package oci

import (
	"bytes"
	"compress/gzip"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// compressedBytes is l's blob.
func compressedBytes(t *testing.T, l v1.Layer) []byte {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCorruptRegistryLayer: a registry that serves a layer blob other than
// the one its digest names (a flipped bit, a truncated body) makes Unpack
// fail with ErrCorrupt, naming the layer.
func TestCorruptRegistryLayer(t *testing.T) {
	// Incompressible-ish content, so a flipped byte lands in deflate data
	// and the stream may still decode: the digest check must catch it.
	body := strings.Repeat("cubicle layer content 0123456789\n", 4096)
	l := layerOf(t, compression.GZip, file("big", body))
	blob := compressedBytes(t, l)
	digest, _ := l.Digest()
	for _, tc := range []struct {
		name  string
		serve func() []byte
	}{
		{"flipped byte", func() []byte {
			b := bytes.Clone(blob)
			b[len(b)/2] ^= 0x55
			return b
		}},
		{"flipped byte in the gzip trailer", func() []byte {
			b := bytes.Clone(blob)
			b[len(b)-1] ^= 0x01 // ISIZE: gzip itself notices, or the digest does
			return b
		}},
		{"truncated", func() []byte { return blob[:len(blob)/2] }},
		{"gzip header changed", func() []byte {
			// MTIME in the gzip header (RFC 1952), which no CRC
			// covers: the same content, still valid gzip and tar, of
			// the same size; only the blob digest tells.
			b := bytes.Clone(blob)
			b[4] ^= 0xff
			return b
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			served := tc.serve()
			host := startRegistry(t, func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+digest.String()) {
						w.Header().Set("Content-Length", strconv.Itoa(len(served)))
						w.Write(served)
						return
					}
					h.ServeHTTP(w, r)
				})
			})
			img := imageOf(t, runtime.GOARCH, l)
			push(t, host+"/test/corrupt:1", img)
			resolved, err := Resolve(context.Background(), host+"/test/corrupt:1", Options{})
			if err != nil {
				t.Fatalf("Resolve: %v", err)
			}
			_, dst := sandbox(t)
			_, err = Unpack(context.Background(), resolved, dst)
			wantErr(t, "Unpack", err, ErrCorrupt, "layer 1 of 1", digest.String())
		})
	}
}

// TestCorruptLayoutLayer: blobs on disk are not checked by
// go-containerregistry; Unpack checks each layer against its diff ID and
// the config against the manifest.
func TestCorruptLayoutLayer(t *testing.T) {
	good := layerOf(t, compression.GZip, file("f", "the real content"))
	other := layerOf(t, compression.GZip, file("f", "something else!!"))
	img := imageOf(t, runtime.GOARCH, good)
	digest, _ := good.Digest()

	blobPath := func(dir string, h v1.Hash) string { return filepath.Join(dir, "blobs", h.Algorithm, h.Hex) }

	for _, tc := range []struct {
		name   string
		tamper func(t *testing.T, dir string)
		says   string
	}{
		{"truncated gzip", func(t *testing.T, dir string) {
			p := blobPath(dir, digest)
			b, _ := os.ReadFile(p)
			os.WriteFile(p, b[:len(b)-12], 0o644)
		}, "reading layer"},
		{"not gzip at all", func(t *testing.T, dir string) {
			os.WriteFile(blobPath(dir, digest), []byte("\x1f\x8bnot really gzip"), 0o644)
		}, "reading layer"},
		{"another valid layer", func(t *testing.T, dir string) {
			os.WriteFile(blobPath(dir, digest), compressedBytes(t, other), 0o644)
		}, "the image config says"},
		{"a valid gzip of no tar", func(t *testing.T, dir string) {
			var buf bytes.Buffer
			zw := gzip.NewWriter(&buf)
			zw.Write(bytes.Repeat([]byte("x"), 2000))
			zw.Close()
			os.WriteFile(blobPath(dir, digest), buf.Bytes(), 0o644)
		}, "tar"},
		{"tampered config", func(t *testing.T, dir string) {
			cn, _ := img.ConfigName()
			p := blobPath(dir, cn)
			b, _ := os.ReadFile(p)
			os.WriteFile(p, bytes.Replace(b, []byte("echo hi"), []byte("rm -rf"), 1), 0o644)
		}, "config is sha256:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeLayout(t, dir, img)
			tc.tamper(t, dir)
			resolved, err := Resolve(context.Background(), "oci-layout://"+dir, Options{})
			if err != nil {
				wantErr(t, "Resolve", err, ErrCorrupt)
				return
			}
			_, dst := sandbox(t)
			_, err = Unpack(context.Background(), resolved, dst)
			wantErr(t, "Unpack", err, ErrCorrupt, tc.says)
		})
	}
}
