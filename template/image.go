package template

// The template's ext4 image: the disk a microVM sandbox boots from (see
// guest/init's package doc for the contract). It is made from the rootfs
// directory with `mkfs.ext4 -d`, which copies owners, modes (setuid bits
// included), symlinks, hard links, device nodes, timestamps and extended
// attributes without a loop mount; then debugfs adds /.cubicle/cubicle and
// the mount points without touching the rootfs, which other sandboxes use.
// Layout of a template directory with an image:
//
//	<templates>/<id>/image-<key>.ext4   the image; present only when complete
//	<templates>/<id>/.image.lock        flock held while an image is built
//	<templates>/<id>/.image-*.tmp-*     an image being built; removed afterwards,
//	                                    or by the next build if its builder died

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

// ImageLayout is the version of the image's layout (what is added to the
// rootfs, and how mkfs.ext4 is run). Change it whenever those change, so
// that cached images are rebuilt.
const ImageLayout = 1

// Paths the image adds, as guest/init expects them (not imported: the
// template package stays free of guest code).
const (
	imageBinary  = "/.cubicle/cubicle"
	imageRWDir   = "/.cubicle/rw"
	imageRootDir = "/.cubicle/root"
)

// imageMountPoints must exist in every image: the kernel mounts devtmpfs on
// /dev and init mounts the rest. Mode 0 means 0755.
var imageMountPoints = []struct {
	path string
	mode uint32
}{{"/proc", 0o555}, {"/sys", 0o555}, {"/dev", 0o755}, {"/tmp", 0o1777}}

// ErrImage is wrapped by every failure to build a template image.
var ErrImage = errors.New("template image")

// ImageKey is the cache key of an image: 32 hex digits of the SHA-256 of
// the layout version, the template's build ID (the key of its rootfs) and
// the SHA-256 of the cubicle binary put in it.
func ImageKey(buildID, binarySHA256 string) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "cubicle template image\x00%d\x00%s\x00%s", ImageLayout, buildID, binarySHA256))
	return hex.EncodeToString(sum[:16])
}

// Image returns the path of t's ext4 image with the cubicle binary at
// binary in it, building it first when the template directory holds none
// for these inputs (seconds: mkfs.ext4 copies the whole rootfs). Images of
// other inputs there are removed. Concurrent callers, in this process or
// others, build it once.
func (r *Registry) Image(ctx context.Context, t Template, binary string) (string, error) {
	rootfs := r.RootFS(t)
	if rootfs == "" {
		return "", fmt.Errorf("%w: invalid template ID %q", ErrImage, t.TemplateID)
	}
	return cachedImage(ctx, rootfs, t.BuildID, binary)
}

// ImageOf is Image for a runtime, which knows a template by its rootfs
// directory (runtime.Config.RootFS) only: the build ID comes from the
// template.json beside it.
func ImageOf(ctx context.Context, rootfs, binary string) (string, error) {
	if filepath.Base(rootfs) != rootfsDir {
		return "", fmt.Errorf("%w: %s is not a template's rootfs directory", ErrImage, rootfs)
	}
	b, err := os.ReadFile(filepath.Join(filepath.Dir(rootfs), metadataFile))
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrImage, err)
	}
	var t Template
	if err := json.Unmarshal(b, &t); err != nil {
		return "", fmt.Errorf("%w: %s: %w", ErrImage, metadataFile, err)
	}
	return cachedImage(ctx, rootfs, t.BuildID, binary)
}

// cachedImage is Image's work, for the template whose rootfs directory is
// rootfs and whose build ID is buildID.
func cachedImage(ctx context.Context, rootfs, buildID, binary string) (string, error) {
	if buildID == "" {
		return "", fmt.Errorf("%w: template at %s has no build ID", ErrImage, rootfs)
	}
	sum, err := fileSHA256(binary)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrImage, err)
	}
	dir := filepath.Dir(rootfs)
	path := filepath.Join(dir, "image-"+ImageKey(buildID, sum)+".ext4")
	if isFile(path) {
		return path, nil
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".image.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrImage, err)
	}
	defer lock.Close() // releases the flock
	if err := flockRetry(lock, syscall.LOCK_EX); err != nil {
		return "", fmt.Errorf("%w: lock: %w", ErrImage, err)
	}
	if isFile(path) { // built while we waited
		return path, nil
	}
	// Under the lock nobody else builds: what is left is a dead builder's.
	if olds, _ := filepath.Glob(filepath.Join(dir, ".image-*.tmp-*")); len(olds) > 0 {
		for _, o := range olds {
			os.Remove(o)
		}
	}
	if err := BuildImage(ctx, rootfs, binary, path); err != nil {
		return "", err
	}
	if olds, _ := filepath.Glob(filepath.Join(dir, "image-*.ext4")); len(olds) > 0 {
		for _, o := range olds {
			if o != path {
				os.Remove(o) // a VM may still hold it open; the inode lives on
			}
		}
	}
	return path, nil
}

// BuildImage makes the read-only ext4 image of the rootfs directory at out:
// the rootfs as it is, plus the cubicle binary (a copy of binary) at
// /.cubicle/cubicle, mode 0755 and owned by root, the empty directories
// /.cubicle/rw and /.cubicle/root, and the mount points /proc, /sys, /dev
// and /tmp where the rootfs lacks them. It is sized to the content plus
// headroom. out appears by a rename of a complete, synced file: a crash
// leaves no half image behind, only a dot-named temporary file beside it.
// The rootfs must not have /.cubicle of its own.
func BuildImage(ctx context.Context, rootfs, binary, out string) error {
	for _, tool := range []string{"mkfs.ext4", "debugfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%w: %s is needed (apt-get install e2fsprogs): %w", ErrImage, tool, err)
		}
	}
	if fi, err := os.Stat(rootfs); err != nil || !fi.IsDir() {
		return fmt.Errorf("%w: rootfs %s is not a directory (%v)", ErrImage, rootfs, err)
	}
	if _, err := os.Lstat(filepath.Join(rootfs, ".cubicle")); err == nil {
		return fmt.Errorf("%w: rootfs %s has a /.cubicle of its own; the path is reserved for cubicle", ErrImage, rootfs)
	}
	bin, err := os.Stat(binary)
	if err != nil || !bin.Mode().IsRegular() {
		return fmt.Errorf("%w: cubicle binary %s is not a regular file (%v)", ErrImage, binary, err)
	}
	size, inodes, err := imageSize(rootfs, bin.Size())
	if err != nil {
		return fmt.Errorf("%w: %w", ErrImage, err)
	}

	f, err := os.CreateTemp(filepath.Dir(out), "."+strings.TrimSuffix(filepath.Base(out), ".ext4")+".tmp-*")
	if err != nil {
		return fmt.Errorf("%w: %w", ErrImage, err)
	}
	tmp := f.Name()
	done := false
	defer func() {
		f.Close()
		if !done {
			os.Remove(tmp)
		}
	}()
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("%w: %w", ErrImage, err)
	}
	// No journal (the image is only ever mounted read-only), no reserved
	// blocks, an inode for every file with room to spare; -d copies the
	// tree. -E root_owner keeps / root's even where mke2fs would take the
	// caller's uid.
	mkfs := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-b", "4096", "-m", "0",
		"-N", fmt.Sprint(inodes), "-O", "^has_journal", "-E", "root_owner=0:0,nodiscard",
		"-L", "cubicle-template", "-d", rootfs, tmp)
	if b, err := mkfs.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: mkfs.ext4 -d %s: %w: %s", ErrImage, rootfs, err, bytes.TrimSpace(b))
	}
	if err := addCubicle(ctx, rootfs, binary, tmp); err != nil {
		return err
	}
	if err := checkImage(ctx, tmp, bin.Size()); err != nil {
		return err
	}
	fsck := exec.CommandContext(ctx, "e2fsck", "-f", "-n", tmp)
	if b, err := fsck.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: e2fsck finds the new image inconsistent: %w: %s", ErrImage, err, bytes.TrimSpace(b))
	}
	if err := f.Chmod(0o444); err != nil {
		return fmt.Errorf("%w: %w", ErrImage, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("%w: %w", ErrImage, err)
	}
	if err := os.Rename(tmp, out); err != nil {
		return fmt.Errorf("%w: %w", ErrImage, err)
	}
	done = true
	return syncDir(filepath.Dir(out))
}

// imageSize returns the size in bytes and the inode count of an image for
// the tree at root plus a binary of binSize bytes: the tree's disk usage,
// a quarter more for ext4's metadata and directory blocks, the binary, the
// inode table, and 16 MiB, rounded up to a MiB.
func imageSize(root string, binSize int64) (size int64, inodes int64, err error) {
	used, err := diskUsage(root)
	if err != nil {
		return 0, 0, err
	}
	var files int64
	err = filepath.WalkDir(root, func(string, fs.DirEntry, error) error { files++; return nil })
	if err != nil {
		return 0, 0, err
	}
	inodes = files + files/4 + 1024
	size = used + used/4 + binSize + inodes*256 + 16<<20
	return (size + 1<<20 - 1) &^ (1<<20 - 1), inodes, nil
}

// addCubicle writes the binary and the mount points into the image with
// debugfs. debugfs reports errors on its output but always exits 0, so any
// output line not of its usual chatter is an error; checkImage then reads
// the result back.
func addCubicle(ctx context.Context, rootfs, binary, image string) error {
	var cmds strings.Builder
	mkdir := func(path string, mode uint32) {
		fmt.Fprintf(&cmds, "mkdir %s\nsif %s mode 0%o\nsif %s uid 0\nsif %s gid 0\n", path, path, 0o040000|mode, path, path)
	}
	for _, m := range imageMountPoints {
		if _, err := os.Lstat(filepath.Join(rootfs, m.path)); errors.Is(err, fs.ErrNotExist) {
			mkdir(m.path, m.mode)
		}
	}
	mkdir("/.cubicle", 0o755)
	mkdir(imageRWDir, 0o755)
	mkdir(imageRootDir, 0o755)
	if strings.ContainsAny(binary, " \t\n\"") {
		return fmt.Errorf("%w: the binary's path %q has characters debugfs cannot take", ErrImage, binary)
	}
	// write names its target in the current directory, not by a path.
	fmt.Fprintf(&cmds, "cd %s\nwrite %s %s\ncd /\n", filepath.Dir(imageBinary), binary, filepath.Base(imageBinary))
	fmt.Fprintf(&cmds, "sif %s mode 0100755\nsif %s uid 0\nsif %s gid 0\n", imageBinary, imageBinary, imageBinary)
	cmd := exec.CommandContext(ctx, "debugfs", "-w", "-f", "-", image)
	cmd.Stdin = strings.NewReader(cmds.String())
	b, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%w: debugfs: %w: %s", ErrImage, err, bytes.TrimSpace(b))
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		// debugfs echoes each command as "debugfs: <cmd>", and write says
		// "Allocated inode: N"; anything else is a complaint.
		if line == "" || strings.HasPrefix(line, "debugfs ") || strings.HasPrefix(line, "debugfs: ") || strings.HasPrefix(line, "Allocated inode:") {
			continue
		}
		return fmt.Errorf("%w: debugfs: %s", ErrImage, line)
	}
	return nil
}

// Inode is what debugfs tells of one path in an ext4 image; tests and
// checkImage use it.
type Inode struct {
	Ino        uint64
	Type       string // "regular", "directory", "symlink", ...
	Mode       uint32 // permission bits, setuid/setgid/sticky included
	UID, GID   uint32
	Links      uint32
	Size       int64
	LinkTarget string // a symlink's
}

// StatImage stats path inside the ext4 image with debugfs.
func StatImage(ctx context.Context, image, path string) (Inode, error) {
	b, err := exec.CommandContext(ctx, "debugfs", "-R", "stat "+path, image).CombinedOutput()
	if err != nil {
		return Inode{}, fmt.Errorf("debugfs stat %s: %w: %s", path, err, b)
	}
	var in Inode
	var found bool
	seen := map[string]bool{} // the first of each field is the inode's ("Fragment: ... Size: 0" follows)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if seen[f[i]] {
				continue
			}
			seen[f[i]] = true
			switch f[i] {
			case "Inode:":
				fmt.Sscan(f[i+1], &in.Ino)
				found = true
			case "Type:":
				in.Type = f[i+1]
			case "Mode:":
				fmt.Sscanf(f[i+1], "%o", &in.Mode)
			case "User:":
				fmt.Sscan(f[i+1], &in.UID)
			case "Group:":
				fmt.Sscan(f[i+1], &in.GID)
			case "Links:":
				fmt.Sscan(f[i+1], &in.Links)
			case "Size:":
				fmt.Sscan(f[i+1], &in.Size)
			}
		}
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "Fast link dest:"); ok {
			in.LinkTarget = strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	if !found {
		return Inode{}, fmt.Errorf("debugfs stat %s: %s", path, bytes.TrimSpace(b))
	}
	return in, nil
}

// checkImage reads back what addCubicle wrote.
func checkImage(ctx context.Context, image string, binSize int64) error {
	bin, err := StatImage(ctx, image, imageBinary)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrImage, err)
	}
	if bin.Type != "regular" || bin.Mode != 0o755 || bin.UID != 0 || bin.GID != 0 || bin.Size != binSize {
		return fmt.Errorf("%w: %s in the image is %+v, want a %d-byte regular file, mode 0755, owned by root", ErrImage, imageBinary, bin, binSize)
	}
	for _, d := range []string{imageRWDir, imageRootDir, "/proc", "/sys", "/dev", "/tmp"} {
		in, err := StatImage(ctx, image, d)
		if err != nil || in.Type != "directory" {
			return fmt.Errorf("%w: %s in the image is not a directory (%+v, %v)", ErrImage, d, in, err)
		}
	}
	return nil
}

// fileSHA256 returns the hex SHA-256 of the file at path.
func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func isFile(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular()
}
