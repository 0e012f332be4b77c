package gvisor

import (
	"errors"
	"fmt"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// nullNetNS is the file in runsc's state root on which runsc bind-mounts an
// empty network namespace for its gofers to share (runsc/specutils:
// NullNetNSFilename). Concurrent first creates stack several mounts there.
const nullNetNS = "null-netns"

// Close releases what runsc keeps on the runtime's behalf but belongs to
// no sandbox: the stacked null-netns mounts in its state root, which would
// otherwise outlive the server and keep the data directory busy. Running
// gofers stay in that namespace as long as they live (a namespace lives while
// a process is in it), and the next sandbox's runsc mounts a new one, so
// this is safe with sandboxes still running. Sandboxes are not touched.
func (r *Runtime) Close() error {
	path := filepath.Join(r.runscRoot, nullNetNS)
	// The same loop as runsc's specutils.UnmountNullNetNS, with a bound.
	for range 64 {
		err := unix.Unmount(path, unix.MNT_DETACH)
		switch {
		case err == nil:
			continue
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil // not (or no longer) a mount point
		default:
			return fmt.Errorf("gvisor: unmount %s: %w", path, err)
		}
	}
	return fmt.Errorf("gvisor: %s still mounted after 64 unmounts", path)
}
