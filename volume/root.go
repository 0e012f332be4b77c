package volume

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Root is one volume opened for content operations. Every path it is given
// is a path inside the volume ("/" is the volume's root); see Clean.
//
// How paths are confined: the volume's directory is held open (an O_PATH
// descriptor); a path is resolved from it with openat2 RESOLVE_IN_ROOT, so
// ".." and absolute symlinks inside the volume resolve against the
// volume's root, never the host's, and RESOLVE_NO_MAGICLINKS |
// RESOLVE_NO_XDEV refuse /proc-style links and mount crossings. An
// operation that creates, changes or removes an entry resolves its parent
// that way and then acts on the last component relative to the parent's
// descriptor without following it (O_NOFOLLOW, AT_SYMLINK_NOFOLLOW,
// unlinkat, renameat), so a symlink that a sandbox swaps in at the last
// moment is acted on as a symlink, never through.
type Root struct {
	fd  int
	dir string
}

// maxEntries bounds one directory listing.
const maxEntries = 100_000

// maxDepth bounds recursion (listing depth, recursive removal): each level
// holds a descriptor open.
const maxDepth = 256

// OpenRoot opens the volume whose host directory is dir.
func OpenRoot(dir string) (*Root, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("volume: open %s: %w", dir, err)
	}
	return &Root{fd: fd, dir: dir}, nil
}

// Close releases the volume.
func (r *Root) Close() error { return unix.Close(r.fd) }

// Clean turns a request's path into the canonical path inside the volume:
// absolute, lexically cleaned ("/a/../b" is "/b", ".." above the root
// stays at the root), with no NUL byte.
func Clean(p string) (string, error) {
	if strings.IndexByte(p, 0) >= 0 {
		return "", fmt.Errorf("%w: the path holds a NUL byte", ErrInvalid)
	}
	if len(p) > unix.PathMax {
		return "", fmt.Errorf("%w: the path is longer than %d bytes", ErrInvalid, unix.PathMax)
	}
	return path.Clean("/" + p), nil
}

// rel is p (a Clean path) relative to the volume's root, as openat2 wants it.
func rel(p string) string {
	if p == "/" {
		return "."
	}
	return p[1:]
}

// resolveFlags confine a resolution to the volume.
const resolveFlags = unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// openIn opens p (a Clean path) inside the volume.
func (r *Root) openIn(p string, flags int, mode uint32) (int, error) {
	how := &unix.OpenHow{Flags: uint64(flags | unix.O_CLOEXEC), Mode: uint64(mode), Resolve: resolveFlags}
	for range 64 {
		fd, err := unix.Openat2(r.fd, rel(p), how)
		// EAGAIN: a rename anywhere on the host raced the resolution
		// (RESOLVE_IN_ROOT's guard against escapes); try again.
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		return fd, mapErr(err)
	}
	return -1, fmt.Errorf("volume: resolving %s: the file system kept changing", p)
}

// mapErr turns errno values into the package's errors.
func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENOENT):
		return fmt.Errorf("%w (%v)", ErrNotFound, err)
	case errors.Is(err, unix.EEXIST):
		return fmt.Errorf("%w (%v)", ErrExists, err)
	case errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.EISDIR), errors.Is(err, unix.ELOOP),
		errors.Is(err, unix.EXDEV), errors.Is(err, unix.ENAMETOOLONG), errors.Is(err, unix.ENOTEMPTY),
		errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENXIO):
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return fmt.Errorf("volume: %w", err)
}

// parent opens the directory that holds p's last component, and returns
// that component ("" for the root).
func (r *Root) parent(p string) (fd int, base string, err error) {
	if p == "/" {
		fd, err = unix.Dup(r.fd)
		return fd, "", err
	}
	dir, base := path.Split(p)
	fd, err = r.openIn(path.Clean(dir), unix.O_PATH|unix.O_DIRECTORY, 0)
	return fd, base, err
}

// Entry is what the content API says of one file, directory or symlink.
type Entry struct {
	Name string
	// Path is the entry's path inside the volume.
	Path string
	// Type is "file", "directory", "symlink" or "unknown".
	Type string
	Size int64
	// Mode is the permission bits, setuid, setgid and sticky included.
	Mode     uint32
	UID, GID uint32
	Atime    time.Time
	Mtime    time.Time
	Ctime    time.Time
	// Target is a symlink's target, as written.
	Target string
}

func entryOf(p string, st *unix.Stat_t) Entry {
	e := Entry{
		Name:  path.Base(p),
		Path:  p,
		Size:  st.Size,
		Mode:  st.Mode & 0o7777,
		UID:   st.Uid,
		GID:   st.Gid,
		Atime: time.Unix(st.Atim.Unix()).UTC(),
		Mtime: time.Unix(st.Mtim.Unix()).UTC(),
		Ctime: time.Unix(st.Ctim.Unix()).UTC(),
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		e.Type = "file"
	case unix.S_IFDIR:
		e.Type = "directory"
	case unix.S_IFLNK:
		e.Type = "symlink"
	default:
		e.Type = "unknown"
	}
	return e
}

// statAt describes name in directory dirfd without following it; name ""
// describes dirfd itself.
func statAt(dirfd int, name, p string) (Entry, error) {
	var st unix.Stat_t
	flags := unix.AT_SYMLINK_NOFOLLOW
	if name == "" {
		flags = unix.AT_EMPTY_PATH
	}
	if err := unix.Fstatat(dirfd, name, &st, flags); err != nil {
		return Entry{}, mapErr(err)
	}
	e := entryOf(p, &st)
	if e.Type == "symlink" {
		buf := make([]byte, unix.PathMax)
		if n, err := unix.Readlinkat(dirfd, name, buf); err == nil {
			e.Target = string(buf[:n])
		}
	}
	return e, nil
}

// Stat describes p; a symlink is described, not followed.
func (r *Root) Stat(p string) (Entry, error) {
	p, err := Clean(p)
	if err != nil {
		return Entry{}, err
	}
	dfd, base, err := r.parent(p)
	if err != nil {
		return Entry{}, err
	}
	defer unix.Close(dfd)
	return statAt(dfd, base, p)
}

// List describes what directory p holds, and, for depth > 1, what its
// subdirectories hold down to depth levels (symlinks are listed, never
// entered).
func (r *Root) List(p string, depth int) ([]Entry, error) {
	p, err := Clean(p)
	if err != nil {
		return nil, err
	}
	if depth < 1 || depth > maxDepth {
		return nil, fmt.Errorf("%w: depth must be between 1 and %d", ErrInvalid, maxDepth)
	}
	fd, err := r.openIn(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, err
	}
	out := []Entry{}
	err = listAt(fd, p, depth, &out)
	return out, err
}

// listAt lists directory fd (at path p), closing it.
func listAt(fd int, p string, depth int, out *[]Entry) error {
	f := os.NewFile(uintptr(fd), p)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return mapErr(err)
	}
	for _, name := range names {
		if len(*out) >= maxEntries {
			return fmt.Errorf("%w: more than %d entries: list with a smaller depth", ErrInvalid, maxEntries)
		}
		cp := path.Join(p, name)
		e, err := statAt(fd, name, cp)
		if errors.Is(err, ErrNotFound) {
			continue // removed while listing
		}
		if err != nil {
			return err
		}
		*out = append(*out, e)
		if e.Type != "directory" || depth <= 1 {
			continue
		}
		cfd, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			continue // replaced or removed while listing
		}
		if err := listAt(cfd, cp, depth-1, out); err != nil {
			return err
		}
	}
	return nil
}

// Meta are the owner, group and mode a request sets; nil leaves one as
// it is (or as the default, for something new).
type Meta struct {
	UID, GID, Mode *uint32
}

func (m Meta) check() error {
	if m.Mode != nil && *m.Mode > 0o7777 {
		return fmt.Errorf("%w: mode %#o is not a permission mode (0 to 07777)", ErrInvalid, *m.Mode)
	}
	for _, id := range []*uint32{m.UID, m.GID} {
		if id != nil && *id == ^uint32(0) {
			return fmt.Errorf("%w: uid and gid must be below %d", ErrInvalid, ^uint32(0))
		}
	}
	return nil
}

// apply sets m on fd, an open file or directory (not O_PATH).
func (m Meta) apply(fd int, defMode uint32) error {
	uid, gid := -1, -1
	if m.UID != nil {
		uid = int(*m.UID)
	}
	if m.GID != nil {
		gid = int(*m.GID)
	}
	if uid != -1 || gid != -1 {
		if err := unix.Fchown(fd, uid, gid); err != nil {
			return mapErr(err)
		}
	}
	mode := defMode
	if m.Mode != nil {
		mode = *m.Mode
	}
	// After chown, which clears setuid and setgid bits.
	return mapErr(unix.Fchmod(fd, mode))
}

// mkdirAll makes directory p and its parents as needed, each resolved
// inside the volume, and returns p open (O_PATH).
func (r *Root) mkdirAll(p string) (int, error) {
	fd, err := r.openIn(p, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err == nil || !errors.Is(err, ErrNotFound) {
		return fd, err
	}
	cur := "/"
	for _, comp := range strings.Split(p[1:], "/") {
		dfd, err := r.openIn(cur, unix.O_PATH|unix.O_DIRECTORY, 0)
		if err != nil {
			return -1, err
		}
		err = unix.Mkdirat(dfd, comp, 0o755)
		unix.Close(dfd)
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return -1, mapErr(err)
		}
		cur = path.Join(cur, comp)
	}
	return r.openIn(p, unix.O_PATH|unix.O_DIRECTORY, 0)
}

// MakeDir makes directory p; with parents, its missing parents too, and
// an existing directory at p is then no error.
func (r *Root) MakeDir(p string, parents bool, m Meta) (Entry, error) {
	p, err := Clean(p)
	if err != nil {
		return Entry{}, err
	}
	if err := m.check(); err != nil {
		return Entry{}, err
	}
	if p == "/" {
		if parents {
			return r.Stat(p)
		}
		return Entry{}, fmt.Errorf("%w: / is the volume's root", ErrExists)
	}
	dfd, base, err := r.parentOf(p, parents)
	if err != nil {
		return Entry{}, err
	}
	defer unix.Close(dfd)
	if err := unix.Mkdirat(dfd, base, 0o700); err != nil {
		if errors.Is(err, unix.EEXIST) && parents {
			if e, serr := statAt(dfd, base, p); serr == nil && e.Type == "directory" {
				return e, nil
			}
		}
		return Entry{}, mapErr(err)
	}
	fd, err := unix.Openat(dfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return Entry{}, mapErr(err)
	}
	defer unix.Close(fd)
	if err := m.apply(fd, 0o755); err != nil {
		return Entry{}, err
	}
	return statAt(fd, "", p)
}

// ReadFile opens regular file p for reading (symlinks followed inside the
// volume).
func (r *Root) ReadFile(p string) (*os.File, error) {
	p, err := Clean(p)
	if err != nil {
		return nil, err
	}
	fd, err := r.openIn(p, unix.O_RDONLY|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, mapErr(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, fmt.Errorf("%w: %s is not a regular file", ErrInvalid, p)
	}
	// Back to blocking reads (O_NONBLOCK only kept a FIFO from hanging
	// the open).
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, mapErr(err)
	}
	return os.NewFile(uintptr(fd), p), nil
}

// WriteFile replaces (or makes) regular file p with what body holds; with
// parents, missing parent directories are made. The content is written to
// a new file beside p and renamed over it, so that a sandbox reading p
// sees the old content or the new, never a mix, and a symlink at p is
// replaced, not written through.
func (r *Root) WriteFile(p string, body io.Reader, parents bool, m Meta) (Entry, error) {
	p, err := Clean(p)
	if err != nil {
		return Entry{}, err
	}
	if err := m.check(); err != nil {
		return Entry{}, err
	}
	if p == "/" {
		return Entry{}, fmt.Errorf("%w: / is the volume's root directory", ErrInvalid)
	}
	dfd, base, err := r.parentOf(p, parents)
	if err != nil {
		return Entry{}, err
	}
	defer unix.Close(dfd)
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, base, &st, unix.AT_SYMLINK_NOFOLLOW); err == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
		return Entry{}, fmt.Errorf("%w: %s is a directory", ErrInvalid, p)
	}
	tmp := ".cubicle-upload-" + randomName()
	fd, err := unix.Openat(dfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return Entry{}, mapErr(err)
	}
	f := os.NewFile(uintptr(fd), tmp)
	done := false
	defer func() {
		f.Close()
		if !done {
			unix.Unlinkat(dfd, tmp, 0)
		}
	}()
	if _, err := io.Copy(f, body); err != nil {
		return Entry{}, fmt.Errorf("volume: writing %s: %w", p, err)
	}
	if err := m.apply(int(f.Fd()), 0o644); err != nil {
		return Entry{}, err
	}
	if err := unix.Renameat(dfd, tmp, dfd, base); err != nil {
		return Entry{}, mapErr(err)
	}
	done = true
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return Entry{}, mapErr(err)
	}
	return entryOf(p, &st), nil
}

func randomName() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// SetMeta changes p's owner, group or mode; p itself, never what a
// symlink at p points to (a symlink's mode cannot be set).
func (r *Root) SetMeta(p string, m Meta) (Entry, error) {
	p, err := Clean(p)
	if err != nil {
		return Entry{}, err
	}
	if err := m.check(); err != nil {
		return Entry{}, err
	}
	dfd, base, err := r.parent(p)
	if err != nil {
		return Entry{}, err
	}
	defer unix.Close(dfd)
	fd := dfd // the root: the descriptor itself
	if base != "" {
		if fd, err = unix.Openat(dfd, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0); err != nil {
			return Entry{}, mapErr(err)
		}
		defer unix.Close(fd)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Entry{}, mapErr(err)
	}
	if m.UID != nil || m.GID != nil {
		uid, gid := -1, -1
		if m.UID != nil {
			uid = int(*m.UID)
		}
		if m.GID != nil {
			gid = int(*m.GID)
		}
		if err := unix.Fchownat(fd, "", uid, gid, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return Entry{}, mapErr(err)
		}
	}
	if m.Mode != nil {
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return Entry{}, fmt.Errorf("%w: %s is a symlink, which has no mode of its own", ErrInvalid, p)
		}
		// An O_PATH descriptor takes no fchmod; its /proc link names
		// exactly the inode it holds, whatever the path now points to.
		if err := unix.Fchmodat(unix.AT_FDCWD, "/proc/self/fd/"+strconv.Itoa(fd), *m.Mode, 0); err != nil {
			return Entry{}, mapErr(err)
		}
	}
	return statAt(fd, "", p)
}

// Remove deletes p, with everything under it when it is a directory; a
// symlink is removed, never followed. The volume's root cannot be removed.
func (r *Root) Remove(p string) error {
	p, err := Clean(p)
	if err != nil {
		return err
	}
	if p == "/" {
		return fmt.Errorf("%w: the volume's root cannot be removed (delete the volume instead)", ErrInvalid)
	}
	dfd, base, err := r.parent(p)
	if err != nil {
		return err
	}
	defer unix.Close(dfd)
	return removeAt(dfd, base, 0)
}

func removeAt(dfd int, name string, depth int) error {
	err := unix.Unlinkat(dfd, name, 0)
	if err == nil || !(errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EPERM)) {
		return mapErr(err)
	}
	if depth >= maxDepth {
		return fmt.Errorf("%w: directories nested deeper than %d", ErrInvalid, maxDepth)
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return mapErr(err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return mapErr(err)
	}
	for _, n := range names {
		if err := removeAt(fd, n, depth+1); err != nil && !errors.Is(err, ErrNotFound) {
			return err
		}
	}
	return mapErr(unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR))
}

// parentOf opens the directory holding p (made, with its parents, when
// parents is set) and returns it with p's last name.
func (r *Root) parentOf(p string, parents bool) (int, string, error) {
	dir, base := path.Split(p)
	dir = path.Clean(dir)
	if parents {
		fd, err := r.mkdirAll(dir)
		return fd, base, err
	}
	fd, err := r.openIn(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	return fd, base, err
}
