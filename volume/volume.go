// Package volume keeps the files of persistent volumes on the host (E2B's
// /volumes): one directory per volume, Dirs.Path(id), that outlives the
// sandboxes it is mounted into, and confined access to it for the volume
// content API (Root).
//
// What is in a volume is untrusted: any sandbox it is mounted into writes
// there as root, symlinks and odd names included, while the host reads and
// writes the same directory for the content API. So the host never
// resolves a path in a volume by name from the host's root: every request
// path is cleaned, then resolved by the kernel under the volume's
// directory with openat2(2) RESOLVE_IN_ROOT (".." and absolute symlinks
// stop at the volume's root, as in a chroot), and the last component of
// anything that changes or removes an entry is never followed. See
// root.go.
//
// Volumes have no size limit of their own: they fill the data directory's
// file system.
package volume

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
)

// Errors of volume operations, for the API to map.
var (
	// ErrNotFound: no such path in the volume.
	ErrNotFound = errors.New("path not found")
	// ErrExists: the path is taken.
	ErrExists = errors.New("path already exists")
	// ErrInvalid: a request that cannot be done (a path with a NUL byte,
	// a directory where a file is wanted, a mode out of range, removing
	// the volume's root).
	ErrInvalid = errors.New("invalid request")
)

// dirMode is the mode of a volume's own directory: every user of a sandbox
// may write there (processes run as the template's user, not root), as in
// a fresh /tmp. No host user reaches it: its parent is 0700.
const dirMode = 0o777

// validID restricts volume IDs to what is safe as a file name.
var validID = regexp.MustCompile(`^[a-z0-9]{1,64}$`)

// Dirs is the directory that holds every volume's directory.
type Dirs struct {
	root string
}

// Open returns the volumes under root (e.g. <data dir>/volumes), making
// root, root's alone (0700), if needed.
func Open(root string) (*Dirs, error) {
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("volume: %q is not an absolute path", root)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("volume: %w", err)
	}
	if err := os.Chmod(root, 0o700); err != nil {
		return nil, fmt.Errorf("volume: %w", err)
	}
	return &Dirs{root: root}, nil
}

func checkID(id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("volume: bad volume id %q", id)
	}
	return nil
}

// Path is the host directory of volume id, what a runtime mounts.
func (d *Dirs) Path(id string) string { return filepath.Join(d.root, id) }

// Create makes volume id's directory, empty.
func (d *Dirs) Create(id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	p := d.Path(id)
	if err := os.Mkdir(p, dirMode); err != nil {
		return fmt.Errorf("volume: %w", err)
	}
	// Past the umask.
	if err := os.Chmod(p, dirMode); err != nil {
		os.Remove(p)
		return fmt.Errorf("volume: %w", err)
	}
	return nil
}

// Remove deletes volume id's directory and everything in it; a volume
// with no directory is not an error. os.RemoveAll removes symlinks and
// never follows them.
func (d *Dirs) Remove(id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	if err := os.RemoveAll(d.Path(id)); err != nil {
		return fmt.Errorf("volume: %w", err)
	}
	return nil
}

// Root opens volume id for content operations; Close it after.
func (d *Dirs) Root(id string) (*Root, error) {
	if err := checkID(id); err != nil {
		return nil, err
	}
	return OpenRoot(d.Path(id))
}
