package uploads

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

func TestApplyCopy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to the template's users needs root")
	}
	newRoot := func(t *testing.T) string {
		root := t.TempDir()
		os.MkdirAll(root+"/etc", 0o755)
		os.MkdirAll(root+"/home/user", 0o755)
		os.WriteFile(root+"/etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\napp:x:1001:1002::/srv/app:/bin/sh\n"), 0o644)
		os.WriteFile(root+"/etc/group", []byte("root:x:0:\nuser:x:1000:\nstaff:x:50:\n"), 0o644)
		return root
	}
	hash := strings.Repeat("a", 64)
	env := []buildspec.EnvVar{{Name: "DIR", Value: "/opt/x"}, {Name: "OWNER", Value: "app"}}
	for _, tc := range []struct {
		name  string
		state buildspec.State
		args  []string
		path  string // where a.txt lands
		uid   uint32
		gid   uint32
		mode  os.FileMode
		err   string
	}{
		{name: "defaults: root, tar mode", args: []string{"a.txt", "/x/"}, path: "x/a.txt", uid: 0, gid: 0, mode: 0o644},
		{name: "current USER owns", state: buildspec.State{User: "user"}, args: []string{"a.txt", "/x/a.txt", "", ""}, path: "x/a.txt", uid: 1000, gid: 1000, mode: 0o644},
		{name: "owner and group, expanded dest, mode", state: buildspec.State{Env: env}, args: []string{"a.txt", "$DIR/", "$OWNER:staff", "4750"}, path: "opt/x/a.txt", uid: 1001, gid: 50, mode: 0o750 | os.ModeSetuid},
		{name: "relative dest against WORKDIR", state: buildspec.State{Workdir: "/w"}, args: []string{"a.txt", "sub/"}, path: "w/sub/a.txt", mode: 0o644},
		{name: "relative dest without WORKDIR goes to the user's home", state: buildspec.State{User: "user"}, args: []string{"a.txt", "./"}, path: "home/user/a.txt", uid: 1000, gid: 1000, mode: 0o644},
		{name: "relative WORKDIR under the home", state: buildspec.State{User: "app", Workdir: "proj"}, args: []string{"a.txt", "b.txt"}, path: "srv/app/proj/b.txt", uid: 1001, gid: 1002, mode: 0o644},
		{name: "unknown owner", args: []string{"a.txt", "/x/", "ghost"}, err: "no such user"},
		{name: "command substitution in dest", args: []string{"a.txt", "/$(id)"}, err: "command substitution"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := newRoot(t)
			st := buildspec.Step{Type: buildspec.Copy, Args: tc.args, FilesHash: hash}
			err := ApplyCopy(root, tc.state, st, bytes.NewReader(tarOf(t, true, file("a.txt", "A"))), Limits{})
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(filepath.Join(root, tc.path))
			if err != nil {
				t.Fatal(err)
			}
			sys := fi.Sys().(*syscall.Stat_t)
			if sys.Uid != tc.uid || sys.Gid != tc.gid || fi.Mode() != tc.mode {
				t.Errorf("%s: %d:%d %v, want %d:%d %v", tc.path, sys.Uid, sys.Gid, fi.Mode(), tc.uid, tc.gid, tc.mode)
			}
		})
	}
}
