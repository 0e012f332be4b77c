// Package sparse copies disk images without filling their holes: a
// sandbox's disk starts as a copy of a mostly empty image, and copying the
// empty part would cost host disk and time on every create. Snapshots
// are copied the same way.
package sparse

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"

	"golang.org/x/sys/unix"
)

// Copy copies src to a new file dst (created 0600; an existing dst is an
// error): a reflink where the file system shares extents (btrfs, XFS),
// otherwise only src's data extents, in the kernel where it can, so that
// src's holes stay holes.
func Copy(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = copyExtents(in, out, fi.Size())
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return err
}

func copyExtents(in, out *os.File, size int64) error {
	// A reflink shares every extent at once (btrfs, XFS); ext4 refuses.
	if unix.IoctlFileClone(int(out.Fd()), int(in.Fd())) == nil {
		return nil
	}
	if err := out.Truncate(size); err != nil {
		return err
	}
	for off := int64(0); off < size; {
		start, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole is left
		}
		if err != nil {
			return fmt.Errorf("seek data: %w", err)
		}
		end, err := unix.Seek(int(in.Fd()), start, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("seek hole: %w", err)
		}
		if err := copyRange(in, out, start, end); err != nil {
			return err
		}
		off = end
	}
	return nil
}

// copyRange copies [start, end) of in to the same offsets of out, in the
// kernel where it can.
func copyRange(in, out *os.File, start, end int64) error {
	for roff, woff := start, start; roff < end; {
		n, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, int(end-roff), 0)
		if err != nil {
			if errors.Is(err, unix.EXDEV) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) {
				_, err = io.Copy(io.NewOffsetWriter(out, roff), io.NewSectionReader(in, roff, end-roff))
				return err
			}
			return fmt.Errorf("copy_file_range: %w", err)
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
	}
	return nil
}

// CopyTree copies the directory src to dst, which must not exist, with
// every owner, mode, xattr, hard and symbolic link as they are, keeping
// holes and sharing extents where the filesystem can (cp -a).
func CopyTree(ctx context.Context, src, dst string) error {
	out, err := exec.CommandContext(ctx, "cp", "-a", "--reflink=auto", "--sparse=auto", "--", src, dst).CombinedOutput()
	if err != nil {
		return fmt.Errorf("copy %s to %s: %v: %s", src, dst, err, bytes.TrimSpace(out))
	}
	return nil
}
