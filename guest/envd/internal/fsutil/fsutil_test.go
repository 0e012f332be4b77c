package fsutil

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestMetadataFromHeaders(t *testing.T) {
	tests := []struct {
		name string
		hdr  http.Header
		want map[string]string
		err  bool
	}{
		{"none", http.Header{"Content-Type": {"x"}}, nil, false},
		{"lowercased, first value wins", http.Header{"X-Metadata-Author": {"mish", "other"}, "X-Metadata-Purpose": {"upload"}},
			map[string]string{"author": "mish", "purpose": "upload"}, false},
		{"non-canonical name", http.Header{"x-metadata-Key": {"v"}}, map[string]string{"key": "v"}, false},
		{"empty value", http.Header{"X-Metadata-K": {""}}, map[string]string{"k": ""}, false},
		{"bare prefix", http.Header{"X-Metadata-": {"v"}}, nil, false},
		{"non-printable value", http.Header{"X-Metadata-K": {"a\tb"}}, nil, true},
		{"non-ASCII value", http.Header{"X-Metadata-K": {"café"}}, nil, true},
		{"bad key char", http.Header{"X-Metadata-K(y)": {"v"}}, nil, true},
		{"key too long", http.Header{"X-Metadata-" + strings.Repeat("k", MaxMetadataKeyLen+1): {"v"}}, nil, true},
		{"longest key", http.Header{"X-Metadata-" + strings.Repeat("k", MaxMetadataKeyLen): {"v"}},
			map[string]string{strings.Repeat("k", MaxMetadataKeyLen): "v"}, false},
		{"total too large", http.Header{"X-Metadata-A": {strings.Repeat("v", 3000)}, "X-Metadata-B": {strings.Repeat("v", 3000)}}, nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := MetadataFromHeaders(tc.hdr)
			if (err != nil) != tc.err {
				t.Fatalf("err = %v, want error %v", err, tc.err)
			}
			if err != nil && !errors.Is(err, ErrInvalidMetadata) {
				t.Errorf("%v does not wrap ErrInvalidMetadata", err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Errorf("got %v, want %v", got, tc.want)
				}
			}
		})
	}
}

func FuzzMetadataFromHeaders(f *testing.F) {
	f.Add("X-Metadata-Author", "mish")
	f.Add("X-Metadata-", "")
	f.Add("x-metadata-\x00", "\x7f")
	f.Fuzz(func(t *testing.T, name, value string) {
		md, err := MetadataFromHeaders(http.Header{name: {value}})
		if err != nil {
			return
		}
		for k, v := range md {
			if ValidateMetadata(k, v) != nil || k != strings.ToLower(k) {
				t.Fatalf("accepted invalid metadata %q=%q", k, v)
			}
		}
	})
}

func TestMetadataXattrs(t *testing.T) {
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if md := ReadMetadata(p); md != nil {
		t.Errorf("fresh file has metadata %v", md)
	}
	if err := ReplaceMetadata(p, map[string]string{"a": "1", "b": "2"}); err != nil {
		t.Fatal(err)
	}
	if md := ReadMetadata(p); len(md) != 2 || md["a"] != "1" || md["b"] != "2" {
		t.Errorf("metadata %v", md)
	}
	if err := ReplaceMetadata(p, map[string]string{"b": "3"}); err != nil {
		t.Fatal(err)
	}
	if md := ReadMetadata(p); len(md) != 1 || md["b"] != "3" {
		t.Errorf("after replace: %v", md)
	}
	if err := ReplaceMetadata(p, nil); err != nil {
		t.Fatal(err)
	}
	if md := ReadMetadata(p); md != nil {
		t.Errorf("after clearing: %v", md)
	}
	// Clearing works where user xattrs are not supported at all.
	if err := ReplaceMetadata("/proc/self/status", nil); err != nil {
		t.Errorf("clearing on procfs: %v", err)
	}
}

func TestMkdirAllOwned(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	base := t.TempDir()
	if err := MkdirAllOwned(filepath.Join(base, "a/b/c"), 65534, 65534, true); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"a", "a/b", "a/b/c"} {
		fi, err := os.Stat(filepath.Join(base, p))
		if err != nil {
			t.Fatal(err)
		}
		if st := fi.Sys().(*syscall.Stat_t); st.Uid != 65534 || !fi.IsDir() {
			t.Errorf("%s: uid %d", p, st.Uid)
		}
	}
	if fi, _ := os.Stat(base); fi.Sys().(*syscall.Stat_t).Uid != 0 {
		t.Error("an existing directory changed owner")
	}
	if err := MkdirAllOwned(filepath.Join(base, "a/b"), 0, 0, true); err != nil {
		t.Errorf("existing directory: %v", err)
	}
	file := filepath.Join(base, "file")
	os.WriteFile(file, nil, 0o644)
	if err := MkdirAllOwned(filepath.Join(file, "x"), 0, 0, true); !errors.Is(err, syscall.ENOTDIR) {
		t.Errorf("below a file: %v, want ENOTDIR", err)
	}
}
