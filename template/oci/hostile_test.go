package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// checkConfined fails the test when anything under tmp but outside tmp/dst
// differs from before, or when the host path hostPath appeared.
func checkConfined(t testing.TB, tmp string, before map[string]string, hostPaths ...string) {
	t.Helper()
	after := snapshot(t, tmp)
	for _, p := range slices.Sorted(maps.Keys(after)) {
		if before[p] != after[p] {
			t.Errorf("outside dst: %s changed: %q -> %q", p, before[p], after[p])
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			t.Errorf("outside dst: %s was removed", p)
		}
	}
	if b, err := os.ReadFile(filepath.Join(tmp, "sentinel")); err != nil || string(b) != "keep" {
		t.Errorf("sentinel: %q, %v", b, err)
	}
	for _, p := range hostPaths {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("%s appeared on the host", p)
			os.Remove(p)
		}
	}
}

// TestHostileLayers feeds layers that try to write, link or remove outside
// the destination. Each is refused, or confined inside it as the kernel
// would resolve the path inside the sandbox; nothing outside changes.
func TestHostileLayers(t *testing.T) {
	// A name under the host's /etc that no one else uses: were a layer to
	// reach the host's root it would show up there.
	hostName := fmt.Sprintf("cubicle-oci-test-%d", os.Getpid())
	cases := []struct {
		name string
		// ents gets tmp, the sandbox directory, to aim at it.
		ents    func(tmp string) [][]ent
		wantErr error // nil: applied, confined
		// inside lists paths that must exist under dst afterwards.
		inside []string
	}{{
		name:    "dot-dot name",
		ents:    func(string) [][]ent { return [][]ent{{file("../../etc/"+hostName, "x")}} },
		wantErr: ErrUnsafe,
	}, {
		name:    "dot-dot inside a name",
		ents:    func(string) [][]ent { return [][]ent{{file("a/../../sentinel", "x")}} },
		wantErr: ErrUnsafe,
	}, {
		name:   "absolute name",
		ents:   func(string) [][]ent { return [][]ent{{file("/etc/"+hostName, "x")}} },
		inside: []string{"etc/" + hostName},
	}, {
		name: "absolute name into the sandbox",
		ents: func(tmp string) [][]ent {
			return [][]ent{{file(filepath.Join(tmp, "sentinel"), "overwritten")}}
		},
		inside: []string{"tmp"},
	}, {
		name:   "through a symlink to /",
		ents:   func(string) [][]ent { return [][]ent{{symlink("a", "/"), file("a/etc/"+hostName, "x")}} },
		inside: []string{"etc/" + hostName},
	}, {
		name:   "through a symlink to / in a lower layer",
		ents:   func(string) [][]ent { return [][]ent{{symlink("a", "/")}, {file("a/etc/"+hostName, "x")}} },
		inside: []string{"etc/" + hostName},
	}, {
		name: "through a symlink to ../..",
		ents: func(string) [][]ent {
			return [][]ent{{dir("d"), symlink("d/up", "../.."), file("d/up/sentinel", "overwritten")}}
		},
		inside: []string{"sentinel"},
	}, {
		name: "through a symlink to the sandbox's absolute path",
		ents: func(tmp string) [][]ent {
			return [][]ent{{symlink("a", tmp), file("a/sentinel", "overwritten")}}
		},
		wantErr: ErrCorrupt, // a dangling link inside dst
	}, {
		name: "through a chain of symlinks",
		ents: func(tmp string) [][]ent {
			return [][]ent{{symlink("a", "b/../.."), dir("b"), symlink("b/c", "../a/../../.."), file("b/c/outside/f", "x")}}
		},
		inside: []string{"outside/f"},
	}, {
		name: "through a symlink to an outside directory missing inside",
		ents: func(tmp string) [][]ent {
			return [][]ent{{symlink("a", filepath.Join(tmp, "outside")), file("a/f", "x")}}
		},
		wantErr: ErrCorrupt, // a dangling link inside dst
	}, {
		name:    "through a magic link",
		ents:    func(string) [][]ent { return [][]ent{{symlink("p", "/proc/self/root"), file("p/etc/"+hostName, "x")}} },
		wantErr: ErrCorrupt, // /proc is not inside dst: a dangling link
	}, {
		name: "replacing a symlink to outside with a file",
		ents: func(tmp string) [][]ent {
			return [][]ent{{symlink("f", filepath.Join(tmp, "sentinel"))}, {file("f", "overwritten")}}
		},
		inside: []string{"f"},
	}, {
		name: "replacing a symlink to an outside directory with a directory",
		ents: func(tmp string) [][]ent {
			return [][]ent{{symlink("d", filepath.Join(tmp, "outside"))}, {{name: "d", typ: tar.TypeDir, mode: 0o777}, file("d/f", "x")}}
		},
		inside: []string{"d/f"},
	}, {
		name:    "hard link to the host's /etc/passwd",
		ents:    func(string) [][]ent { return [][]ent{{hardlink("passwd", "/etc/passwd")}} },
		wantErr: ErrCorrupt, // no etc/passwd inside dst
	}, {
		name:    "hard link climbing out",
		ents:    func(string) [][]ent { return [][]ent{{hardlink("s", "../sentinel")}} },
		wantErr: ErrUnsafe,
	}, {
		name: "hard link through a symlink to outside",
		ents: func(tmp string) [][]ent {
			return [][]ent{{symlink("up", tmp), hardlink("s", "up/sentinel")}}
		},
		wantErr: ErrCorrupt,
	}, {
		name: "hard link through a symlink to ..",
		ents: func(string) [][]ent {
			return [][]ent{{file("f", "mine"), symlink("up", ".."), hardlink("s", "up/f")}}
		},
		inside: []string{"s"},
	}, {
		name: "hard link to a symlink to outside, then written",
		ents: func(tmp string) [][]ent {
			return [][]ent{{symlink("l", filepath.Join(tmp, "sentinel")), hardlink("h", "l"), file("h", "x")}}
		},
		inside:  []string{"h", "l"},
		wantErr: nil,
	}, {
		name:    "whiteout of ..",
		ents:    func(string) [][]ent { return [][]ent{{dir("a"), file("a/.wh...", "")}} },
		wantErr: ErrUnsafe,
	}, {
		name:   "whiteout through a symlink to outside",
		ents:   func(tmp string) [][]ent { return [][]ent{{symlink("up", tmp)}, {file("up/.wh.sentinel", "")}} },
		inside: []string{"up"},
	}, {
		name:   "whiteout through a symlink to ..",
		ents:   func(string) [][]ent { return [][]ent{{symlink("up", "../..")}, {file("up/.wh.sentinel", "")}} },
		inside: []string{"up"},
	}, {
		name:   "opaque directory through a symlink to outside",
		ents:   func(tmp string) [][]ent { return [][]ent{{symlink("up", tmp)}, {file("up/.wh..wh..opq", "")}} },
		inside: []string{"up"},
	}, {
		name: "opaque directory through a symlink to ..",
		ents: func(string) [][]ent {
			return [][]ent{{file("keep", "k"), symlink("up", "..")}, {file("up/.wh..wh..opq", "")}}
		},
		inside: []string{}, // the root is opaque: keep and up go, nothing outside does
	}, {
		name:    "the root as a file",
		ents:    func(string) [][]ent { return [][]ent{{file(".", "x")}} },
		wantErr: ErrUnsafe,
	}, {
		name:    "the root as a symlink",
		ents:    func(tmp string) [][]ent { return [][]ent{{symlink("/", tmp)}} },
		wantErr: ErrUnsafe,
	}, {
		name:    "unsupported entry type",
		ents:    func(string) [][]ent { return [][]ent{{{name: "x", typ: 'Z'}}} },
		wantErr: ErrUnsafe,
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tmp, dst := sandbox(t)
			before := snapshot(t, tmp)
			img := hostImage(t, tc.ents(tmp)...)
			_, err := Unpack(context.Background(), img, dst)
			switch {
			case tc.wantErr == nil && err != nil:
				t.Errorf("Unpack: %v, want it applied inside dst", err)
			case tc.wantErr != nil && !errors.Is(err, tc.wantErr):
				t.Errorf("Unpack: %v, want %v", err, tc.wantErr)
			}
			checkConfined(t, tmp, before, "/etc/"+hostName)
			for _, p := range tc.inside {
				if _, err := os.Lstat(filepath.Join(dst, p)); err != nil {
					t.Errorf("%s missing inside dst: %v", p, err)
				}
			}
		})
	}
}

// ustarBlock is a USTAR header block; archive/tar's Writer cannot write
// the sparse headers the tests need.
func ustarBlock(name string, typ byte, size int64) []byte {
	b := make([]byte, 512)
	copy(b[0:], name)
	copy(b[100:], "0000644\x00")
	copy(b[108:], "0000000\x00")
	copy(b[116:], "0000000\x00")
	copy(b[124:], fmt.Sprintf("%011o\x00", size))
	copy(b[136:], "00000000000\x00")
	b[156] = typ
	copy(b[257:], "ustar\x0000")
	copy(b[148:], "        ")
	sum := 0
	for _, c := range b {
		sum += int(c)
	}
	copy(b[148:], fmt.Sprintf("%06o\x00 ", sum))
	return b
}

// padded is b padded with zeros to whole 512-byte blocks.
func padded(b []byte) []byte {
	return append(b, make([]byte, (512-len(b)%512)%512)...)
}

// sparseTar is a PAX (GNU 1.0) sparse file "big" declaring size bytes, all
// a hole: a kilobyte of layer that archive/tar would expand.
func sparseTar(size int64) []byte {
	var pax []byte
	for _, kv := range [][2]string{{"GNU.sparse.major", "1"}, {"GNU.sparse.minor", "0"}, {"GNU.sparse.name", "big"}, {"GNU.sparse.realsize", strconv.FormatInt(size, 10)}} {
		rec := " " + kv[0] + "=" + kv[1] + "\n"
		n := len(rec) + 1 // the record's length counts its own digits
		for len(strconv.Itoa(n))+len(rec) != n {
			n = len(strconv.Itoa(n)) + len(rec)
		}
		pax = append(pax, strconv.Itoa(n)+rec...)
	}
	sparseMap := padded([]byte("1\n0\n0\n")) // one data block: offset 0, 0 bytes
	var out []byte
	out = append(out, ustarBlock("PaxHeaders/big", tar.TypeXHeader, int64(len(pax)))...)
	out = append(out, padded(pax)...)
	out = append(out, ustarBlock("GNUSparseFile.0/big", tar.TypeReg, int64(len(sparseMap)))...)
	out = append(out, sparseMap...)
	return append(out, make([]byte, 1024)...)
}

// TestSparseRefused: a sparse entry would make archive/tar write its holes
// out as zeros, as many as the header claims.
func TestSparseRefused(t *testing.T) {
	_, dst := sandbox(t)
	root, err := openRoot(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(root)
	err = applyTar(context.Background(), root, bytes.NewReader(sparseTar(64<<20)))
	if !errors.Is(err, ErrUnsafe) {
		t.Fatalf("applyTar of a sparse file: %v, want ErrUnsafe", err)
	}
	if _, err := os.Lstat(filepath.Join(dst, "big")); err == nil {
		t.Error("the sparse file was written")
	}
}
