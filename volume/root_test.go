package volume

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// setup makes a volume beside a secret file, with the escapes a sandbox
// could plant in it: symlinks out of it (absolute, relative, through ".."),
// a symlink to /proc's magic links, a FIFO.
func setup(t testing.TB) (r *Root, vol, secret string) {
	t.Helper()
	base := t.TempDir()
	d, err := Open(filepath.Join(base, "volumes"))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Create("v1"); err != nil {
		t.Fatal(err)
	}
	vol = d.Path("v1")
	secret = filepath.Join(base, "secret")
	must(t, os.WriteFile(secret, []byte("host secret"), 0o600))
	must(t, os.Mkdir(filepath.Join(vol, "sub"), 0o755))
	must(t, os.WriteFile(filepath.Join(vol, "sub", "f"), []byte("in volume"), 0o644))
	must(t, os.Symlink(secret, filepath.Join(vol, "abs")))
	must(t, os.Symlink("../../secret", filepath.Join(vol, "rel")))
	must(t, os.Symlink("../../..", filepath.Join(vol, "sub", "up")))
	must(t, os.Symlink(base, filepath.Join(vol, "dirlink")))
	must(t, os.Symlink("/proc/self/root"+secret, filepath.Join(vol, "magic")))
	must(t, unix.Mkfifo(filepath.Join(vol, "fifo"), 0o644))
	r, err = d.Root("v1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r, vol, secret
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestClean(t *testing.T) {
	for in, want := range map[string]string{
		"": "/", "/": "/", ".": "/", "..": "/", "../../etc": "/etc", "a/b/../c": "/a/c",
		"//a//b/": "/a/b", "/a/./b": "/a/b",
	} {
		if got, err := Clean(in); err != nil || got != want {
			t.Errorf("Clean(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := Clean("a\x00b"); !errors.Is(err, ErrInvalid) {
		t.Errorf("Clean with NUL: %v", err)
	}
}

func TestEscapesStayInside(t *testing.T) {
	r, vol, secret := setup(t)
	// Every path that would reach the secret on the host, resolved by
	// name, must not.
	for _, p := range []string{"abs", "rel", "sub/up/secret", "dirlink/secret", "magic", "../secret", "/../../secret"} {
		t.Run(p, func(t *testing.T) {
			if f, err := r.ReadFile(p); err == nil {
				b, _ := io.ReadAll(f)
				f.Close()
				if string(b) == "host secret" {
					t.Fatalf("ReadFile(%q) read the host's file", p)
				}
			}
			if _, err := r.WriteFile(p, strings.NewReader("overwritten"), false, Meta{}); err == nil {
				// Writing replaced the symlink inside the volume, or
				// made a file there: never the host's file.
				if b, _ := os.ReadFile(secret); string(b) != "host secret" {
					t.Fatalf("WriteFile(%q) wrote the host's file", p)
				}
			}
			mode := uint32(0o777)
			r.SetMeta(p, Meta{Mode: &mode})
			if fi, _ := os.Stat(secret); fi.Mode().Perm() != 0o600 {
				t.Fatalf("SetMeta(%q) changed the host file's mode to %v", p, fi.Mode())
			}
			r.Remove(p)
			if _, err := os.Stat(secret); err != nil {
				t.Fatalf("Remove(%q) removed the host's file: %v", p, err)
			}
		})
	}
	if _, err := os.Stat(vol); err != nil {
		t.Fatal(err)
	}
}

func TestOperations(t *testing.T) {
	r, vol, _ := setup(t)
	u := func(v uint32) *uint32 { return &v }

	// Stat describes a symlink, with its target, without following it.
	e, err := r.Stat("/abs")
	if err != nil || e.Type != "symlink" || e.Target == "" || e.Path != "/abs" || e.Name != "abs" {
		t.Fatalf("Stat(/abs) = %+v, %v", e, err)
	}
	if e, err := r.Stat("/"); err != nil || e.Type != "directory" || e.Mode != dirMode {
		t.Fatalf("Stat(/) = %+v, %v", e, err)
	}
	if _, err := r.Stat("/nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Stat(/nope) = %v", err)
	}

	// MakeDir: parents only with force; exists is an error without it.
	if _, err := r.MakeDir("/a/b", false, Meta{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("MakeDir without parents: %v", err)
	}
	e, err = r.MakeDir("/a/b", true, Meta{Mode: u(0o750), UID: u(1000), GID: u(1000)})
	if err != nil || e.Type != "directory" || e.Mode != 0o750 || e.UID != 1000 || e.Path != "/a/b" {
		t.Fatalf("MakeDir = %+v, %v", e, err)
	}
	if _, err := r.MakeDir("/a/b", false, Meta{}); !errors.Is(err, ErrExists) {
		t.Fatalf("MakeDir of an existing dir: %v", err)
	}
	if _, err := r.MakeDir("/a/b", true, Meta{}); err != nil {
		t.Fatalf("MakeDir -p of an existing dir: %v", err)
	}

	// WriteFile makes, replaces; parents with force only.
	if _, err := r.WriteFile("/x/y/z.txt", strings.NewReader("hi"), false, Meta{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("WriteFile without parents: %v", err)
	}
	e, err = r.WriteFile("/x/y/z.txt", strings.NewReader("hello"), true, Meta{})
	if err != nil || e.Type != "file" || e.Size != 5 || e.Mode != 0o644 || e.Path != "/x/y/z.txt" {
		t.Fatalf("WriteFile = %+v, %v", e, err)
	}
	if _, err := r.WriteFile("/x/y/z.txt", strings.NewReader("bye"), false, Meta{Mode: u(0o600)}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(vol, "x/y/z.txt")); string(b) != "bye" {
		t.Fatalf("after overwrite: %q", b)
	}
	if _, err := r.WriteFile("/sub", strings.NewReader("x"), false, Meta{}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("WriteFile over a directory: %v", err)
	}
	if _, err := r.WriteFile("/a", strings.NewReader("x"), false, Meta{Mode: u(0o10000)}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("WriteFile with a bad mode: %v", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(vol, "x/y")); len(ents) != 1 {
		t.Fatalf("upload left files behind: %v", ents)
	}

	// ReadFile: regular files only (a FIFO does not hang it).
	f, err := r.ReadFile("/x/../x/y/z.txt")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(f)
	f.Close()
	if string(b) != "bye" {
		t.Fatalf("ReadFile = %q", b)
	}
	for _, p := range []string{"/fifo", "/sub"} {
		if _, err := r.ReadFile(p); !errors.Is(err, ErrInvalid) {
			t.Fatalf("ReadFile(%s) = %v", p, err)
		}
	}

	// List, one level and two.
	ents, err := r.List("/", 1)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]string{}
	for _, e := range ents {
		names[e.Path] = e.Type
	}
	if names["/sub"] != "directory" || names["/abs"] != "symlink" || names["/fifo"] != "unknown" || names["/sub/f"] != "" {
		t.Fatalf("List(/, 1) = %v", names)
	}
	ents, err = r.List("/", 2)
	if err != nil {
		t.Fatal(err)
	}
	names = map[string]string{}
	for _, e := range ents {
		names[e.Path] = e.Type
	}
	// Symlinked directories are listed, never entered.
	if names["/sub/f"] != "file" || names["/sub/up"] != "symlink" || len(names) != len(ents) {
		t.Fatalf("List(/, 2) = %v", names)
	}
	if _, err := r.List("/x/y/z.txt", 1); !errors.Is(err, ErrInvalid) {
		t.Fatalf("List of a file: %v", err)
	}
	if _, err := r.List("/", 0); !errors.Is(err, ErrInvalid) {
		t.Fatalf("List depth 0: %v", err)
	}

	// SetMeta.
	e, err = r.SetMeta("/x/y/z.txt", Meta{Mode: u(0o640), UID: u(1000), GID: u(1001)})
	if err != nil || e.Mode != 0o640 || e.UID != 1000 || e.GID != 1001 {
		t.Fatalf("SetMeta = %+v, %v", e, err)
	}
	if _, err := r.SetMeta("/abs", Meta{Mode: u(0o644)}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("SetMeta mode of a symlink: %v", err)
	}

	// Remove: files, symlinks, whole trees; not the root.
	if err := r.Remove("/x"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(vol, "x")); !os.IsNotExist(err) {
		t.Fatalf("/x still there: %v", err)
	}
	if err := r.Remove("/x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Remove of a missing path: %v", err)
	}
	if err := r.Remove("/"); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Remove(/) = %v", err)
	}
	if err := r.Remove("/dirlink"); err != nil {
		t.Fatal(err)
	}
}

// FuzzPaths: whatever path a client sends, nothing outside the volume is
// read, written, changed or removed.
func FuzzPaths(f *testing.F) {
	for _, s := range []string{"", "/", "..", "abs", "rel", "sub/up", "sub/up/secret", "dirlink/secret",
		"magic", "../secret", "/../../secret", "sub/f", "fifo", "a\x00b", "sub/../../../secret", strings.Repeat("a/", 300)} {
		f.Add(s, uint8(0))
	}
	f.Fuzz(func(t *testing.T, p string, op uint8) {
		r, vol, secret := setup(t)
		inside := func(fd uintptr) {
			target, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(fd)))
			if err == nil && target != vol && !strings.HasPrefix(target, vol+"/") {
				t.Fatalf("%q opened %s, outside the volume %s", p, target, vol)
			}
		}
		mode := uint32(0o777)
		switch op % 6 {
		case 0:
			if f, err := r.ReadFile(p); err == nil {
				inside(f.Fd())
				f.Close()
			}
		case 1:
			r.WriteFile(p, strings.NewReader("x"), true, Meta{})
		case 2:
			r.MakeDir(p, true, Meta{})
		case 3:
			r.SetMeta(p, Meta{Mode: &mode})
		case 4:
			r.Remove(p)
		case 5:
			r.List(p, 3)
			r.Stat(p)
		}
		if b, err := os.ReadFile(secret); err != nil || string(b) != "host secret" {
			t.Fatalf("%q (op %d) touched the host's file: %q, %v", p, op%6, b, err)
		}
		if fi, _ := os.Stat(secret); fi.Mode().Perm() != 0o600 {
			t.Fatalf("%q (op %d) changed the host file's mode", p, op%6)
		}
		if _, err := os.Stat(vol); err != nil {
			t.Fatalf("%q (op %d) removed the volume: %v", p, op%6, err)
		}
		ents, _ := os.ReadDir(filepath.Dir(secret))
		for _, e := range ents {
			if e.Name() != "secret" && e.Name() != "volumes" {
				t.Fatalf("%q (op %d) made %s outside the volume", p, op%6, e.Name())
			}
		}
	})
}
