package oci

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"io/fs"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"
)

// ent is one tar entry of a test layer. Unset owners are the test's own
// (so that tests without root can chown to them), unset modes 0644 for
// files and 0755 for directories.
type ent struct {
	name     string
	typ      byte
	body     string
	link     string
	mode     int64
	uid, gid int
	owned    bool // uid/gid are set
	mtime    time.Time
	xattrs   map[string]string
	major    int64
	minor    int64
}

func file(name, body string) ent { return ent{name: name, typ: tar.TypeReg, body: body} }
func dir(name string) ent        { return ent{name: name, typ: tar.TypeDir} }
func symlink(name, target string) ent {
	return ent{name: name, typ: tar.TypeSymlink, link: target}
}
func hardlink(name, target string) ent { return ent{name: name, typ: tar.TypeLink, link: target} }

// testTime is the mtime of entries that name none.
var testTime = time.Date(2020, 2, 3, 4, 5, 6, 0, time.UTC)

// tarBytes writes ents as a PAX tar.
func tarBytes(t testing.TB, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		h := &tar.Header{
			Name:     e.name,
			Typeflag: e.typ,
			Linkname: e.link,
			Mode:     e.mode,
			Uid:      os.Getuid(),
			Gid:      os.Getgid(),
			ModTime:  e.mtime,
			Devmajor: e.major,
			Devminor: e.minor,
			Format:   tar.FormatPAX,
		}
		if e.owned {
			h.Uid, h.Gid = e.uid, e.gid
		}
		if h.ModTime.IsZero() {
			h.ModTime = testTime
		}
		if h.Mode == 0 {
			h.Mode = 0o644
			if e.typ == tar.TypeDir {
				h.Mode = 0o755
			}
		}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		for k, v := range e.xattrs {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords[paxXattr+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("tar header %s: %v", e.name, err)
		}
		if e.typ == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// layerOf is a gzip (or zstd) layer of ents.
func layerOf(t testing.TB, comp compression.Compression, ents ...ent) v1.Layer {
	t.Helper()
	b := tarBytes(t, ents...)
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithCompression(comp))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// testConfig is the config of the test images.
var testConfig = v1.Config{
	Env:        []string{"PATH=/usr/bin:/bin", "FOO=bar"},
	WorkingDir: "/work",
	User:       "1000:1000",
	Entrypoint: []string{"/bin/sh", "-c"},
	Cmd:        []string{"echo hi"},
}

// imageOf is a linux image for arch with one layer per element of layers.
func imageOf(t testing.TB, arch string, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	cf.Config = testConfig
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// hostImage is imageOf for the host's architecture.
func hostImage(t testing.TB, layers ...[]ent) v1.Image {
	t.Helper()
	var ls []v1.Layer
	for _, l := range layers {
		ls = append(ls, layerOf(t, compression.GZip, l...))
	}
	return imageOf(t, runtime.GOARCH, ls...)
}

// startRegistry serves go-containerregistry's registry on loopback, behind
// wrap when it is not nil, and returns its host:port.
func startRegistry(t testing.TB, wrap func(http.Handler) http.Handler) string {
	t.Helper()
	var h http.Handler = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	if wrap != nil {
		h = wrap(h)
	}
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// push writes img to ref in a loopback registry.
func push(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
}

// sandbox makes tmp/{dst/,sentinel,outside/} and returns tmp and dst;
// snapshot(tmp) before and after an unpack must agree outside dst.
func sandbox(t testing.TB) (tmp, dst string) {
	t.Helper()
	tmp = t.TempDir()
	t.Cleanup(func() { makeRemovable(tmp) })
	if err := os.WriteFile(filepath.Join(tmp, "sentinel"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Modes no layer would give: a chmod that escaped would show.
	if err := os.Mkdir(filepath.Join(tmp, "outside"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, 0o711); err != nil {
		t.Fatal(err)
	}
	dst = filepath.Join(tmp, "dst")
	if err := os.Mkdir(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	return tmp, dst
}

// makeRemovable gives every directory under root u+rwx, so that a test
// without root can remove what a layer made read-only.
func makeRemovable(root string) {
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			os.Chmod(p, 0o755)
		}
		return nil
	})
}

// snapshot describes every path under tmp outside tmp/dst: name, type,
// size, mode, mtime, link target.
func snapshot(t testing.TB, tmp string) map[string]string {
	t.Helper()
	out := map[string]string{}
	dst := filepath.Join(tmp, "dst")
	err := filepath.WalkDir(tmp, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == dst {
			return filepath.SkipDir
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		link, _ := os.Readlink(p)
		out[p] = fmt.Sprintf("mode %#o size %d mtime %d nlink %d link %q", st.Mode, st.Size, st.Mtim.Nano(), st.Nlink, link)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// canMknod reports whether this process may make device nodes.
func canMknod(t testing.TB) bool {
	p := filepath.Join(t.TempDir(), "null")
	return unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(1, 3))) == nil
}

// writeLayout writes an OCI image layout holding img alone to dir.
func writeLayout(t testing.TB, dir string, img v1.Image) {
	t.Helper()
	if _, err := layout.Write(dir, mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img})); err != nil {
		t.Fatal(err)
	}
}
