package oci

// The cache of unpacked images. Layout of a cache directory (mode 0700: the
// trees hold setuid binaries and device nodes of the images' choosing):
//
//	<key>/              an unpacked image; present only when complete
//	.<key>.lock         flock held while that image is looked up or unpacked
//	.<key>.tmp-<rand>/  the image being unpacked; renamed to <key> when
//	                    complete, or removed by the next unpacker if its
//	                    own died
//
// <key> is "v<CacheLayout>-<algorithm>-<hex>" of the image's manifest
// digest. Each image has its own lock, so unpacking one never waits for
// another.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
)

// CacheLayout is the version of what Unpack makes of an image. Change it
// whenever that changes, so that cached trees are unpacked again.
const CacheLayout = 1

// Cache keeps unpacked images under a directory, keyed by image digest, so
// that a second build from the same image unpacks nothing.
type Cache struct {
	// Dir is the cache directory; it is made, mode 0700, when missing.
	Dir string
}

// Key is the name of img's directory in a cache.
func Key(digest v1.Hash) string {
	return fmt.Sprintf("v%d-%s-%s", CacheLayout, digest.Algorithm, digest.Hex)
}

// Unpacked returns the directory holding img unpacked, and img's Config,
// unpacking it first when the cache lacks it. The directory is shared by
// every caller: use it read-only (as an overlay's lower layer, or copy
// it). Concurrent callers, in this process or others, unpack an image
// once; a failed unpack leaves nothing behind.
func (c Cache) Unpacked(ctx context.Context, img v1.Image) (string, Config, error) {
	cfg, err := ImageConfig(img)
	if err != nil {
		return "", Config{}, err
	}
	digest, err := v1.NewHash(cfg.Digest)
	if err != nil {
		return "", Config{}, fmt.Errorf("%w: digest %q: %w", ErrCorrupt, cfg.Digest, err)
	}
	key := Key(digest)
	dir := filepath.Join(c.Dir, key)
	if isDir(dir) {
		return dir, cfg, nil
	}
	if err := os.MkdirAll(c.Dir, 0o700); err != nil {
		return "", Config{}, fmt.Errorf("image cache: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(c.Dir, "."+key+".lock"))
	if err != nil {
		return "", Config{}, err
	}
	defer unlock()
	if isDir(dir) { // unpacked while we waited
		return dir, cfg, nil
	}
	// Under the lock nobody else unpacks this image: what is left is a
	// dead unpacker's.
	olds, _ := filepath.Glob(filepath.Join(c.Dir, "."+key+".tmp-*"))
	for _, o := range olds {
		os.RemoveAll(o)
	}
	tmp, err := os.MkdirTemp(c.Dir, "."+key+".tmp-")
	if err != nil {
		return "", Config{}, fmt.Errorf("image cache: %w", err)
	}
	done := false
	defer func() {
		if !done {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil { // MkdirTemp's 0700 would be the image's root's mode
		return "", Config{}, fmt.Errorf("image cache: %w", err)
	}
	if _, err := Unpack(ctx, img, tmp); err != nil {
		return "", Config{}, err
	}
	if err := syncFS(tmp); err != nil {
		return "", Config{}, fmt.Errorf("image cache: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return "", Config{}, fmt.Errorf("image cache: %w", err)
	}
	done = true
	if err := syncDir(c.Dir); err != nil {
		return "", Config{}, fmt.Errorf("image cache: %w", err)
	}
	return dir, cfg, nil
}

func isDir(p string) bool {
	fi, err := os.Lstat(p)
	return err == nil && fi.IsDir()
}

// lockFile takes an exclusive flock on path, waiting as long as ctx allows
// (flock(2) cannot be cancelled, so it polls).
func lockFile(ctx context.Context, path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("image cache lock: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("image cache lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("image cache lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// syncFS flushes the filesystem holding path: one call instead of an fsync
// per file of a tree of thousands.
func syncFS(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Syncfs(fd)
}

// syncDir fsyncs a directory, making a rename in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
