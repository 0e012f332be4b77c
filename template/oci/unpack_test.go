package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
)

// capNetRaw is a security.capability value (struct vfs_cap_data, revision
// 2, linux/capability.h) granting cap_net_raw, effective: what Debian's
// ping carries.
func capNetRaw() string {
	b := make([]byte, 20)
	binary.LittleEndian.PutUint32(b[0:], 0x02000000|0x1) // VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
	binary.LittleEndian.PutUint32(b[4:], 1<<13)          // permitted: CAP_NET_RAW
	return string(b)
}

func lstat(t *testing.T, p string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatalf("lstat: %v", err)
	}
	return st
}

func exists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func getxattr(t *testing.T, p, attr string) string {
	t.Helper()
	buf := make([]byte, 256)
	n, err := unix.Lgetxattr(p, attr, buf)
	if err != nil {
		t.Fatalf("getxattr %s %s: %v", p, attr, err)
	}
	return string(buf[:n])
}

// TestUnpackLayers applies images the test builds and checks the tree as
// an overlay of their layers would show it.
func TestUnpackLayers(t *testing.T) {
	cases := []struct {
		name   string
		root   bool // needs root (chown to others, security.* xattrs)
		mknod  bool // needs CAP_MKNOD
		zstd   bool // layers compressed with zstd
		layers [][]ent
		check  func(t *testing.T, root string)
	}{{
		name:   "file content, mode and mtime",
		layers: [][]ent{{dir("etc"), {name: "etc/motd", typ: tar.TypeReg, body: "hello", mode: 0o640}}},
		check: func(t *testing.T, root string) {
			if got := readFile(t, root+"/etc/motd"); got != "hello" {
				t.Errorf("content %q", got)
			}
			st := lstat(t, root+"/etc/motd")
			if st.Mode&0o7777 != 0o640 {
				t.Errorf("mode %#o, want 0640", st.Mode&0o7777)
			}
			if got := time.Unix(st.Mtim.Unix()); !got.Equal(testTime) {
				t.Errorf("mtime %v, want %v", got, testTime)
			}
		},
	}, {
		name: "directory mtime kept although entries follow",
		layers: [][]ent{{
			{name: "d", typ: tar.TypeDir, mtime: time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)},
			file("d/a", "a"), file("d/b", "b"),
		}},
		check: func(t *testing.T, root string) {
			st := lstat(t, root+"/d")
			if got := time.Unix(st.Mtim.Unix()).UTC(); got.Year() != 2001 {
				t.Errorf("directory mtime %v, want 2001", got)
			}
		},
	}, {
		name:   "zstd layers",
		zstd:   true,
		layers: [][]ent{{file("a", "one")}, {file("b", "two")}},
		check: func(t *testing.T, root string) {
			if readFile(t, root+"/a")+readFile(t, root+"/b") != "onetwo" {
				t.Error("content differs")
			}
		},
	}, {
		name:   "parents without entries are made 0755",
		layers: [][]ent{{file("x/y/z", "deep")}},
		check: func(t *testing.T, root string) {
			if readFile(t, root+"/x/y/z") != "deep" {
				t.Error("content differs")
			}
			if st := lstat(t, root+"/x/y"); st.Mode&0o7777 != 0o755 {
				t.Errorf("parent mode %#o", st.Mode&0o7777)
			}
		},
	}, {
		name:   "upper file replaces lower",
		layers: [][]ent{{file("f", "old")}, {file("f", "new")}},
		check: func(t *testing.T, root string) {
			if got := readFile(t, root+"/f"); got != "new" {
				t.Errorf("content %q", got)
			}
		},
	}, {
		name:   "whiteout of a file",
		layers: [][]ent{{dir("a"), file("a/f", "f"), file("a/g", "g")}, {file("a/.wh.f", "")}},
		check: func(t *testing.T, root string) {
			if exists(root + "/a/f") {
				t.Error("a/f survived its whiteout")
			}
			if exists(root + "/a/.wh.f") {
				t.Error("the whiteout file itself was written")
			}
			if !exists(root + "/a/g") {
				t.Error("a/g was removed")
			}
		},
	}, {
		name:   "whiteout of a directory tree",
		layers: [][]ent{{dir("a"), dir("a/b"), file("a/b/c", "c")}, {file(".wh.a", "")}},
		check: func(t *testing.T, root string) {
			if exists(root + "/a") {
				t.Error("a survived its whiteout")
			}
		},
	}, {
		name:   "whiteout spares its own layer's file",
		layers: [][]ent{{file("f", "lower")}, {file("f", "upper"), file(".wh.f", "")}},
		check: func(t *testing.T, root string) {
			if got := readFile(t, root+"/f"); got != "upper" {
				t.Errorf("content %q", got)
			}
		},
	}, {
		name: "opaque directory",
		layers: [][]ent{
			{dir("d"), file("d/x", "x"), dir("d/sub"), file("d/sub/y", "y"), file("keep", "k")},
			{dir("d"), file("d/.wh..wh..opq", ""), file("d/new", "n"), file("d/sub/z", "z")},
		},
		check: func(t *testing.T, root string) {
			for _, gone := range []string{"d/x", "d/sub/y", "d/.wh..wh..opq"} {
				if exists(root + "/" + gone) {
					t.Errorf("%s survived the opaque directory", gone)
				}
			}
			for _, kept := range []string{"d/new", "d/sub/z", "keep"} {
				if !exists(root + "/" + kept) {
					t.Errorf("%s is missing", kept)
				}
			}
		},
	}, {
		name: "opaque marker after the directory's new entries",
		layers: [][]ent{
			{dir("d"), file("d/x", "x")},
			{dir("d"), file("d/new", "n"), file("d/.wh..wh..opq", "")},
		},
		check: func(t *testing.T, root string) {
			if exists(root+"/d/x") || !exists(root+"/d/new") {
				t.Error("want d/new only")
			}
		},
	}, {
		name: "hard links in one layer and across layers",
		layers: [][]ent{
			{dir("bin"), {name: "bin/busybox", typ: tar.TypeReg, body: "bb", mode: 0o755}, hardlink("bin/sh", "bin/busybox")},
			{hardlink("bin/ls", "/bin/busybox")},
		},
		check: func(t *testing.T, root string) {
			a, b, c := lstat(t, root+"/bin/busybox"), lstat(t, root+"/bin/sh"), lstat(t, root+"/bin/ls")
			if a.Ino != b.Ino || a.Ino != c.Ino || a.Nlink != 3 {
				t.Errorf("inodes %d %d %d, nlink %d: want one inode, three links", a.Ino, b.Ino, c.Ino, a.Nlink)
			}
		},
	}, {
		name:   "symbolic links kept verbatim",
		layers: [][]ent{{symlink("rel", "usr/lib"), symlink("abs", "/etc/passwd"), symlink("dangling", "../../nowhere")}},
		check: func(t *testing.T, root string) {
			for n, want := range map[string]string{"rel": "usr/lib", "abs": "/etc/passwd", "dangling": "../../nowhere"} {
				if got, err := os.Readlink(root + "/" + n); err != nil || got != want {
					t.Errorf("%s -> %q (%v), want %q", n, got, err, want)
				}
			}
		},
	}, {
		name:   "directory replaces a lower symlink",
		layers: [][]ent{{symlink("d", "/tmp")}, {dir("d"), file("d/f", "f")}},
		check: func(t *testing.T, root string) {
			if st := lstat(t, root+"/d"); st.Mode&unix.S_IFMT != unix.S_IFDIR {
				t.Errorf("d is %#o, want a directory", st.Mode&unix.S_IFMT)
			}
		},
	}, {
		name:   "file replaces a lower directory",
		layers: [][]ent{{dir("d"), file("d/f", "f")}, {file("d", "now a file")}},
		check: func(t *testing.T, root string) {
			if readFile(t, root+"/d") != "now a file" {
				t.Error("d is not the file")
			}
		},
	}, {
		name: "setuid, setgid and sticky bits",
		layers: [][]ent{{
			dir("usr"), dir("usr/bin"),
			{name: "usr/bin/su", typ: tar.TypeReg, body: "su", mode: 0o4755},
			{name: "usr/bin/wall", typ: tar.TypeReg, body: "w", mode: 0o2755},
			{name: "tmp", typ: tar.TypeDir, mode: 0o1777},
		}},
		check: func(t *testing.T, root string) {
			for p, want := range map[string]uint32{"usr/bin/su": 0o4755, "usr/bin/wall": 0o2755, "tmp": 0o1777} {
				if got := lstat(t, root+"/"+p).Mode & 0o7777; got != want {
					t.Errorf("%s mode %#o, want %#o", p, got, want)
				}
			}
		},
	}, {
		name: "root-owned setuid binary keeps its bit after chown",
		root: true,
		layers: [][]ent{{
			{name: "su", typ: tar.TypeReg, body: "su", mode: 0o4755, owned: true, uid: 0, gid: 0},
			{name: "sudo", typ: tar.TypeReg, body: "sudo", mode: 0o4711, owned: true, uid: 0, gid: 42},
		}},
		check: func(t *testing.T, root string) {
			if st := lstat(t, root+"/su"); st.Mode&0o7777 != 0o4755 || st.Uid != 0 {
				t.Errorf("su mode %#o uid %d", st.Mode&0o7777, st.Uid)
			}
			if st := lstat(t, root+"/sudo"); st.Mode&0o7777 != 0o4711 || st.Gid != 42 {
				t.Errorf("sudo mode %#o gid %d", st.Mode&0o7777, st.Gid)
			}
		},
	}, {
		name: "ownership as numbers in the tar",
		root: true,
		layers: [][]ent{{
			{name: "home", typ: tar.TypeDir, owned: true},
			{name: "home/user", typ: tar.TypeDir, mode: 0o700, owned: true, uid: 1000, gid: 1000},
			{name: "home/user/f", typ: tar.TypeReg, body: "f", owned: true, uid: 1234, gid: 5678},
			{name: "home/user/l", typ: tar.TypeSymlink, link: "f", owned: true, uid: 4321, gid: 8765},
		}},
		check: func(t *testing.T, root string) {
			for p, want := range map[string][2]uint32{"home": {0, 0}, "home/user": {1000, 1000}, "home/user/f": {1234, 5678}, "home/user/l": {4321, 8765}} {
				if st := lstat(t, root+"/"+p); st.Uid != want[0] || st.Gid != want[1] {
					t.Errorf("%s owned %d:%d, want %d:%d", p, st.Uid, st.Gid, want[0], want[1])
				}
			}
		},
	}, {
		name:   "user xattr",
		layers: [][]ent{{{name: "f", typ: tar.TypeReg, body: "x", xattrs: map[string]string{"user.cubicle": "yes", "user.empty": ""}}}},
		check: func(t *testing.T, root string) {
			if got := getxattr(t, root+"/f", "user.cubicle"); got != "yes" {
				t.Errorf("user.cubicle = %q", got)
			}
		},
	}, {
		name: "security.capability survives chown",
		root: true,
		layers: [][]ent{{{name: "ping", typ: tar.TypeReg, body: "ping", mode: 0o755, owned: true, uid: 0, gid: 0,
			xattrs: map[string]string{"security.capability": capNetRaw()}}}},
		check: func(t *testing.T, root string) {
			if got := getxattr(t, root+"/ping", "security.capability"); got != capNetRaw() {
				t.Errorf("security.capability = %x, want %x", got, capNetRaw())
			}
		},
	}, {
		name: "host-only xattrs dropped",
		root: true,
		layers: [][]ent{{{name: "d", typ: tar.TypeDir, owned: true, xattrs: map[string]string{
			"trusted.overlay.opaque": "y", "trusted.overlay.redirect": "/etc",
			"security.selinux": "system_u:object_r:bin_t:s0", "user.kept": "1",
		}}}},
		check: func(t *testing.T, root string) {
			if got := getxattr(t, root+"/d", "user.kept"); got != "1" {
				t.Errorf("user.kept = %q", got)
			}
			for _, attr := range []string{"trusted.overlay.opaque", "trusted.overlay.redirect"} {
				if _, err := unix.Lgetxattr(root+"/d", attr, make([]byte, 64)); !errors.Is(err, unix.ENODATA) {
					t.Errorf("%s: %v, want it dropped (ENODATA)", attr, err)
				}
			}
		},
	}, {
		name:   "fifo",
		layers: [][]ent{{{name: "pipe", typ: tar.TypeFifo, mode: 0o620}}},
		check: func(t *testing.T, root string) {
			if st := lstat(t, root+"/pipe"); st.Mode&unix.S_IFMT != unix.S_IFIFO || st.Mode&0o7777 != 0o620 {
				t.Errorf("pipe mode %#o", st.Mode)
			}
		},
	}, {
		name:   "device nodes",
		root:   true,
		mknod:  true,
		layers: [][]ent{{dir("dev"), {name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3, owned: true}, {name: "dev/loop9", typ: tar.TypeBlock, mode: 0o660, major: 7, minor: 9, owned: true, gid: 6}}},
		check: func(t *testing.T, root string) {
			st := lstat(t, root+"/dev/null")
			if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 3 || st.Mode&0o777 != 0o666 {
				t.Errorf("dev/null: mode %#o rdev %d:%d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
			}
			st = lstat(t, root+"/dev/loop9")
			if st.Mode&unix.S_IFMT != unix.S_IFBLK || unix.Major(st.Rdev) != 7 || unix.Minor(st.Rdev) != 9 || st.Gid != 6 {
				t.Errorf("dev/loop9: mode %#o rdev %d:%d gid %d", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev), st.Gid)
			}
		},
	}, {
		name:   "root entry sets the root's mode",
		layers: [][]ent{{{name: "./", typ: tar.TypeDir, mode: 0o750}, file("./f", "f")}},
		check: func(t *testing.T, root string) {
			if st := lstat(t, root); st.Mode&0o7777 != 0o750 {
				t.Errorf("root mode %#o", st.Mode&0o7777)
			}
		},
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root && os.Geteuid() != 0 {
				t.Skip("needs root: chown to other owners, security.* attributes")
			}
			if tc.mknod && !canMknod(t) {
				t.Skip("needs CAP_MKNOD to make device nodes")
			}
			comp := compression.GZip
			if tc.zstd {
				comp = compression.ZStd
			}
			var ls []v1.Layer
			for _, l := range tc.layers {
				ls = append(ls, layerOf(t, comp, l...))
			}
			img := imageOf(t, runtime.GOARCH, ls...)
			_, dst := sandbox(t)
			cfg, err := Unpack(context.Background(), img, dst)
			if err != nil {
				t.Fatalf("Unpack: %v", err)
			}
			if d, _ := img.Digest(); cfg.Digest != d.String() {
				t.Errorf("Config.Digest %s, want %s", cfg.Digest, d)
			}
			tc.check(t, dst)
		})
	}
}

// TestUnpackConfig checks what Unpack and ImageConfig take from the config.
func TestUnpackConfig(t *testing.T) {
	img := hostImage(t, []ent{file("f", "f")})
	cfg, err := ImageConfig(img)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Env, testConfig.Env) || cfg.WorkingDir != testConfig.WorkingDir || cfg.User != testConfig.User ||
		!slices.Equal(cfg.Entrypoint, testConfig.Entrypoint) || !slices.Equal(cfg.Cmd, testConfig.Cmd) {
		t.Errorf("Config %+v, want %+v", cfg, testConfig)
	}
}

// TestUnpackNeedsEmptyDir: Unpack never mixes an image into a tree that
// holds something already.
func TestUnpackNeedsEmptyDir(t *testing.T) {
	img := hostImage(t, []ent{file("f", "f")})
	_, dst := sandbox(t)
	if err := os.MkdirAll(filepath.Join(dst, "old"), 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := Unpack(context.Background(), img, dst); err == nil || !bytes.Contains([]byte(err.Error()), []byte("not empty")) {
		t.Fatalf("Unpack into a non-empty directory: %v, want an error saying so", err)
	}
}

// TestUnpackCancelled: a cancelled context stops Unpack.
func TestUnpackCancelled(t *testing.T) {
	img := hostImage(t, []ent{file("f", "f")})
	_, dst := sandbox(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Unpack(ctx, img, dst); !errors.Is(err, context.Canceled) {
		t.Fatalf("Unpack with a cancelled context: %v", err)
	}
}

// BenchmarkUnpack unpacks an image of two layers of 5000 small files each,
// the second replacing half of the first.
func BenchmarkUnpack(b *testing.B) {
	var l1, l2 []ent
	for i := range 5000 {
		d := fmt.Sprintf("usr/lib/d%02d", i%50)
		if i < 50 {
			l1 = append(l1, dir(d))
		}
		l1 = append(l1, file(fmt.Sprintf("%s/f%d", d, i), strings.Repeat("x", 512)))
		if i%2 == 0 {
			l2 = append(l2, file(fmt.Sprintf("%s/f%d", d, i), strings.Repeat("y", 512)))
		}
	}
	img := hostImage(b, append([]ent{dir("usr"), dir("usr/lib")}, l1...), l2)
	if _, err := img.RawManifest(); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		dst := filepath.Join(b.TempDir(), "dst")
		if _, err := Unpack(context.Background(), img, dst); err != nil {
			b.Fatal(err)
		}
	}
}
