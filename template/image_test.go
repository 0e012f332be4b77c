package template

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// needImageTools skips where mkfs.ext4 or debugfs is missing.
func needImageTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"mkfs.ext4", "debugfs", "e2fsck"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found (apt-get install e2fsprogs)", tool)
		}
	}
}

// fakeBinary writes a file standing in for the cubicle binary.
func fakeBinary(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cubicle")
	if err := os.WriteFile(p, []byte(content), 0o700); err != nil {
		t.Fatal(err)
	}
	return p
}

// eaList returns debugfs's listing of path's extended attributes.
func eaList(t *testing.T, image, path string) string {
	t.Helper()
	b, err := exec.Command("debugfs", "-R", "ea_list "+path, image).CombinedOutput()
	if err != nil {
		t.Fatalf("debugfs ea_list %s: %v: %s", path, err, b)
	}
	return string(b)
}

// TestBuildImagePreservesRootfs builds an image from a rootfs that has
// every kind of file metadata a Debian rootfs relies on and reads it back
// with debugfs: owners, modes with setuid/setgid/sticky bits, symlinks
// (short and long), hard links, device nodes, fifos and xattrs (file
// capabilities are xattrs: Debian's ping has one), plus what the image
// adds for cubicle init.
func TestBuildImagePreservesRootfs(t *testing.T) {
	needImageTools(t)
	if os.Geteuid() != 0 {
		t.Skip("making a rootfs with other owners, device nodes and trusted xattrs needs root")
	}
	root := filepath.Join(t.TempDir(), "rootfs")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	file := func(rel string, mode os.FileMode, uid, gid int) {
		p := filepath.Join(root, rel)
		must(os.MkdirAll(filepath.Dir(p), 0o755))
		must(os.WriteFile(p, []byte("content of "+rel), 0o600))
		must(os.Chown(p, uid, gid))
		must(os.Chmod(p, mode)) // after chown, which clears setuid
	}
	must(os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	file("etc/shadow", 0o640, 0, 42)
	file("home/user/notes", 0o600, 1000, 1000)
	file("usr/bin/sudo", 0o4755|os.ModeSetuid, 0, 0)
	file("usr/bin/wall", 0o2755|os.ModeSetgid, 0, 5)
	file("usr/bin/ping", 0o755, 0, 0)
	must(os.Chmod(filepath.Join(root, "usr/bin/sudo"), 0o755|os.ModeSetuid))
	must(os.Chmod(filepath.Join(root, "usr/bin/wall"), 0o755|os.ModeSetgid))
	must(os.MkdirAll(filepath.Join(root, "var/tmp"), 0o755))
	must(os.Chmod(filepath.Join(root, "var/tmp"), 0o777|os.ModeSticky))
	must(os.MkdirAll(filepath.Join(root, "srv/shared"), 0o755))
	must(os.Chown(filepath.Join(root, "srv/shared"), 1000, 50))
	must(os.Chmod(filepath.Join(root, "srv/shared"), 0o775|os.ModeSetgid))
	must(os.Symlink("../usr/bin/sudo", filepath.Join(root, "etc/short-link")))
	long := "/" + strings.Repeat("long-target-component/", 8) + "end"
	must(os.Symlink(long, filepath.Join(root, "etc/long-link")))
	must(os.Lchown(filepath.Join(root, "etc/short-link"), 1000, 1000))
	must(os.Link(filepath.Join(root, "usr/bin/ping"), filepath.Join(root, "usr/bin/ping4")))
	must(os.MkdirAll(filepath.Join(root, "dev"), 0o755))
	must(unix.Mknod(filepath.Join(root, "dev/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Mkfifo(filepath.Join(root, "etc/fifo"), 0o620))
	// mknod and mkfifo honour the umask: set the modes wanted.
	must(os.Chmod(filepath.Join(root, "dev/null"), 0o666))
	must(os.Chmod(filepath.Join(root, "etc/fifo"), 0o620))
	// cap_net_raw+ep, as Debian's ping carries it (VFS_CAP_REVISION_2).
	capNetRaw := []byte{0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}
	xattrs := unix.Setxattr(filepath.Join(root, "usr/bin/ping"), "security.capability", capNetRaw, 0) == nil &&
		unix.Setxattr(filepath.Join(root, "etc/shadow"), "trusted.cubicle-test", []byte("kept"), 0) == nil
	// The rootfs has no /proc, /sys or /tmp: the image must add them.

	image := filepath.Join(t.TempDir(), "image.ext4")
	binary := fakeBinary(t, "#!cubicle binary stand-in\n")
	if err := BuildImage(context.Background(), root, binary, image); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(image)
	if err != nil || fi.Mode().Perm() != 0o444 {
		t.Fatalf("image: %v, %v; want mode 0444", fi, err)
	}
	ents, _ := os.ReadDir(filepath.Dir(image))
	if len(ents) != 1 {
		t.Fatalf("beside the image: %v, want nothing else", ents)
	}

	ctx := context.Background()
	stat := func(path string) Inode {
		t.Helper()
		in, err := StatImage(ctx, image, path)
		if err != nil {
			t.Fatal(err)
		}
		return in
	}
	for _, tc := range []struct {
		path     string
		typ      string
		mode     uint32
		uid, gid uint32
	}{
		{"/etc/shadow", "regular", 0o640, 0, 42},
		{"/home/user/notes", "regular", 0o600, 1000, 1000},
		{"/usr/bin/sudo", "regular", 0o4755, 0, 0},
		{"/usr/bin/wall", "regular", 0o2755, 0, 5},
		{"/var/tmp", "directory", 0o1777, 0, 0},
		{"/srv/shared", "directory", 0o2775, 1000, 50},
		{"/etc/short-link", "symlink", 0o777, 1000, 1000},
		{"/etc/long-link", "symlink", 0o777, 0, 0},
		{"/dev/null", "character", 0o666, 0, 0},
		{"/etc/fifo", "FIFO", 0o620, 0, 0},
		// What the image adds.
		{"/.cubicle", "directory", 0o755, 0, 0},
		{"/.cubicle/cubicle", "regular", 0o755, 0, 0},
		{"/.cubicle/rw", "directory", 0o755, 0, 0},
		{"/.cubicle/root", "directory", 0o755, 0, 0},
		{"/proc", "directory", 0o555, 0, 0},
		{"/sys", "directory", 0o555, 0, 0},
		{"/tmp", "directory", 0o1777, 0, 0},
		{"/dev", "directory", 0o755, 0, 0},
	} {
		in := stat(tc.path)
		if in.Type != tc.typ || in.Mode != tc.mode || in.UID != tc.uid || in.GID != tc.gid {
			t.Errorf("%s: %s %#o %d:%d, want %s %#o %d:%d", tc.path, in.Type, in.Mode, in.UID, in.GID, tc.typ, tc.mode, tc.uid, tc.gid)
		}
	}
	if in := stat("/etc/short-link"); in.LinkTarget != "../usr/bin/sudo" {
		t.Errorf("short symlink points to %q", in.LinkTarget)
	}
	if in := stat("/etc/long-link"); in.Size != int64(len(long)) {
		t.Errorf("long symlink: size %d, want %d", in.Size, len(long))
	}
	if b, err := exec.Command("debugfs", "-R", "cat /etc/long-link", image).Output(); err != nil || string(b) != long {
		t.Errorf("long symlink holds %q (%v), want %q", b, err, long)
	}
	ping, ping4 := stat("/usr/bin/ping"), stat("/usr/bin/ping4")
	if ping.Ino != ping4.Ino || ping.Links != 2 {
		t.Errorf("hard link lost: ping inode %d (%d links), ping4 inode %d", ping.Ino, ping.Links, ping4.Ino)
	}
	if b, err := exec.Command("debugfs", "-R", "cat /.cubicle/cubicle", image).Output(); err != nil || string(b) != "#!cubicle binary stand-in\n" {
		t.Errorf("/.cubicle/cubicle holds %q (%v)", b, err)
	}
	if b, err := exec.Command("debugfs", "-R", "cat /etc/shadow", image).Output(); err != nil || string(b) != "content of etc/shadow" {
		t.Errorf("/etc/shadow holds %q (%v)", b, err)
	}
	if !xattrs {
		t.Log("this file system takes no security/trusted xattrs: their check is skipped")
	} else {
		if got := eaList(t, image, "/usr/bin/ping"); !strings.Contains(got, "security.capability") {
			t.Errorf("ping's capability xattr lost: %s", got)
		}
		if got := eaList(t, image, "/etc/shadow"); !strings.Contains(got, `trusted.cubicle-test (4) = "kept"`) {
			t.Errorf("trusted xattr lost: %s", got)
		}
	}
	// The rootfs itself is untouched.
	if _, err := os.Lstat(filepath.Join(root, ".cubicle")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the rootfs got a /.cubicle: %v", err)
	}
	mountCheck(t, image)
}

// mountCheck mounts the image read-only on a loop device, where there is
// one, and reads the kernel's view of what debugfs showed.
func mountCheck(t *testing.T, image string) {
	t.Helper()
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		t.Log("no loop devices: the image is checked with debugfs only")
		return
	}
	mnt := t.TempDir()
	out, err := exec.Command("mount", "-o", "loop,ro", "-t", "ext4", image, mnt).CombinedOutput()
	if err != nil {
		t.Logf("cannot mount the image on a loop device (%v: %s): checked with debugfs only", err, bytes.TrimSpace(out))
		return
	}
	defer exec.Command("umount", mnt).Run()
	fi, err := os.Stat(filepath.Join(mnt, "usr/bin/sudo"))
	if err != nil || fi.Mode()&os.ModeSetuid == 0 {
		t.Errorf("mounted: sudo %v, %v: setuid lost", fi, err)
	}
	if b, err := os.ReadFile(filepath.Join(mnt, ".cubicle/cubicle")); err != nil || !bytes.HasPrefix(b, []byte("#!cubicle")) {
		t.Errorf("mounted: /.cubicle/cubicle %q, %v", b, err)
	}
}

// TestBuildImageRefuses: a rootfs that claims /.cubicle, a missing rootfs
// or binary, and a cancelled build fail cleanly and leave nothing behind.
func TestBuildImageRefuses(t *testing.T) {
	needImageTools(t)
	binary := fakeBinary(t, "bin")
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	reserved := t.TempDir()
	os.MkdirAll(filepath.Join(reserved, ".cubicle"), 0o755)
	ctxDone, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name           string
		ctx            context.Context
		rootfs, binary string
		err            string
	}{
		{"reserved", context.Background(), reserved, binary, "reserved"},
		{"no rootfs", context.Background(), filepath.Join(root, "missing"), binary, "not a directory"},
		{"no binary", context.Background(), root, filepath.Join(root, "missing"), "not a regular file"},
		{"cancelled", ctxDone, root, binary, "mkfs.ext4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			outDir := t.TempDir()
			err := BuildImage(tc.ctx, tc.rootfs, tc.binary, filepath.Join(outDir, "image.ext4"))
			if err == nil || !errors.Is(err, ErrImage) || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("BuildImage: %v, want an ErrImage about %q", err, tc.err)
			}
			if ents, _ := os.ReadDir(outDir); len(ents) != 0 {
				t.Fatalf("left behind: %v", ents)
			}
		})
	}
}

// TestRegistryImage: the image is built once per input, found by its key
// next time, rebuilt (and the old one removed) when the binary changes,
// and a dead builder's temporary file is cleaned up.
func TestRegistryImage(t *testing.T) {
	needImageTools(t)
	r, _ := newTestRegistry(t)
	tmpl := installForTest(t, r, Template{TemplateID: "imgtemplate000000000", BuildID: "build-1"}, "m")
	dir := filepath.Dir(r.RootFS(tmpl))
	crashed := filepath.Join(dir, ".image-0123.tmp-999")
	if err := os.WriteFile(crashed, []byte("half an image"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	bin1 := fakeBinary(t, "one")
	p1, err := r.Image(ctx, tmpl, bin1)
	if err != nil {
		t.Fatal(err)
	}
	sum1, _ := fileSHA256(bin1)
	if want := filepath.Join(dir, "image-"+ImageKey("build-1", sum1)+".ext4"); p1 != want {
		t.Fatalf("image at %s, want %s", p1, want)
	}
	if _, err := os.Stat(crashed); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a dead build's temporary file is still there: %v", err)
	}
	st1, _ := os.Stat(p1)
	again, err := r.Image(ctx, tmpl, bin1)
	st2, _ := os.Stat(again)
	if err != nil || again != p1 || !os.SameFile(st1, st2) {
		t.Fatalf("second call: %s, %v: rebuilt or moved", again, err)
	}
	p2, err := r.Image(ctx, tmpl, fakeBinary(t, "two"))
	if err != nil || p2 == p1 {
		t.Fatalf("new binary: %s, %v", p2, err)
	}
	if _, err := os.Stat(p1); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the old image is still there: %v", err)
	}
	if b, err := exec.Command("debugfs", "-R", "cat /.cubicle/cubicle", p2).Output(); err != nil || string(b) != "two" {
		t.Fatalf("new image's binary: %q, %v", b, err)
	}
	if b, err := exec.Command("debugfs", "-R", "cat /etc/marker", p2).Output(); err != nil || string(b) != "m" {
		t.Fatalf("new image's rootfs: %q, %v", b, err)
	}
	// A runtime that knows only the rootfs directory finds the same image.
	bin2 := fakeBinary(t, "two")
	if via, err := ImageOf(ctx, r.RootFS(tmpl), bin2); err != nil || via != p2 {
		t.Fatalf("ImageOf: %s, %v; want %s", via, err, p2)
	}
	if _, err := ImageOf(ctx, dir, bin2); err == nil || !errors.Is(err, ErrImage) {
		t.Fatalf("ImageOf(a template directory, not its rootfs): %v", err)
	}
	other := Template{TemplateID: tmpl.TemplateID, BuildID: "build-2"}
	if ImageKey(other.BuildID, sum1) == ImageKey(tmpl.BuildID, sum1) {
		t.Fatal("the build ID is not part of the key")
	}
	if _, err := r.Image(ctx, Template{TemplateID: "../../etc", BuildID: "x"}, bin1); err == nil {
		t.Fatal("an invalid template ID was accepted")
	}
}
