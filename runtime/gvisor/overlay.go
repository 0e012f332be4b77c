package gvisor

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The sandbox's root filesystem is a host overlayfs (lower = the template's
// rootfs, upper and work on the sandbox's own disk, see disk.go) given to
// runsc with --overlay2=none. runsc's own overlay (--overlay2=root:self or
// root:dir=...) was measured and rejected:
//
//   - runsc's gofer creates bind-mount points (/.cubicle/envd) in the root
//     directory it is given; with runsc's overlay that is the template
//     itself, which must never be written. With a host overlay they land
//     in the sandbox's upper layer.
//   - root:self also puts its filestore file inside the root directory,
//     i.e. inside the template.
//   - root:dir=... keeps the upper layer in an unlinked host file, so the
//     disk a sandbox uses cannot be measured from the host, and the
//     layer's pages are charged to the sandbox's memory limit.
//
// A host overlay keeps the template untouched, every sandbox's writes apart,
// user xattrs (user.e2b.*) on the filesystem of the upper layer, and the
// disk used measurable from the host (statfs of the sandbox's disk, or the
// size of upper/ for a sandbox without one).

// mountOverlay mounts lower (read-only) under upper/work at target. upper
// and work may exist: a sandbox restored from a snapshot has the
// snapshot's.
func mountOverlay(lower, upper, work, target string) error {
	for _, d := range []string{upper, work, target} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	// nosuid: the template's setuid binaries (sudo) must work inside the
	// sandbox, where the sentry honours them (--allow-suid), never on the
	// host, where this mount is reachable by root only (the sandbox
	// directory is 0700) but a setuid root binary must not be a way in.
	if err := unix.Mount("overlay", target, "overlay", unix.MS_NODEV|unix.MS_NOSUID, opts); err != nil {
		return fmt.Errorf("mount overlay at %s: %w", target, err)
	}
	return nil
}

// checkLowerDir rejects paths overlayfs's option string cannot carry.
func checkLowerDir(path string) error {
	if !filepath.IsAbs(path) || strings.ContainsAny(path, ",:\\") {
		return fmt.Errorf("%w: RootFS %q must be an absolute path without ',', ':' or '\\'", ErrInvalidConfig, path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("%w: RootFS: %w", ErrInvalidConfig, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("%w: RootFS %q is not a directory", ErrInvalidConfig, path)
	}
	return nil
}

// unmountBusyWait bounds how long unmount waits for a busy mount to be let
// go. A gofer outlives `runsc delete` by a few milliseconds on a quiet host
// and by hundreds on a loaded one; a mount detached while it still holds
// it lingers until it exits, and so does the sandbox's loop device and
// the disk space its image reserved.
const unmountBusyWait = 3 * time.Second

// unmount unmounts target if it is mounted. A mount still busy (a gofer
// that has not exited yet) is retried, backing off, for up to
// unmountBusyWait and then detached, so that Kill never leaves a mount
// behind.
func unmount(target string) error {
	deadline := time.Now().Add(unmountBusyWait)
	delay := time.Millisecond
	for {
		err := unix.Unmount(target, 0)
		switch {
		case err == nil:
			continue // stacked mounts: unmount until none is left
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil // not a mount point (any more)
		case errors.Is(err, unix.EBUSY) && time.Now().Before(deadline):
			time.Sleep(delay)
			delay = min(2*delay, 100*time.Millisecond)
			continue
		case errors.Is(err, unix.EBUSY):
		default:
			return fmt.Errorf("unmount %s: %w", target, err)
		}
		break
	}
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("detach %s: %w", target, err)
	}
	return nil
}

// diskUsage is the disk space, in bytes, allocated to the files under dir
// (what du(1) reports), so sparse files count for what they really use.
// Only for sandboxes without a disk of their own: a walk costs a stat per
// file, statfs of a disk costs one call.
func diskUsage(dir string) (uint64, error) {
	var total uint64
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while walking
			}
			return err
		}
		fi, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			total += uint64(st.Blocks) * 512 // st_blocks is in 512-byte units
		}
		return nil
	})
	return total, err
}
