package uploads

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// CopyOptions says what a COPY step does with its uploaded files.
type CopyOptions struct {
	// Src is the step's source as the client gave it (args[0]); it may be
	// a glob. The SDK's tar holds the matched paths relative to the context
	// directory, so Src says which part of the tar is the copied item.
	Src string
	// Dest is the absolute destination inside the root, already expanded
	// and resolved against the working directory (buildspec.State).
	Dest string
	// UID and GID own everything copied (E2B chowns the copy to the
	// step's user, or the current USER, whatever the tar says).
	UID, GID int
	// Mode, when SetMode is true, replaces the permission bits (as chmod
	// takes them, 07777) of every copied file and directory (E2B: chmod -R
	// <mode>); otherwise the tar's permission bits (setuid, setgid and
	// sticky included) are kept.
	Mode    uint32
	SetMode bool
	Limits  Limits
}

// CopyInto applies the COPY of the tar in r into the root filesystem at
// root, with E2B's meaning:
//
//   - The copied item is the part of Src before its first glob character
//     (all of Src if it has none; "." if the glob is in its first element).
//   - If the item is a directory, its contents are merged into Dest,
//     which is created if missing (Docker's and E2B's COPY dir/ /dest).
//   - If it is a file or symlink, it becomes Dest, or Dest/<name> when
//     Dest ends in "/" or is an existing directory.
//   - Entries of the tar outside the item (its parent directories) are
//     not copied. Directories made on the way to Dest belong to root, 0755.
//
// Every path is resolved with openat2(RESOLVE_IN_ROOT), so symlinks in the
// root or in the tar resolve as they would inside the sandbox and nothing is
// ever created or changed outside root, whatever the tar holds. Existing
// files are replaced; a symlink at a copied path is replaced, never
// followed. CopyInto must run with the privileges to chown (root).
//
// On error the root may hold part of the copy: the builder applies a step to
// a scratch copy of the layer it discards when the step fails.
func CopyInto(root string, r io.Reader, o CopyOptions) error {
	if !path.IsAbs(o.Dest) {
		return fmt.Errorf("uploads: COPY destination %q is not absolute", o.Dest)
	}
	o.Limits = o.Limits.withDefaults()
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("uploads: open root %s: %w", root, err)
	}
	defer unix.Close(rfd)
	c := &copier{root: rfd, o: o, item: itemOf(o.Src), written: map[string]string{}}
	if err := walk(r, o.Limits, c.entry); err != nil {
		return err
	}
	if !c.decided {
		return fmt.Errorf("%w: COPY source %q is not in the uploaded files", ErrBadUpload, o.Src)
	}
	return c.finish()
}

type copier struct {
	root int
	o    CopyOptions
	item string // the copied item's path in the tar, "." for all of it
	// decided is set once the first entry at or under item fixed whether
	// the item is a directory (isDir) and where it goes (target).
	decided bool
	isDir   bool
	target  string
	// written maps tar names of regular files copied so far to their
	// paths in the root, for hard links.
	written map[string]string
	dirs    []dirTimes
}

type dirTimes struct {
	path  string
	mtime time.Time
}

// itemOf returns the non-glob prefix of a COPY source, cleaned, as E2B's
// builder takes it (doublestar.SplitPattern): whole elements up to the
// first one holding *, ?, [ or {.
func itemOf(src string) string {
	src = strings.TrimPrefix(path.Clean("/"+strings.ReplaceAll(src, `\`, "/")), "/")
	if src == "" {
		return "."
	}
	elems := strings.Split(src, "/")
	for i, e := range elems {
		if strings.ContainsAny(e, "*?[{") {
			if i == 0 {
				return "."
			}
			return strings.Join(elems[:i], "/")
		}
	}
	return src
}

// dest returns where the tar entry name goes in the root, or "" if it is
// not part of the copied item.
func (c *copier) dest(name string, h *tar.Header) (string, error) {
	var rel string
	switch {
	case c.item == ".":
		rel = name
	case name == c.item:
		rel = "."
	case strings.HasPrefix(name, c.item+"/"):
		rel = name[len(c.item)+1:]
	default:
		return "", nil // a parent of the item
	}
	if !c.decided {
		c.decided = true
		c.isDir = rel != "." || h.Typeflag == tar.TypeDir
		c.target = c.o.Dest
		if !c.isDir && (strings.HasSuffix(c.o.Dest, "/") || c.isDirInRoot(c.o.Dest)) {
			c.target = path.Join(c.o.Dest, path.Base(c.item))
		}
		c.target = path.Clean(c.target)
		if c.isDir {
			if err := c.mkdirAll(c.target); err != nil {
				return "", err
			}
		}
	}
	if !c.isDir {
		if rel != "." {
			return "", fmt.Errorf("%w: %q is both a file and a directory", ErrBadUpload, c.item)
		}
		return c.target, nil
	}
	if rel == "." {
		return "", nil // Dest itself: made above, keeps its owner and mode
	}
	return path.Join(c.target, rel), nil
}

func (c *copier) entry(h *tar.Header, name string, body io.Reader) error {
	dst, err := c.dest(name, h)
	if err != nil || dst == "" {
		return err
	}
	if dst == "/" {
		return fmt.Errorf("uploads: COPY would replace the root directory")
	}
	parentPath, base := path.Split(dst)
	if err := c.mkdirAll(parentPath); err != nil {
		return err
	}
	parent, err := c.openDir(parentPath)
	if err != nil {
		return err
	}
	defer unix.Close(parent)

	mode := uint32(h.Mode) & 0o7777
	if c.o.SetMode {
		mode = c.o.Mode & 0o7777
	}
	switch h.Typeflag {
	case tar.TypeDir:
		// A directory already in the root keeps its owner, mode and
		// times: merging a tree into /usr/local must not hand
		// /usr/local/bin to the step's user.
		var st unix.Stat_t
		err := unix.Fstatat(parent, base, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return nil
		}
		if err == nil {
			if err := unix.Unlinkat(parent, base, 0); err != nil {
				return fmt.Errorf("uploads: replace %s: %w", dst, err)
			}
			err = unix.ENOENT
		}
		if err == unix.ENOENT {
			err = unix.Mkdirat(parent, base, 0o700)
		}
		if err != nil {
			return fmt.Errorf("uploads: mkdir %s: %w", dst, err)
		}
		if err := c.own(parent, base, mode); err != nil {
			return fmt.Errorf("uploads: %s: %w", dst, err)
		}
		c.dirs = append(c.dirs, dirTimes{dst, h.ModTime})
		return nil
	case tar.TypeReg: // tar.Reader reports the old TypeRegA as TypeReg
		if err := c.clear(parent, base, dst); err != nil {
			return err
		}
		fd, err := unix.Openat(parent, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return fmt.Errorf("uploads: create %s: %w", dst, err)
		}
		werr := copyBody(fd, body, h.Size)
		if werr == nil {
			// chown before chmod: chown clears setuid and setgid.
			werr = unix.Fchown(fd, c.o.UID, c.o.GID)
		}
		if werr == nil {
			werr = unix.Fchmod(fd, mode)
		}
		unix.Close(fd)
		if werr == nil {
			werr = unix.UtimesNanoAt(parent, base, times(h.ModTime), unix.AT_SYMLINK_NOFOLLOW)
		}
		if werr != nil {
			return fmt.Errorf("uploads: write %s: %w", dst, werr)
		}
		c.written[name] = dst
		return nil
	case tar.TypeSymlink:
		if err := c.clear(parent, base, dst); err != nil {
			return err
		}
		if err := unix.Symlinkat(h.Linkname, parent, base); err != nil {
			return fmt.Errorf("uploads: symlink %s: %w", dst, err)
		}
		if err := unix.Fchownat(parent, base, c.o.UID, c.o.GID, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return fmt.Errorf("uploads: chown %s: %w", dst, err)
		}
		return nil
	case tar.TypeLink:
		target, _ := cleanName(h.Linkname)
		src, ok := c.written[target]
		if !ok {
			return fmt.Errorf("%w: hard link %q points to %q, which is not a file copied before it", ErrBadUpload, h.Name, h.Linkname)
		}
		sp, sb := path.Split(src)
		sfd, err := c.openDir(sp)
		if err != nil {
			return err
		}
		defer unix.Close(sfd)
		if err := c.clear(parent, base, dst); err != nil {
			return err
		}
		if err := unix.Linkat(sfd, sb, parent, base, 0); err != nil {
			return fmt.Errorf("uploads: link %s: %w", dst, err)
		}
		c.written[name] = dst
		return nil
	}
	return fmt.Errorf("%w: %q: unsupported entry type", ErrBadUpload, h.Name)
}

// finish sets directory times last, since writing into a directory
// changes its mtime. Called through walk's end (see CopyInto).
func (c *copier) finish() error {
	for i := len(c.dirs) - 1; i >= 0; i-- {
		d := c.dirs[i]
		p, b := path.Split(d.path)
		fd, err := c.openDir(p)
		if err != nil {
			return err
		}
		err = unix.UtimesNanoAt(fd, b, times(d.mtime), unix.AT_SYMLINK_NOFOLLOW)
		unix.Close(fd)
		if err != nil {
			return fmt.Errorf("uploads: set times of %s: %w", d.path, err)
		}
	}
	return nil
}

// clear removes a non-directory at parent/base so a file, symlink or link
// can take its place; a directory there is an error (Docker refuses too).
func (c *copier) clear(parent int, base, dst string) error {
	var st unix.Stat_t
	err := unix.Fstatat(parent, base, &st, unix.AT_SYMLINK_NOFOLLOW)
	if err == unix.ENOENT {
		return nil
	}
	if err != nil {
		return fmt.Errorf("uploads: %s: %w", dst, err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return fmt.Errorf("uploads: cannot copy a file over the directory %s", dst)
	}
	if err := unix.Unlinkat(parent, base, 0); err != nil {
		return fmt.Errorf("uploads: replace %s: %w", dst, err)
	}
	return nil
}

// own sets owner and mode of parent/base (not following a symlink).
func (c *copier) own(parent int, base string, mode uint32) error {
	fd, err := unix.Openat(parent, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Fchown(fd, c.o.UID, c.o.GID); err != nil {
		return err
	}
	return unix.Fchmod(fd, mode)
}

// openDir opens the directory p (absolute within the root) with every
// symlink on the way resolved inside the root.
func (c *copier) openDir(p string) (int, error) {
	fd, err := unix.Openat2(c.root, "./"+strings.TrimPrefix(path.Clean("/"+p), "/"), &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return -1, fmt.Errorf("uploads: open %s in the root: %w", p, err)
	}
	return fd, nil
}

// isDirInRoot reports whether p names a directory inside the root.
func (c *copier) isDirInRoot(p string) bool {
	fd, err := c.openDir(p)
	if err != nil {
		return false
	}
	unix.Close(fd)
	return true
}

// mkdirAll makes p and its missing parents inside the root (root-owned,
// 0755), resolving each existing element inside the root.
func (c *copier) mkdirAll(p string) error {
	p = path.Clean("/" + p)
	if p == "/" {
		return nil
	}
	if c.isDirInRoot(p) {
		return nil
	}
	parent, base := path.Split(p)
	if err := c.mkdirAll(parent); err != nil {
		return err
	}
	fd, err := c.openDir(parent)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Mkdirat(fd, base, 0o755); err != nil && err != unix.EEXIST {
		return fmt.Errorf("uploads: mkdir %s: %w", p, err)
	}
	if !c.isDirInRoot(p) {
		return fmt.Errorf("uploads: %s exists and is not a directory", p)
	}
	return nil
}

func copyBody(fd int, r io.Reader, size int64) error {
	buf := make([]byte, 128<<10)
	var done int64
	for done < size {
		n, err := r.Read(buf[:min(int64(len(buf)), size-done)])
		if n > 0 {
			if _, werr := writeAll(fd, buf[:n]); werr != nil {
				return werr
			}
			done += int64(n)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%w: %v", ErrBadUpload, err)
		}
	}
	if done != size {
		return fmt.Errorf("%w: truncated file", ErrBadUpload)
	}
	return nil
}

func writeAll(fd int, b []byte) (int, error) {
	total := 0
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return total, err
		}
		total += n
		b = b[n:]
	}
	return total, nil
}

func times(t time.Time) []unix.Timespec {
	ts := unix.NsecToTimespec(t.UnixNano())
	return []unix.Timespec{ts, ts}
}
