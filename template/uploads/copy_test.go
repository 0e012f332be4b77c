package uploads

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
)

// tree lists a directory as "path mode [-> target | =body]" lines, sorted.
func tree(t testing.TB, root string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		fi, _ := d.Info()
		line := rel + " " + fi.Mode().String()
		switch {
		case fi.Mode()&fs.ModeSymlink != 0:
			l, _ := os.Readlink(p)
			line += " -> " + l
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			line += " =" + string(b)
		}
		out = append(out, line)
		return nil
	})
	sort.Strings(out)
	return out
}

func self() (int, int) { return os.Geteuid(), os.Getegid() }

func TestCopyInto(t *testing.T) {
	uid, gid := self()
	for _, tc := range []struct {
		name    string
		prep    func(root string) // the root filesystem before the copy
		tar     []ent
		src     string
		dest    string
		mode    uint32
		want    []string
		wantErr string
	}{
		{
			name: "file to a new path",
			tar:  []ent{file("a.txt", "A")},
			src:  "a.txt", dest: "/app/b.txt",
			want: []string{"app drwxr-xr-x", "app/b.txt -rw-r--r-- =A"},
		},
		{
			name: "file to a path ending in slash",
			tar:  []ent{file("a.txt", "A")},
			src:  "./a.txt", dest: "/app/",
			want: []string{"app drwxr-xr-x", "app/a.txt -rw-r--r-- =A"},
		},
		{
			name: "file into an existing directory",
			prep: func(r string) { os.MkdirAll(r+"/app", 0o700) },
			tar:  []ent{file("a.txt", "A")},
			src:  "a.txt", dest: "/app",
			want: []string{"app drwx------", "app/a.txt -rw-r--r-- =A"},
		},
		{
			name: "nested file, parents of the item are not copied",
			tar:  []ent{dir("x/"), dir("x/y/"), file("x/y/c.txt", "C")},
			src:  "x/y/c.txt", dest: "/c.txt",
			want: []string{"c.txt -rw-r--r-- =C"},
		},
		{
			name: "directory contents merge into dest",
			prep: func(r string) {
				os.MkdirAll(r+"/srv/keep", 0o755)
				os.WriteFile(r+"/srv/old", []byte("O"), 0o644)
				os.WriteFile(r+"/srv/a", []byte("replaced"), 0o644)
			},
			tar: []ent{dir("d/"), file("d/a", "A"), dir("d/keep/"), file("d/keep/k", "K"), dir("d/sub/"), {name: "d/sub/run", body: "#!", typ: '0', mode: 0o4755}},
			src: "d", dest: "/srv",
			want: []string{"srv drwxr-xr-x", "srv/a -rw-r--r-- =A", "srv/keep drwxr-xr-x", "srv/keep/k -rw-r--r-- =K", "srv/old -rw-r--r-- =O", "srv/sub drwxr-xr-x", "srv/sub/run urwxr-xr-x =#!"},
		},
		{
			name: "glob in the first element copies the matches into dest",
			tar:  []ent{file("a.txt", "A"), file("b.txt", "B")},
			src:  "*.txt", dest: "/t",
			want: []string{"t drwxr-xr-x", "t/a.txt -rw-r--r-- =A", "t/b.txt -rw-r--r-- =B"},
		},
		{
			name: "glob under a directory copies from that directory",
			tar:  []ent{file("src/a.go", "A"), file("src/b.go", "B")},
			src:  "src/*.go", dest: "/t",
			want: []string{"t drwxr-xr-x", "t/a.go -rw-r--r-- =A", "t/b.go -rw-r--r-- =B"},
		},
		{
			name: "mode override applies to files and directories",
			tar:  []ent{dir("d/"), file("d/f", "F"), dir("d/s/")},
			src:  "d", dest: "/o", mode: 0o750,
			want: []string{"o drwxr-xr-x", "o/f -rwxr-x--- =F", "o/s drwxr-x---"},
		},
		{
			name: "symlinks are copied as links and hard links as links",
			tar:  []ent{dir("d/"), file("d/f", "F"), symlink("d/l", "/etc/shadow"), hardlink("d/h", "d/f")},
			src:  "d", dest: "/o",
			want: []string{"o drwxr-xr-x", "o/f -rw-r--r-- =F", "o/h -rw-r--r-- =F", "o/l Lrwxrwxrwx -> /etc/shadow"},
		},
		{
			name: "an existing symlink at a copied path is replaced, not followed",
			prep: func(r string) {
				os.MkdirAll(r+"/o", 0o755)
				os.Symlink("/etc/passwd", r+"/o/f")
			},
			tar: []ent{dir("d/"), file("d/f", "F")},
			src: "d", dest: "/o",
			want: []string{"o drwxr-xr-x", "o/f -rw-r--r-- =F"},
		},
		{
			name: "a symlinked dest directory resolves inside the root",
			prep: func(r string) {
				os.MkdirAll(r+"/real", 0o755)
				os.Symlink("../../../../real", r+"/app")
			},
			tar: []ent{file("a", "A")},
			src: "a", dest: "/app/",
			want: []string{"app Lrwxrwxrwx -> ../../../../real", "real drwxr-xr-x", "real/a -rw-r--r-- =A"},
		},
		{
			name: "source missing from the upload",
			tar:  []ent{file("a", "A")},
			src:  "b", dest: "/x",
			wantErr: "not in the uploaded files",
		},
		{
			name: "file over an existing directory",
			prep: func(r string) { os.MkdirAll(r+"/x/a", 0o755) },
			tar:  []ent{dir("d/"), file("d/a", "A")},
			src:  "d", dest: "/x",
			wantErr: "over the directory",
		},
		{
			name: "hard link to something not copied",
			tar:  []ent{file("a", "A"), dir("d/"), hardlink("d/h", "a")},
			src:  "d", dest: "/x",
			wantErr: "not a file copied before it",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			if tc.prep != nil {
				tc.prep(root)
			}
			err := CopyInto(root, bytes.NewReader(tarOf(t, true, tc.tar...)), CopyOptions{
				Src: tc.src, Dest: tc.dest, UID: uid, GID: gid, Mode: tc.mode, SetMode: tc.mode != 0,
			})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := tree(t, root)
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Fatalf("root holds\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestCopyIntoOwnerAndTimes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
	root := t.TempDir()
	err := CopyInto(root, bytes.NewReader(tarOf(t, false, dir("d/"), file("d/f", "F"), symlink("d/l", "f"), dir("d/s/"))),
		CopyOptions{Src: "d", Dest: "/o", UID: 1234, GID: 5678})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"o/f", "o/l", "o/s"} {
		fi, err := os.Lstat(filepath.Join(root, p))
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if st.Uid != 1234 || st.Gid != 5678 {
			t.Errorf("%s owned by %d:%d", p, st.Uid, st.Gid)
		}
		if p != "o/l" && !fi.ModTime().Equal(mtime) {
			t.Errorf("%s mtime %v, want %v", p, fi.ModTime(), mtime)
		}
	}
	// The destination made for the copy belongs to root.
	fi, _ := os.Stat(filepath.Join(root, "o"))
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 0 {
		t.Errorf("dest owned by %d", st.Uid)
	}
}

// TestCopyIntoStaysInRoot feeds tars built to climb out of the root: through
// a symlink in the tar, a symlink in the root, absolute links and "..".
// Nothing outside the root may change.
func TestCopyIntoStaysInRoot(t *testing.T) {
	uid, gid := self()
	for _, tc := range []struct {
		name string
		prep func(root, outside string)
		tar  []ent
		src  string
		dest string
	}{
		{"symlink in tar then write through it", nil,
			[]ent{dir("d/"), symlink("d/l", "../../outside"), file("d/l/pwned", "X")}, "d", "/o"},
		{"absolute symlink in tar then write through it", nil,
			[]ent{dir("d/"), symlink("d/l", "/"), dir("d/l/x/"), file("d/l/x/pwned", "X")}, "d", "/o"},
		{"root symlink to outside as dest", func(root, outside string) { os.Symlink(outside, root+"/app") },
			[]ent{file("a", "X")}, "a", "/app/pwned"},
		{"root symlink with dot-dots as dest parent", func(root, _ string) { os.Symlink("../outside", root+"/app") },
			[]ent{dir("d/"), file("d/pwned", "X")}, "d", "/app/sub"},
		{"dest with dot-dots", nil,
			[]ent{file("a", "X")}, "a", "/../../outside/pwned"},
		{"hard link to outside", nil,
			[]ent{dir("d/"), hardlink("d/h", "../outside/keep")}, "d", "/o"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent := t.TempDir()
			root, outside := filepath.Join(parent, "root"), filepath.Join(parent, "outside")
			os.Mkdir(root, 0o755)
			os.Mkdir(outside, 0o755)
			os.WriteFile(filepath.Join(outside, "keep"), []byte("K"), 0o644)
			if tc.prep != nil {
				tc.prep(root, outside)
			}
			before := tree(t, outside)
			err := CopyInto(root, bytes.NewReader(tarOf(t, false, tc.tar...)), CopyOptions{Src: tc.src, Dest: tc.dest, UID: uid, GID: gid})
			t.Logf("CopyInto: %v", err)
			if after := tree(t, outside); strings.Join(after, "\n") != strings.Join(before, "\n") {
				t.Fatalf("outside changed:\n%s", strings.Join(after, "\n"))
			}
			entries, _ := os.ReadDir(parent)
			if len(entries) != 2 {
				t.Fatalf("parent holds %v", entries)
			}
		})
	}
}

func TestLookupOwner(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(root+"/etc", 0o755)
	os.WriteFile(root+"/etc/passwd", []byte("root:x:0:0:root:/root:/bin/bash\n# comment\nuser:x:1000:1000::/home/user:/bin/bash\n1001:x:1002:1003::/odd:/bin/sh\n"), 0o644)
	os.WriteFile(root+"/etc/group", []byte("root:x:0:\nuser:x:1000:\nstaff:x:50:user\n"), 0o644)
	for _, tc := range []struct {
		spec string
		want Owner
		err  bool
	}{
		{spec: "root", want: Owner{0, 0, "/root"}},
		{spec: "user", want: Owner{1000, 1000, "/home/user"}},
		{spec: "user:staff", want: Owner{1000, 50, "/home/user"}},
		{spec: "user:7", want: Owner{1000, 7, "/home/user"}},
		{spec: "1000", want: Owner{1000, 1000, "/home/user"}},
		{spec: "1001", want: Owner{1002, 1003, "/odd"}}, // a name match wins over a uid match
		{spec: "4242:4343", want: Owner{4242, 4343, "/"}},
		{spec: "nobody", err: true},
		{spec: "user:nogroup", err: true},
		{spec: "user:", err: true},
		{spec: ":x", err: true},
	} {
		got, err := LookupOwner(root, tc.spec)
		if tc.err {
			if !errors.Is(err, ErrNoUser) {
				t.Errorf("LookupOwner(%q) = %+v, %v; want ErrNoUser", tc.spec, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("LookupOwner(%q) = %+v, %v; want %+v", tc.spec, got, err, tc.want)
		}
	}
	// /etc/passwd as a symlink out of the root is read inside the root.
	root2 := t.TempDir()
	os.MkdirAll(root2+"/etc", 0o755)
	host := filepath.Join(t.TempDir(), "passwd")
	os.WriteFile(host, []byte("root:x:0:0:root:/root:/bin/bash\n"), 0o644)
	os.Symlink(host, root2+"/etc/passwd")
	if _, err := LookupOwner(root2, "root"); !errors.Is(err, ErrNoUser) {
		t.Errorf("read the host's /etc/passwd through a symlink: %v", err)
	}
}

// FuzzCopyInto: whatever the tar, src and dest, CopyInto does not panic
// and changes nothing outside the root.
func FuzzCopyInto(f *testing.F) {
	f.Add(tarOf(f, false, dir("d/"), symlink("d/l", "../../outside"), file("d/l/pwned", "X")), "d", "/o")
	f.Add(tarOf(f, true, file("a", "A"), hardlink("b", "a")), "*", "/x/")
	f.Add(tarOf(f, false, symlink("a", "/"), file("a/b", "B")), "a", "/")
	f.Add(tarOf(f, false, dir("a/"), file("a/../../z", "Z")), "a", "/q")
	uid, gid := self()
	f.Fuzz(func(t *testing.T, data []byte, src, dest string) {
		parent := t.TempDir()
		root, outside := filepath.Join(parent, "root"), filepath.Join(parent, "outside")
		os.Mkdir(root, 0o755)
		os.Mkdir(outside, 0o755)
		os.WriteFile(filepath.Join(outside, "keep"), []byte("K"), 0o644)
		os.Symlink(outside, filepath.Join(root, "escape"))
		err := CopyInto(root, bytes.NewReader(data), CopyOptions{Src: src, Dest: "/" + dest, UID: uid, GID: gid,
			Limits: Limits{MaxExpandedBytes: 1 << 20, MaxEntries: 1000}})
		_ = err
		if got := tree(t, outside); strings.Join(got, "\n") != "keep -rw-r--r-- =K" {
			t.Fatalf("outside changed: %v", got)
		}
		if entries, _ := os.ReadDir(parent); len(entries) != 2 {
			t.Fatalf("parent holds %v", entries)
		}
	})
}

// FuzzCopyIntoEntries builds tars from fuzz bytes out of names, links and
// types chosen to collide and climb (.., absolute links, links through
// links), so the fuzzer reaches deep into CopyInto rather than failing the
// tar header checks: nothing outside the root may change.
func FuzzCopyIntoEntries(f *testing.F) {
	f.Add([]byte{2, 0, 5, 0, 1, 9, 0, 0}, uint8(0))
	f.Add([]byte{1, 3, 0, 0, 2, 4, 6, 0, 0, 7, 0, 1}, uint8(1))
	segs := []string{"a", "b", "l", "..", ".", "a/b", "l/x", "c.txt"}
	links := []string{"/", "..", "../..", "../outside", "/escape", "a", "l", "/etc", "b/../../.."}
	uid, gid := self()
	f.Fuzz(func(t *testing.T, prog []byte, srcSel uint8) {
		var ents []ent
		for i := 0; i+2 < len(prog) && len(ents) < 32; i += 3 {
			name := segs[int(prog[i+1])%len(segs)]
			if prog[i+2]&1 == 1 {
				name = "d/" + name
			}
			link := links[int(prog[i+2]>>1)%len(links)]
			switch prog[i] % 4 {
			case 0:
				ents = append(ents, file(name, "F"))
			case 1:
				ents = append(ents, dir(name))
			case 2:
				ents = append(ents, symlink(name, link))
			case 3:
				ents = append(ents, hardlink(name, segs[int(prog[i+2])%len(segs)]))
			}
		}
		if len(ents) == 0 {
			return
		}
		src := []string{"d", "a", "*", ".", "l", "d/l"}[int(srcSel)%6]
		dest := []string{"/o", "/o/", "/escape/x", "/", "/l"}[int(srcSel/6)%5]
		data := bytes.NewReader(tarOf(t, false, ents...))
		parent := t.TempDir()
		root, outside := filepath.Join(parent, "root"), filepath.Join(parent, "outside")
		os.Mkdir(root, 0o755)
		os.Mkdir(outside, 0o755)
		os.WriteFile(filepath.Join(outside, "keep"), []byte("K"), 0o644)
		os.Symlink(outside, filepath.Join(root, "escape"))
		_ = CopyInto(root, data, CopyOptions{Src: src, Dest: dest, UID: uid, GID: gid})
		if got := tree(t, outside); strings.Join(got, "\n") != "keep -rw-r--r-- =K" {
			t.Fatalf("outside changed: %v", got)
		}
		if entries, _ := os.ReadDir(parent); len(entries) != 2 {
			t.Fatalf("parent holds %v", entries)
		}
	})
}
