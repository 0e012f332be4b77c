package oci

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"os"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"
)

var (
	// ErrCorrupt: a layer, config or manifest does not match its digest,
	// or cannot be decompressed or parsed (400: the image is broken).
	ErrCorrupt = errors.New("corrupt image")
	// ErrUnsafe: a layer holds an entry that names a path above the root
	// or cannot be applied safely (400: the image is hostile or broken).
	ErrUnsafe = errors.New("unsafe layer entry")
)

// Config is what a template build takes from an image's config.
type Config struct {
	// Digest is the image's manifest digest ("sha256:…"): what a cache of
	// anything made from the image is keyed by.
	Digest string
	// Env holds "KEY=value" entries, in the image's order.
	Env        []string
	WorkingDir string
	// User is the config's user: "", "name", "uid", "uid:gid" or
	// "name:group", to be resolved against the unpacked /etc/passwd.
	User       string
	Entrypoint []string
	Cmd        []string
}

// ImageConfig returns img's Config, after checking its manifest against
// the image's digest and its config against the manifest.
func ImageConfig(img v1.Image) (Config, error) {
	cfg, _, err := imageConfig(img)
	return cfg, err
}

func imageConfig(img v1.Image) (Config, *v1.ConfigFile, error) {
	digest, err := img.Digest()
	if err != nil {
		return Config{}, nil, fmt.Errorf("%w: manifest: %w", ErrCorrupt, err)
	}
	if err := verifyBlob(img.RawManifest, digest, "manifest"); err != nil {
		return Config{}, nil, err
	}
	cf, err := verifiedConfig(img)
	if err != nil {
		return Config{}, nil, err
	}
	c := cf.Config
	return Config{
		Digest:     digest.String(),
		Env:        c.Env,
		WorkingDir: c.WorkingDir,
		User:       c.User,
		Entrypoint: c.Entrypoint,
		Cmd:        c.Cmd,
	}, cf, nil
}

// verifiedConfig returns img's config file after checking it against the
// config digest in the manifest (go-containerregistry's ConfigName hashes
// whatever config it read, so it cannot tell).
func verifiedConfig(img v1.Image) (*v1.ConfigFile, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("%w: manifest: %w", ErrCorrupt, err)
	}
	if err := verifyBlob(img.RawConfigFile, m.Config.Digest, "config"); err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("%w: config: %w", ErrCorrupt, err)
	}
	return cf, nil
}

// verifyBlob checks that the bytes raw returns hash to want. Registries'
// blobs are checked by go-containerregistry already; a layout's or an
// archive's are not.
func verifyBlob(raw func() ([]byte, error), want v1.Hash, what string) error {
	b, err := raw()
	if err != nil {
		return fmt.Errorf("%w: %s: %w", ErrCorrupt, what, err)
	}
	if want.Algorithm != "sha256" {
		return fmt.Errorf("%w: %s digest %s: only sha256 is supported", ErrCorrupt, what, want)
	}
	sum := sha256.Sum256(b)
	if got := hex.EncodeToString(sum[:]); got != want.Hex {
		return fmt.Errorf("%w: %s is sha256:%s, its digest says %s", ErrCorrupt, what, got, want)
	}
	return nil
}

// Unpack applies img's layers, in order, to dst, which must be an empty
// directory or not exist yet (then it is made, mode 0755), and returns the
// image's Config. Each layer's content is checked against its diff ID as
// it is applied; so a corrupt layer is found only after part of it was
// written: on any error dst holds part of the image, and the caller must
// remove it (os.RemoveAll). Unpack never writes outside dst, whatever the
// layers hold.
func Unpack(ctx context.Context, img v1.Image, dst string) (Config, error) {
	cfg, cf, err := imageConfig(img)
	if err != nil {
		return Config{}, err
	}
	layers, err := img.Layers()
	if err != nil {
		return Config{}, fmt.Errorf("%w: layers: %w", ErrCorrupt, err)
	}
	// The diff IDs come from the config, which the manifest's digest
	// vouches for; a layer's own DiffID may be computed from whatever
	// blob is on disk.
	diffIDs := cf.RootFS.DiffIDs
	if len(diffIDs) != len(layers) {
		return Config{}, fmt.Errorf("%w: the manifest has %d layers, the config %d diff IDs", ErrCorrupt, len(layers), len(diffIDs))
	}
	root, err := openRoot(dst)
	if err != nil {
		return Config{}, err
	}
	defer unix.Close(root)
	for i, l := range layers {
		if err := ctx.Err(); err != nil {
			return Config{}, err
		}
		if err := unpackLayer(ctx, root, l, diffIDs[i]); err != nil {
			d, _ := l.Digest()
			return Config{}, fmt.Errorf("layer %d of %d (%s): %w", i+1, len(layers), d, err)
		}
	}
	return cfg, nil
}

// openRoot returns an O_PATH descriptor of dst, an empty directory, making
// it when missing.
func openRoot(dst string) (int, error) {
	if err := os.Mkdir(dst, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return -1, fmt.Errorf("unpack: %w", err)
	}
	f, err := os.Open(dst)
	if err != nil {
		return -1, fmt.Errorf("unpack: %w", err)
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if err != nil && err != io.EOF {
		return -1, fmt.Errorf("unpack: %s: %w", dst, err)
	}
	if len(names) > 0 {
		return -1, fmt.Errorf("unpack: %s is not empty", dst)
	}
	fd, err := unix.Open(dst, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("unpack: open %s: %w", dst, err)
	}
	return fd, nil
}

// unpackLayer applies layer l to the tree under root, checking its content
// against want, its diff ID.
func unpackLayer(ctx context.Context, root int, l v1.Layer, want v1.Hash) error {
	rc, err := l.Uncompressed()
	if err != nil {
		return streamError(err)
	}
	defer rc.Close()
	h := sha256.New()
	r := &recordingReader{r: io.TeeReader(ctxReader{ctx, rc}, h)}
	if err := applyTar(ctx, root, r); err != nil {
		if r.err != nil {
			return streamError(r.err)
		}
		return err
	}
	// Read to the very end: the tar's trailing padding belongs to the
	// diff ID, and go-containerregistry checks a registry blob's digest
	// only when its stream reaches EOF.
	if _, err := io.Copy(io.Discard, r); err != nil {
		return streamError(err)
	}
	if err := rc.Close(); err != nil {
		return streamError(err)
	}
	return checkSum(h, want)
}

func checkSum(h hash.Hash, want v1.Hash) error {
	if want.Algorithm != "sha256" {
		return fmt.Errorf("%w: diff ID %s: only sha256 is supported", ErrCorrupt, want)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want.Hex {
		return fmt.Errorf("%w: layer content is sha256:%s, the image config says %s", ErrCorrupt, got, want)
	}
	return nil
}

// streamError classifies an error from reading a layer: the network's
// failures and cancellations stay what they are; everything else
// (a digest mismatch, a truncated or malformed gzip/zstd stream) is the
// image's fault.
func streamError(err error) error {
	var nerr net.Error
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || errors.As(err, &nerr) {
		return fmt.Errorf("reading layer: %w", err)
	}
	return fmt.Errorf("%w: reading layer: %w", ErrCorrupt, err)
}

// recordingReader remembers the first error its reader returned (EOF
// aside), so that an apply failure caused by a broken stream is reported
// as the stream's.
type recordingReader struct {
	r   io.Reader
	err error
}

func (r *recordingReader) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF && r.err == nil {
		r.err = err
	}
	return n, err
}

// ctxReader stops reading once ctx is done: a layer read from disk knows
// no context of its own, and one file of it can be gigabytes.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}
