package gvisor

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/sparse"
)

// Config.DiskSizeMB is enforced by giving each sandbox's writable layer a
// filesystem of its own: an ext4 image of that size in the sandbox
// directory (disk.img), attached to a loop device and mounted at disk/,
// with the overlay's upper/ and work/ inside it (overlayfs needs both on
// one filesystem). A sandbox that fills it gets ENOSPC. The image's blocks
// are allocated on the host when it is made (reserveImage), so the data
// dir gives each sandbox its whole disk at once, and a host that cannot
// refuses the sandbox. The template's own files are in the lower layer
// and do not count. DiskSizeMB 0 keeps upper/ and work/
// directly in the sandbox directory, on the host's filesystem, without a
// limit; so do sandboxes made before disks were enforced (record.Disk is
// nil for both, and Stats and Kill handle them as before). So does a host
// without loop devices or mkfs.ext4 (diskSupport), with a warning at New:
// sandboxes still run there, unlimited.
//
// Formatting: every image of one size starts as the same bytes, so each
// size is formatted once into StateDir/disk-cache/ and a sandbox's image
// is a sparse copy of it (FICLONE where the filesystem shares extents,
// else only the data extents, found with SEEK_DATA/SEEK_HOLE). Measured
// on the development VM (2 cores, ext4 data dir), median of 30: mkfs.ext4
// per sandbox 2.6 ms (64 MiB), 2.4 ms (1 GiB), 2.8 ms (10 GiB); the copy
// 0.08, 0.07 and 0.12 ms (48, 76 and 160 KiB of data). All sandboxes of
// one size share the filesystem UUID, which ext4 does not mind.
//
// Options, chosen because the disk lives exactly as long as its sandbox:
//
//   - No journal (^has_journal) and no write barriers (nobarrier): a host
//     crash ends the sandbox anyway (its processes, loop device and mounts
//     die with the host, and Kill then deletes the image), so the
//     filesystem never has to survive one. With barriers each ext4 flush
//     (about seven over a sandbox's start and Kill, and one per fsync in
//     the sandbox) became an fsync of disk.img on the host: Create took
//     4 to 10 ms longer in runsc. (No journal also makes mkfs's
//     lazy_journal_init moot.)
//   - ^resize_inode: the disk is never grown online; the GDT blocks it
//     reserves are 4 MiB of a 10 GiB image to copy.
//   - lazy_itable_init and noinit_itable: the inode tables are never
//     zeroed (ext4 tracks which inodes were ever used, so this is safe),
//     not even in the background, which would be I/O for nothing.
//   - nodiscard: a fresh image is all holes; mkfs need not punch them.
//   - -m 0: the whole disk is the sandbox's, none reserved for a host
//     root that never logs in to it. The inode tables, and 2% (at most
//     4096 blocks) that ext4 keeps back for its own metadata, are still
//     taken: a 64 MiB disk holds about 57 MiB of files.
//   - The image is not discarded into: space a sandbox frees stays
//     allocated in disk.img until Kill (at most DiskSizeMB).

const (
	// diskImage is the sandbox's ext4 image in its directory.
	diskImage = "disk.img"
	// diskMount is where the image is mounted; upper/ and work/ are in it.
	diskMount = "disk"
	// diskCacheDir is StateDir's subdirectory of formatted images, one per
	// size. Its name holds a '-', so no sandbox ID can clash with it.
	diskCacheDir = "disk-cache"
)

// mkfsArgs are mkfs.ext4's options; they are part of the cache key, so a
// change to them never reuses an image formatted with the old ones.
var mkfsArgs = []string{"-q", "-F", "-m", "0", "-O", "^has_journal,^resize_inode",
	"-E", "lazy_itable_init=1,nodiscard"}

// diskMountData are the ext4 mount options (see above). errors=remount-ro:
// a disk that meets an I/O error stops taking writes (the sandbox gets
// EROFS) instead of going on as if they had landed.
const diskMountData = "noinit_itable,nobarrier,errors=remount-ro"

// disk is what sandbox.json records of a sandbox's own filesystem.
type disk struct {
	// BaseUsed is the bytes the fresh filesystem used before the sandbox
	// wrote anything (root directory, lost+found): Stats leaves them out.
	BaseUsed uint64 `json:"baseUsed"`
}

// diskSupport says why this host cannot make sandbox disks, or "" when it
// can: they need mkfs.ext4 and loop devices (absent in some containers).
func diskSupport() string {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		return "mkfs.ext4 not found (install e2fsprogs)"
	}
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Sprintf("no loop devices: %v", err)
	}
	ctl.Close()
	return ""
}

// setupDisk makes the sandbox's disk: copies from (a snapshot's disk), or
// else a formatted image of sizeMB, into dir, attaches it to a loop device and mounts it at dir/disk. On
// error what it made is left for Kill (unmountDisk, RemoveAll) to remove;
// a loop device without a mount detaches itself (LO_FLAGS_AUTOCLEAR).
func (r *Runtime) setupDisk(dir string, sizeMB int, from string) (*disk, error) {
	src := from
	if src == "" {
		var err error
		if src, err = r.cachedImage(sizeMB); err != nil {
			return nil, err
		}
	}
	img := filepath.Join(dir, diskImage)
	if err := sparse.Copy(src, img); err != nil {
		return nil, fmt.Errorf("copy disk image: %w", err)
	}
	if err := reserveImage(img, sizeMB); err != nil {
		return nil, err
	}
	target := filepath.Join(dir, diskMount)
	if err := os.Mkdir(target, 0o755); err != nil {
		return nil, err
	}
	// The loop device is set to clear itself (LO_FLAGS_AUTOCLEAR) when
	// its last user goes: once mounted that is the mount, so unmounting
	// frees the device and nothing has to remember which one it was; if
	// the mount fails, closing it here frees it.
	loop, dev, err := attachLoop(img)
	if err != nil {
		return nil, err
	}
	defer loop.Close()
	if err := unix.Mount(dev, target, "ext4", unix.MS_NOSUID|unix.MS_NODEV, diskMountData); err != nil {
		// A cached image that does not mount (damaged on the host's disk)
		// would fail every sandbox of its size: the next Create formats
		// a new one. Sandboxes copying it now keep their open file. A
		// snapshot's disk is not the cache's to remove.
		if from != "" {
			return nil, fmt.Errorf("mount %s (%s, a copy of %s) at %s: %w", dev, img, from, target, err)
		}
		if rerr := os.Remove(src); rerr == nil {
			r.log.Warn("removed the cached disk image after a failed mount", "path", src, "err", err)
		}
		return nil, fmt.Errorf("mount %s (%s) at %s: %w", dev, img, target, err)
	}
	used, err := usedBytes(target)
	if err != nil {
		return nil, err
	}
	return &disk{BaseUsed: used}, nil
}

// reserveImage allocates every block of the image on the host, so that
// the sandbox's disk can hold all it promises whatever else fills the data
// directory. A sparse image over-commits the host: once its filesystem is
// full, the loop device's writes into holes fail, the sandbox's ext4 logs
// "lost async page write" and what the sandbox was told it had written is
// gone. A host without the room refuses the sandbox instead, with ENOSPC.
// The blocks are allocated unwritten: fallocate writes nothing, and the
// image's data extents (copied from the cache) stay as they are. Measured
// on the development VM (2 cores, ext4 data dir), median of 20: fallocate
// 0.02 ms for 64 MiB, 1.6 ms for 1 GiB, 2.9 ms for 2 GiB (E2B's default),
// 10.6 ms for 10 GiB; Kill's unlink then takes 0.2, 1.7, 3.0 and 8.4 ms.
// The price is the space: a pooled sandbox holds its whole disk too.
func reserveImage(img string, sizeMB int) error {
	f, err := os.OpenFile(img, os.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(sizeMB)<<20); err != nil {
		return fmt.Errorf("reserve %d MiB for the disk image on the host: %w", sizeMB, err)
	}
	return nil
}

// upperDirs are the overlay's upper and work dirs of the sandbox in dir:
// in its own filesystem when it has one.
func upperDirs(dir string, d *disk) (upper, work string) {
	if d != nil {
		dir = filepath.Join(dir, diskMount)
	}
	return filepath.Join(dir, "upper"), filepath.Join(dir, "work")
}

// cachedImage returns the formatted image of sizeMB in the cache, making
// it if needed. Concurrent makers each format a file of their own and
// rename it into place, so a reader only ever sees a complete image.
func (r *Runtime) cachedImage(sizeMB int) (string, error) {
	sum := sha256.Sum256([]byte(strings.Join(mkfsArgs, " ")))
	cache := filepath.Join(r.stateDir, diskCacheDir)
	path := filepath.Join(cache, fmt.Sprintf("ext4-%dm-%s.img", sizeMB, hex.EncodeToString(sum[:4])))
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if err := os.MkdirAll(cache, 0o700); err != nil {
		return "", fmt.Errorf("disk cache: %w", err)
	}
	f, err := os.CreateTemp(cache, "new-*.tmp")
	if err != nil {
		return "", fmt.Errorf("disk cache: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // a no-op once renamed
	err = f.Truncate(int64(sizeMB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return "", fmt.Errorf("disk cache: %w", err)
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		return "", fmt.Errorf("disk cache: %w (install e2fsprogs)", err)
	}
	if out, err := exec.Command(mkfs, append(mkfsArgs, tmp)...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("disk cache: mkfs.ext4: %w: %s", err, strings.TrimSpace(string(out)))
	}
	// Durable before it has its name: after a host crash a cached image
	// must be whole, or every sandbox of that size would fail to mount.
	if err := syncFile(tmp); err != nil {
		return "", fmt.Errorf("disk cache: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("disk cache: %w", err)
	}
	r.log.Info("formatted disk image", "sizeMB", sizeMB, "path", path)
	return path, nil
}

func syncFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// attachLoop binds img to a free loop device and returns the open device.
func attachLoop(img string) (*os.File, string, error) {
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, "", fmt.Errorf("loop device: %w", err)
	}
	defer ctl.Close()
	backing, err := os.OpenFile(img, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, "", err
	}
	defer backing.Close() // the loop device holds its own reference
	var lastErr error
	// Between LOOP_CTL_GET_FREE and binding, another creator (a Create
	// running in parallel, losetup) may take the same device: it then
	// answers EBUSY and the next free one is tried. Concurrent creators
	// are all handed the same device, so each round one of them wins: the
	// bound is on how many Creates may race, not on time.
	for range 256 {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, "", fmt.Errorf("loop device: LOOP_CTL_GET_FREE: %w", err)
		}
		dev := "/dev/loop" + strconv.Itoa(n)
		f, err := openLoop(dev)
		if err != nil {
			return nil, "", err
		}
		err = configureLoop(f, backing, img)
		if err == nil {
			return f, dev, nil
		}
		f.Close()
		if !errors.Is(err, unix.EBUSY) {
			return nil, "", fmt.Errorf("loop device %s: %w", dev, err)
		}
		lastErr = err
	}
	return nil, "", fmt.Errorf("loop device: no free device after retries: %w", lastErr)
}

// openLoop opens a loop device node. A device LOOP_CTL_GET_FREE has just
// added may not have its node in devtmpfs for a moment.
func openLoop(dev string) (*os.File, error) {
	for i := 0; ; i++ {
		f, err := os.OpenFile(dev, os.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil || !errors.Is(err, os.ErrNotExist) || i == 100 {
			if err != nil {
				err = fmt.Errorf("loop device: %w", err)
			}
			return f, err
		}
		time.Sleep(time.Millisecond)
	}
}

// configureLoop binds backing to the loop device f with autoclear, with
// LOOP_CONFIGURE (Linux 5.8+, one atomic call) or else the older
// LOOP_SET_FD and LOOP_SET_STATUS64 pair.
func configureLoop(f, backing *os.File, name string) error {
	info := unix.LoopInfo64{Flags: unix.LO_FLAGS_AUTOCLEAR}
	copy(info.File_name[:len(info.File_name)-1], name) // informational (losetup -a), may be cut
	err := unix.IoctlLoopConfigure(int(f.Fd()), &unix.LoopConfig{Fd: uint32(backing.Fd()), Info: info})
	if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOTTY) {
		return err
	}
	// An older kernel (as util-linux's losetup does on EINVAL and ENOTTY).
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_SET_FD, int(backing.Fd())); err != nil {
		return err
	}
	if err := unix.IoctlLoopSetStatus64(int(f.Fd()), &info); err != nil {
		// Unbound, it is anybody's device again.
		unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0)
		return fmt.Errorf("LOOP_SET_STATUS64: %w", err)
	}
	return nil
}

// unmountDisk unmounts the sandbox's disk (nothing for a sandbox without
// one); its loop device then clears itself.
func unmountDisk(dir string) error {
	return unmount(filepath.Join(dir, diskMount))
}

// usedBytes is what the filesystem mounted at target has in use. ext4
// reports its own metadata (inode tables, bitmaps) as outside f_blocks, so
// this is the files' blocks plus the little that a fresh filesystem uses.
// It fails if nothing is mounted there: the host's figures would be wrong.
func usedBytes(target string) (uint64, error) {
	var st, parent unix.Stat_t
	if err := unix.Stat(target, &st); err != nil {
		return 0, err
	}
	if err := unix.Stat(filepath.Dir(target), &parent); err != nil {
		return 0, err
	}
	if st.Dev == parent.Dev {
		return 0, fmt.Errorf("%s: disk is not mounted", target)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(target, &fs); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", target, err)
	}
	return (fs.Blocks - fs.Bfree) * uint64(fs.Bsize), nil
}
