package oci

// Applying one layer's tar stream to the tree under a root directory.
//
// Every path comes from the layer, so every path is resolved by the kernel
// with openat2(RESOLVE_IN_ROOT): ".." stops at the root and a symbolic link,
// absolute or relative, made by this layer or an earlier one, resolves as
// it would inside the sandbox, never on the host. Only a directory is ever
// opened that way; the entry itself is then made, removed or changed by the
// *at system calls relative to that directory, on its last name component,
// without following it (O_NOFOLLOW, AT_SYMLINK_NOFOLLOW, O_EXCL). Nothing
// else writes under the root while a layer is applied, so a name just
// stat'ed or made stays what it was.

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Whiteout names, from the OCI image spec (image-spec/layer.md,
// "Whiteouts"), which took them from aufs.
const (
	// whiteoutPrefix on a name removes the name without it from lower
	// layers.
	whiteoutPrefix = ".wh."
	// opaqueWhiteout in a directory hides everything lower layers had in
	// that directory.
	opaqueWhiteout = ".wh..wh..opq"
	// whiteoutMeta starts aufs's own bookkeeping names (.wh..wh.plnk,
	// .wh..wh.aufs), which are no content.
	whiteoutMeta = ".wh..wh."
)

// paxXattr prefixes the PAX records that carry extended attributes, as GNU
// tar, Docker and BuildKit write them.
const paxXattr = "SCHILY.xattr."

// inRoot resolves a layer's path inside the root and never through
// /proc/<pid>/fd-style links, which could point anywhere.
const inRoot = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS

// applier applies one layer.
type applier struct {
	root int // O_PATH descriptor of the root directory
	// seen holds the paths (clean, relative) this layer wrote, with their
	// ancestors: an opaque directory keeps those and drops the rest.
	seen map[string]bool
	// opaque lists the directories this layer marked opaque; they are
	// pruned once the whole layer is in, as the marker may come after
	// the directory's new entries.
	opaque []string
	// dirTimes are set last, as adding entries to a directory changes
	// its mtime.
	dirTimes []dirTime
}

type dirTime struct {
	rel          string
	atime, mtime time.Time
}

// applyTar applies the layer tar read from r to the tree under root.
func applyTar(ctx context.Context, root int, r io.Reader) error {
	a := &applier{root: root, seen: make(map[string]bool)}
	tr := tar.NewReader(r)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%w: tar: %w", ErrCorrupt, err)
		}
		if err := a.entry(hdr, tr); err != nil {
			if imagesFault(err) {
				return fmt.Errorf("%w: entry %q: %w", ErrCorrupt, hdr.Name, err)
			}
			return fmt.Errorf("entry %q: %w", hdr.Name, err)
		}
	}
	return a.finish()
}

// imagesFault reports whether err, from applying an entry, comes from what
// the layers hold rather than from the host (a full disk, missing
// privileges): a parent that is a dangling symlink or a file, a name too
// long, a hard link to a directory.
func imagesFault(err error) bool {
	if errors.Is(err, ErrCorrupt) || errors.Is(err, ErrUnsafe) {
		return false // says so already
	}
	for _, e := range []error{unix.ENOENT, unix.ENOTDIR, unix.ELOOP, unix.ENAMETOOLONG, unix.EEXIST, unix.EISDIR, unix.EMLINK} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// cleanPath turns a tar entry name into a clean path relative to the root
// ("." for the root itself). A leading "/" is dropped, as GNU tar does; a
// name that climbs above the root is refused rather than clamped, as no
// honest layer holds one.
func cleanPath(name string) (string, error) {
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("%w: name holds a NUL byte", ErrUnsafe)
	}
	p := path.Clean(strings.TrimLeft(name, "/"))
	if p == ".." || strings.HasPrefix(p, "../") {
		return "", fmt.Errorf("%w: %q climbs above the root", ErrUnsafe, name)
	}
	return p, nil
}

// isSparse reports whether hdr is a GNU sparse file, old style or PAX.
func isSparse(hdr *tar.Header) bool {
	if hdr.Typeflag == tar.TypeGNUSparse {
		return true
	}
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

// split returns rel's directory and last name; the root's are both ".".
func split(rel string) (dir, base string) {
	if rel == "." {
		return ".", "."
	}
	return path.Dir(rel), path.Base(rel)
}

// entry applies one tar entry; r reads its content.
func (a *applier) entry(hdr *tar.Header, r io.Reader) error {
	rel, err := cleanPath(hdr.Name)
	if err != nil {
		return err
	}
	dir, base := split(rel)
	if strings.HasPrefix(base, whiteoutPrefix) {
		return a.whiteout(dir, base)
	}
	if isSparse(hdr) {
		// archive/tar expands a sparse file's holes: a few bytes of
		// layer could declare petabytes of zeros. Image builders never
		// write sparse entries.
		return fmt.Errorf("%w: sparse files are not supported", ErrUnsafe)
	}
	var mode uint32 // the file type for mknod
	switch hdr.Typeflag {
	case tar.TypeReg, tar.TypeCont, tar.TypeDir, tar.TypeSymlink, tar.TypeLink:
	case tar.TypeChar:
		mode = unix.S_IFCHR
	case tar.TypeBlock:
		mode = unix.S_IFBLK
	case tar.TypeFifo:
		mode = unix.S_IFIFO
	case tar.TypeXGlobalHeader:
		return nil // PAX defaults, already folded into later headers
	default:
		return fmt.Errorf("%w: tar entry type %q is not supported", ErrUnsafe, hdr.Typeflag)
	}
	if rel == "." {
		if hdr.Typeflag != tar.TypeDir {
			return fmt.Errorf("%w: the root can only be a directory", ErrUnsafe)
		}
		return a.setMeta(a.root, ".", rel, hdr)
	}
	pfd, err := a.mkdirAll(dir)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	a.markSeen(rel)
	if hdr.Typeflag == tar.TypeLink {
		return a.hardlink(pfd, base, rel, hdr.Linkname)
	}

	keep := false // an existing directory stays, with its entries, when a directory replaces it
	var st unix.Stat_t
	switch err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); {
	case err == nil:
		if hdr.Typeflag == tar.TypeDir && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			keep = true
		} else if err := removeAll(pfd, base); err != nil {
			return fmt.Errorf("replace: %w", err)
		}
	case !errors.Is(err, unix.ENOENT):
		return fmt.Errorf("stat: %w", err)
	}

	switch hdr.Typeflag {
	case tar.TypeDir:
		if !keep {
			if err := unix.Mkdirat(pfd, base, 0o700); err != nil {
				return fmt.Errorf("mkdir: %w", err)
			}
		}
	case tar.TypeSymlink:
		if hdr.Linkname == "" {
			return fmt.Errorf("%w: symbolic link with an empty target", ErrCorrupt)
		}
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return fmt.Errorf("symlink: %w", err)
		}
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		if hdr.Devmajor < 0 || hdr.Devmajor > 0xfff || hdr.Devminor < 0 || hdr.Devminor > 0xfffff {
			return fmt.Errorf("%w: device number %d:%d out of range", ErrCorrupt, hdr.Devmajor, hdr.Devminor)
		}
		dev := unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		if err := unix.Mknodat(pfd, base, mode|0o600, int(dev)); err != nil {
			return fmt.Errorf("mknod: %w", err)
		}
	default: // regular file
		if err := writeFile(pfd, base, r); err != nil {
			return err
		}
	}
	return a.setMeta(pfd, base, rel, hdr)
}

// writeFile makes the regular file base in the directory pfd with r's
// content. O_EXCL|O_NOFOLLOW: whatever was there was removed, and a name
// that reappeared would not be written through.
func writeFile(pfd int, base string, r io.Reader) error {
	fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create: %w", err)
	}
	f := os.NewFile(uintptr(fd), base)
	cr := &recordingReader{r: r}
	if _, err := io.Copy(f, cr); err != nil {
		f.Close()
		if cr.err != nil {
			return fmt.Errorf("%w: content: %w", ErrCorrupt, err)
		}
		return fmt.Errorf("write: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return nil
}

// hardlink makes base, in the directory pfd, a hard link to linkname: a
// file of this layer or an earlier one, found inside the root.
func (a *applier) hardlink(pfd int, base, rel, linkname string) error {
	target, err := cleanPath(linkname)
	if err != nil {
		return fmt.Errorf("hard link: %w", err)
	}
	if target == "." {
		return fmt.Errorf("%w: hard link to the root", ErrUnsafe)
	}
	if target == rel {
		return nil // a link to itself: the file is there already
	}
	tdir, tbase := split(target)
	tfd, err := a.openDir(tdir, unix.O_PATH)
	if err != nil {
		return fmt.Errorf("%w: hard link target %s: directory %s: %w", ErrCorrupt, target, tdir, err)
	}
	defer unix.Close(tfd)
	var st unix.Stat_t
	if err := unix.Fstatat(tfd, tbase, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("%w: hard link target %s is in no earlier entry: %w", ErrCorrupt, target, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return fmt.Errorf("%w: hard link to directory %s", ErrUnsafe, target)
	}
	switch err := unix.Fstatat(pfd, base, new(unix.Stat_t), unix.AT_SYMLINK_NOFOLLOW); {
	case err == nil:
		if err := removeAll(pfd, base); err != nil {
			return fmt.Errorf("replace: %w", err)
		}
	case !errors.Is(err, unix.ENOENT):
		return fmt.Errorf("stat: %w", err)
	}
	// Flags 0: a symbolic link target is linked itself, never followed.
	if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
		return fmt.Errorf("hard link to %s: %w", target, err)
	}
	return nil
}

// whiteout applies the whiteout file base in dir.
func (a *applier) whiteout(dir, base string) error {
	if base == opaqueWhiteout {
		a.opaque = append(a.opaque, dir)
		a.markSeen(dir)
		return nil
	}
	if strings.HasPrefix(base, whiteoutMeta) {
		return nil
	}
	victim := strings.TrimPrefix(base, whiteoutPrefix)
	if victim == "" || victim == "." || victim == ".." {
		return fmt.Errorf("%w: whiteout %q names no file", ErrUnsafe, base)
	}
	if a.seen[path.Join(dir, victim)] {
		// A whiteout hides lower layers only, never its own layer's file.
		return nil
	}
	pfd, err := a.openDir(dir, unix.O_PATH)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
		return nil // nothing below to hide
	}
	if err != nil {
		return fmt.Errorf("whiteout: %w", err)
	}
	defer unix.Close(pfd)
	if err := removeAll(pfd, victim); err != nil {
		return fmt.Errorf("whiteout: %w", err)
	}
	return nil
}

// markSeen records rel and its ancestors as this layer's.
func (a *applier) markSeen(rel string) {
	for p := rel; p != "." && !a.seen[p]; p = path.Dir(p) {
		a.seen[p] = true
	}
}

// setMeta gives the entry base in the directory pfd the owner, mode,
// extended attributes and times of hdr. Order matters: chown clears the
// setuid and setgid bits and security.capability, so the mode and the
// attributes come after it.
func (a *applier) setMeta(pfd int, base, rel string, hdr *tar.Header) error {
	if hdr.Uid < 0 || hdr.Uid > 0xfffffffe || hdr.Gid < 0 || hdr.Gid > 0xfffffffe {
		return fmt.Errorf("%w: owner %d:%d out of range", ErrCorrupt, hdr.Uid, hdr.Gid)
	}
	if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.EPERM) && os.Geteuid() != 0 {
			return fmt.Errorf("chown %d:%d: %w (unpacking an image needs root)", hdr.Uid, hdr.Gid, err)
		}
		return fmt.Errorf("chown %d:%d: %w", hdr.Uid, hdr.Gid, err)
	}
	if hdr.Typeflag != tar.TypeSymlink {
		// The entry is no symbolic link (made or stat'ed as such just
		// now), so following it is harmless; fchmodat cannot do
		// otherwise before Linux 6.6.
		if err := unix.Fchmodat(pfd, base, uint32(hdr.Mode)&0o7777, 0); err != nil {
			return fmt.Errorf("chmod %#o: %w", hdr.Mode&0o7777, err)
		}
	}
	if err := setXattrs(pfd, base, hdr); err != nil {
		return err
	}
	atime := hdr.AccessTime
	if atime.IsZero() {
		atime = hdr.ModTime
	}
	if hdr.Typeflag == tar.TypeDir {
		a.dirTimes = append(a.dirTimes, dirTime{rel: rel, atime: atime, mtime: hdr.ModTime})
		return nil
	}
	return setTimes(pfd, base, atime, hdr.ModTime)
}

// setXattrs sets the extended attributes hdr's PAX records carry that
// xattrApplied lets through, in the order of their names.
func setXattrs(pfd int, base string, hdr *tar.Header) error {
	var names []string
	for k := range hdr.PAXRecords {
		if strings.HasPrefix(k, paxXattr) && xattrApplied(strings.TrimPrefix(k, paxXattr)) {
			names = append(names, k)
		}
	}
	if len(names) == 0 {
		return nil
	}
	slices.Sort(names)
	// No *xattrat call before Linux 6.13: reach the entry through our own
	// descriptor of its directory, its last name not followed (lsetxattr).
	p := fmt.Sprintf("/proc/self/fd/%d/%s", pfd, base)
	for _, k := range names {
		attr := strings.TrimPrefix(k, paxXattr)
		if attr == "" {
			return fmt.Errorf("%w: empty extended attribute name", ErrCorrupt)
		}
		if err := unix.Lsetxattr(p, attr, []byte(hdr.PAXRecords[k]), 0); err != nil {
			return fmt.Errorf("set extended attribute %s: %w", attr, err)
		}
	}
	return nil
}

// xattrApplied reports whether an image's extended attribute is written
// to the tree: user.*, file capabilities and POSIX ACLs, which the image's
// programs rely on. trusted.* is the kernel's and privileged tools' own
// namespace (overlayfs reads trusted.overlay.* from its lower layers, and
// the tree becomes one), and the other security.* attributes are labels of
// the host that built the image (SELinux, IMA, EVM), which mean nothing
// here or worse; they are dropped.
func xattrApplied(name string) bool {
	switch {
	case strings.HasPrefix(name, "user."),
		name == "security.capability",
		name == "system.posix_acl_access", name == "system.posix_acl_default":
		return true
	}
	return false
}

func setTimes(pfd int, base string, atime, mtime time.Time) error {
	ts := []unix.Timespec{timespec(atime), timespec(mtime)}
	if err := unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("set times: %w", err)
	}
	return nil
}

// timespec is t for utimensat; a zero t (no time in the header) becomes
// the epoch, as tar would make it.
func timespec(t time.Time) unix.Timespec {
	if t.IsZero() {
		return unix.Timespec{}
	}
	return unix.Timespec{Sec: t.Unix(), Nsec: int64(t.Nanosecond())}
}

// finish does what waits for the whole layer: opaque directories drop what
// lower layers had in them, then directories get their times.
func (a *applier) finish() error {
	for _, d := range a.opaque {
		if err := a.pruneLower(d); err != nil {
			return fmt.Errorf("opaque directory %s: %w", d, err)
		}
	}
	for _, dt := range slices.Backward(a.dirTimes) {
		if err := a.setDirTimes(dt); err != nil {
			return fmt.Errorf("directory %s: %w", dt.rel, err)
		}
	}
	return nil
}

// pruneLower removes from the directory rel, recursively, every entry this
// layer did not write.
func (a *applier) pruneLower(rel string) error {
	fd, err := a.openDir(rel, unix.O_RDONLY)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	f := os.NewFile(uintptr(fd), rel)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return err
	}
	for _, n := range names {
		child := path.Join(rel, n)
		if !a.seen[child] {
			if err := removeAll(fd, n); err != nil {
				return err
			}
			continue
		}
		var st unix.Stat_t
		if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			if err := a.pruneLower(child); err != nil {
				return err
			}
		}
	}
	return nil
}

func (a *applier) setDirTimes(dt dirTime) error {
	dir, base := split(dt.rel)
	pfd, err := a.openDir(dir, unix.O_PATH)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
		return nil // removed later in the layer
	}
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return nil // removed or replaced later in the layer
	}
	return setTimes(pfd, base, dt.atime, dt.mtime)
}

// openDir opens the directory rel, resolved inside the root, with flags
// (O_PATH, or O_RDONLY to read it).
func (a *applier) openDir(rel string, flags int) (int, error) {
	how := unix.OpenHow{Flags: uint64(flags | unix.O_DIRECTORY | unix.O_CLOEXEC), Resolve: inRoot}
	for tries := 0; ; tries++ {
		fd, err := unix.Openat2(a.root, rel, &how)
		switch {
		case err == nil:
			return fd, nil
		case errors.Is(err, unix.EINTR), errors.Is(err, unix.EAGAIN) && tries < 16:
			// EAGAIN: a rename elsewhere on the system raced the
			// lookup; RESOLVE_IN_ROOT asks to retry.
			continue
		case errors.Is(err, unix.ENOSYS):
			return -1, fmt.Errorf("openat2 (Linux 5.6 or later) is needed to unpack images safely: %w", err)
		default:
			return -1, err
		}
	}
}

// mkdirAll opens the directory rel inside the root, making it and its
// missing ancestors (mode 0755, owned by the caller) as a layer that lacks
// their entries needs them.
func (a *applier) mkdirAll(rel string) (int, error) {
	fd, err := a.openDir(rel, unix.O_PATH)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		if err != nil {
			return -1, fmt.Errorf("directory %s: %w", rel, err)
		}
		return fd, nil
	}
	cur, err := a.openDir(".", unix.O_PATH)
	if err != nil {
		return -1, err
	}
	parts := strings.Split(rel, "/")
	for i, name := range parts {
		sub := strings.Join(parts[:i+1], "/")
		next, err := a.openDir(sub, unix.O_PATH)
		if errors.Is(err, unix.ENOENT) {
			switch err := unix.Mkdirat(cur, name, 0o755); {
			case err == nil:
				// Ours, just made, no link: chmod may follow it. Not
				// so on EEXIST, where name can be a symlink that
				// dangles inside the root but names a host directory.
				_ = unix.Fchmodat(cur, name, 0o755, 0) // 0755, not the umask's
			case !errors.Is(err, unix.EEXIST):
				unix.Close(cur)
				return -1, fmt.Errorf("mkdir %s: %w", sub, err)
			}
			next, err = a.openDir(sub, unix.O_PATH)
		}
		unix.Close(cur)
		if err != nil {
			// ENOENT again: sub is a symbolic link to nowhere.
			return -1, fmt.Errorf("directory %s: %w", sub, err)
		}
		cur = next
	}
	return cur, nil
}

// removeAll removes name from the directory pfd, and all below it when it
// is a directory, never following a symbolic link. A missing name is no
// error.
func removeAll(pfd int, name string) error {
	err := unix.Unlinkat(pfd, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	fd, err := unix.Openat(pfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	names, err := f.Readdirnames(-1)
	if err != nil {
		f.Close()
		return fmt.Errorf("remove %s: %w", name, err)
	}
	for _, n := range names {
		if err := removeAll(fd, n); err != nil {
			f.Close()
			return err
		}
	}
	f.Close()
	if err := unix.Unlinkat(pfd, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %s: %w", name, err)
	}
	return nil
}
