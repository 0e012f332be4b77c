package uploads

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// ent is one tar entry for tests.
type ent struct {
	name, body, link string
	typ              byte
	mode             int64
}

func file(name, body string) ent { return ent{name: name, body: body, typ: tar.TypeReg, mode: 0o644} }
func dir(name string) ent        { return ent{name: name, typ: tar.TypeDir, mode: 0o755} }
func symlink(name, target string) ent {
	return ent{name: name, link: target, typ: tar.TypeSymlink, mode: 0o777}
}
func hardlink(name, target string) ent {
	return ent{name: name, link: target, typ: tar.TypeLink, mode: 0o644}
}

var mtime = time.Date(2024, 3, 4, 5, 6, 7, 0, time.UTC)

func tarOf(t testing.TB, zip bool, ents ...ent) []byte {
	t.Helper()
	var buf bytes.Buffer
	var w *tar.Writer
	var zw *gzip.Writer
	if zip {
		zw = gzip.NewWriter(&buf)
		w = tar.NewWriter(zw)
	} else {
		w = tar.NewWriter(&buf)
	}
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link, ModTime: mtime, Size: int64(len(e.body))}
		if e.typ != tar.TypeReg {
			h.Size = 0
		}
		if err := w.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if e.typ == tar.TypeReg {
			w.Write([]byte(e.body))
		}
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if zw != nil {
		zw.Close()
	}
	return buf.Bytes()
}

const h1 = "1111111111111111111111111111111111111111111111111111111111111111"

func TestStore(t *testing.T) {
	s, err := New(t.TempDir(), Limits{MaxUploadBytes: 16384, MaxEntries: 10})
	if err != nil {
		t.Fatal(err)
	}
	if s.Has(h1) {
		t.Fatal("empty store has a hash")
	}
	if _, _, err := s.Open(h1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Open of missing: %v", err)
	}
	data := tarOf(t, true, dir("app/"), file("app/a.txt", "hello"))
	e, err := s.Put(h1, bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(data)
	if e.Digest != hex.EncodeToString(sum[:]) || e.Size != int64(len(data)) || !s.Has(h1) {
		t.Fatalf("entry %+v", e)
	}
	f, e2, err := s.Open(h1)
	if err != nil {
		t.Fatal(err)
	}
	got := new(bytes.Buffer)
	got.ReadFrom(f)
	f.Close()
	if e2 != e || !bytes.Equal(got.Bytes(), data) {
		t.Fatalf("Open gave %+v and %d bytes", e2, got.Len())
	}
	// A re-upload replaces, and the digest follows the bytes.
	data2 := tarOf(t, false, file("a.txt", "other"))
	e3, err := s.Put(h1, bytes.NewReader(data2))
	if err != nil || e3.Digest == e.Digest {
		t.Fatalf("re-upload: %+v, %v", e3, err)
	}
	if l, err := s.List(); err != nil || len(l) != 1 || l[0].Hash != h1 || l[0].Size != e3.Size {
		t.Fatalf("List: %+v, %v", l, err)
	}
	if err := s.Remove(h1); err != nil || s.Has(h1) {
		t.Fatalf("Remove: %v", err)
	}
	// A crash in the middle of a Put leaves a temporary file; reopening
	// the store removes it.
	os.WriteFile(filepath.Join(s.dir, ".put-123"), []byte("half"), 0o600)
	if _, err := New(s.dir, Limits{}); err != nil {
		t.Fatal(err)
	}
	if left, _ := os.ReadDir(s.dir); len(left) != 0 {
		t.Fatalf("left %v", left)
	}

	for _, tc := range []struct {
		name string
		hash string
		data []byte
		want error
		msg  string
	}{
		{"bad hash", "../../x", data, ErrBadUpload, "not a files hash"},
		{"not a tar", h1, []byte("just some text that is not a tar archive at all, padded out........................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................................"), ErrBadUpload, ""},
		{"empty", h1, nil, ErrBadUpload, "empty"},
		{"bad gzip", h1, []byte{0x1f, 0x8b, 1, 2, 3}, ErrBadUpload, ""},
		{"too large", h1, bytes.Repeat([]byte{0}, 20000), ErrTooLarge, ""},
		{"absolute", h1, tarOf(t, false, file("/etc/passwd", "x")), ErrBadUpload, "absolute"},
		{"climbs", h1, tarOf(t, false, file("a/../../x", "x")), ErrBadUpload, "climbs out"},
		{"device", h1, tarOf(t, false, ent{name: "null", typ: tar.TypeChar}), ErrBadUpload, "character device"},
		{"sparse", h1, sparseTar(t), ErrBadUpload, "sparse"},
		{"old sparse", h1, tarOf(t, false, ent{name: "s", typ: tar.TypeGNUSparse}), ErrBadUpload, ""},
		{"fifo", h1, tarOf(t, false, ent{name: "p", typ: tar.TypeFifo}), ErrBadUpload, "named pipe"},
		{"link out", h1, tarOf(t, false, hardlink("x", "../y")), ErrBadUpload, "outside"},
		{"too many", h1, tarOf(t, false, file("1", ""), file("2", ""), file("3", ""), file("4", ""), file("5", ""), file("6", ""), file("7", ""), file("8", ""), file("9", ""), file("10", ""), file("11", "")), ErrTooLarge, "entries"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Put(tc.hash, bytes.NewReader(tc.data))
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Put: %v, want %v %q", err, tc.want, tc.msg)
			}
			if s.Has(h1) {
				t.Fatal("a refused upload is stored")
			}
			left, _ := os.ReadDir(s.dir)
			if len(left) != 0 {
				t.Fatalf("a refused upload left %v", left)
			}
		})
	}
}

// TestStoreConcurrent races uploads of different content under one hash
// against readers: every read sees one whole upload whose digest matches.
func TestStoreConcurrent(t *testing.T) {
	s, err := New(t.TempDir(), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	var datas [][]byte
	digests := map[string]bool{}
	for i := range 4 {
		d := tarOf(t, i%2 == 0, file("f", strings.Repeat(fmt.Sprint(i), 10000+i)))
		datas = append(datas, d)
		sum := sha256.Sum256(d)
		digests[hex.EncodeToString(sum[:])] = true
	}
	if _, err := s.Put(h1, bytes.NewReader(datas[0])); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 20 {
				if i%2 == 0 {
					if _, err := s.Put(h1, bytes.NewReader(datas[(i+j)%len(datas)])); err != nil {
						t.Error(err)
					}
					continue
				}
				f, e, err := s.Open(h1)
				if err != nil {
					t.Error(err)
					return
				}
				var b bytes.Buffer
				b.ReadFrom(f)
				f.Close()
				sum := sha256.Sum256(b.Bytes())
				if hex.EncodeToString(sum[:]) != e.Digest || !digests[e.Digest] {
					t.Errorf("read %d bytes that are not one whole upload", b.Len())
				}
				if err := Check(bytes.NewReader(b.Bytes()), Limits{}); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	left, _ := os.ReadDir(s.dir)
	if len(left) != 1 {
		t.Fatalf("store holds %v", left)
	}
}

func TestItemOf(t *testing.T) {
	for src, want := range map[string]string{
		"a.txt": "a.txt", "./a.txt": "a.txt", "dir/": "dir", "a/b/c": "a/b/c", "*.txt": ".",
		"src/*.go": "src", "src/**/x": "src", "a/b[12]/c": "a", ".": ".", "./": ".", "x/../y": "y", "{a,b}": ".",
	} {
		if got := itemOf(src); got != want {
			t.Errorf("itemOf(%q) = %q, want %q", src, got, want)
		}
	}
}

// sparseTar is a PAX GNU-sparse 1.0 entry whose map claims a 1 GB file
// made of one byte and a hole. archive/tar will not write a PAX header by
// hand, so the 'x' header is written as a regular entry and its type byte
// patched.
func sparseTar(t *testing.T) []byte {
	rec := func(k, v string) string {
		s := " " + k + "=" + v + "\n"
		n := len(s)
		for {
			if l := len(fmt.Sprint(n) + s); l != n {
				n = l
				continue
			}
			return fmt.Sprint(n) + s
		}
	}
	pax := rec("GNU.sparse.major", "1") + rec("GNU.sparse.minor", "0") + rec("GNU.sparse.name", "s") + rec("GNU.sparse.realsize", "1000000000")
	var buf bytes.Buffer
	w := tar.NewWriter(&buf)
	if err := w.WriteHeader(&tar.Header{Name: "x", Typeflag: tar.TypeReg, Size: int64(len(pax)), Format: tar.FormatUSTAR}); err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(pax))
	sparseMap := "1\n0\n1\n"
	data := sparseMap + string(make([]byte, 512-len(sparseMap))) + "x"
	if err := w.WriteHeader(&tar.Header{Name: "s", Typeflag: tar.TypeReg, Size: int64(len(data)), Format: tar.FormatUSTAR}); err != nil {
		t.Fatal(err)
	}
	w.Write([]byte(data))
	w.Close()
	b := buf.Bytes()
	b[156] = tar.TypeXHeader
	sum := 0
	copy(b[148:156], "        ")
	for _, c := range b[:512] {
		sum += int(c)
	}
	copy(b[148:156], fmt.Sprintf("%06o\x00 ", sum))
	return b
}
