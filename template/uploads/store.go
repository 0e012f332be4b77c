// Package uploads keeps the files of template COPY steps and copies them
// into a build's root filesystem.
//
// The e2b SDK uploads, for every COPY step, a tar (gzip-compressed unless the
// step says gzip: false) of the matched files, named by the step's filesHash:
// it asks `GET /templates/{id}/files/{hash}` whether the server has it and,
// if not, PUTs the tar to the URL it gets back. Store keeps those tars in one
// directory, one file per hash, replaced atomically.
//
// What the hash is, and what the server can check: filesHash is the SDK's
// SHA-256 over "COPY <src> <dest>" and, for each matched path in order, its
// relative path, its st_mode and st_size and its content (or link target).
// The server cannot recompute it from the tar: a directory's st_size is not
// in a tar, the ignore patterns are the client's, and the src/dest pair is
// only known when a build names the hash. So the hash is a name the client
// chose, not a proof. The damage a wrong or hostile upload can do is bounded
// by: Put accepts only a well-formed tar within size and entry limits whose
// names all stay inside it; Open hands back the SHA-256 of the bytes actually
// stored, which buildspec.StepKey puts in the COPY step's cache key, so
// different bytes under the same name never reuse a cached step; and
// CopyInto never writes outside the root it is given. A re-upload (the SDK's
// forceUpload) replaces the stored tar, so a bad upload can be corrected.
package uploads

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

// Errors a caller maps to answers: ErrNotFound to 404, ErrBadUpload and
// ErrTooLarge to 400 (the upload is the client's fault).
var (
	ErrNotFound  = errors.New("no uploaded files with this hash")
	ErrBadUpload = errors.New("uploaded files are not a usable tar")
	ErrTooLarge  = errors.New("uploaded files are too large")
)

// Default limits. A template's COPY carries source trees, not datasets; the
// limits stop a client from filling the disk through one upload.
const (
	DefaultMaxUploadBytes   = 2 << 30 // as stored (compressed)
	DefaultMaxExpandedBytes = 8 << 30 // file bytes once unpacked
	DefaultMaxEntries       = 1 << 20
)

// Limits bound an upload. Zero fields take the defaults.
type Limits struct {
	MaxUploadBytes   int64
	MaxExpandedBytes int64
	MaxEntries       int
}

func (l Limits) withDefaults() Limits {
	if l.MaxUploadBytes <= 0 {
		l.MaxUploadBytes = DefaultMaxUploadBytes
	}
	if l.MaxExpandedBytes <= 0 {
		l.MaxExpandedBytes = DefaultMaxExpandedBytes
	}
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	return l
}

// Store is a directory of uploaded tars, <dir>/<filesHash>. It is safe for
// concurrent use: a file appears only by the rename of a complete, checked
// temporary file, so a reader sees an old whole tar or a new whole tar.
type Store struct {
	dir    string
	limits Limits
}

// Entry describes a stored upload.
type Entry struct {
	Hash string // the client's filesHash
	// Digest is the hex SHA-256 of the stored bytes; it belongs in the COPY
	// step's cache key (buildspec.StepKey's filesDigest).
	Digest string
	Size   int64 // bytes as stored
}

// New opens (creating if needed) a store in dir. Temporary files of
// uploads cut short by a crash are removed, so a directory has one Store
// (one server) at a time.
func New(dir string, limits Limits) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("uploads: %w", err)
	}
	stale, _ := filepath.Glob(filepath.Join(dir, ".put-*"))
	for _, p := range stale {
		os.Remove(p)
	}
	return &Store{dir: dir, limits: limits.withDefaults()}, nil
}

// Stored is one upload in List.
type Stored struct {
	Hash    string
	Size    int64
	ModTime time.Time // when it was uploaded
}

// List returns the stored uploads, for garbage collection.
func (s *Store) List() ([]Stored, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("uploads: %w", err)
	}
	var out []Stored
	for _, e := range ents {
		if !buildspec.ValidFilesHash(e.Name()) {
			continue
		}
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() {
			continue // removed meanwhile
		}
		out = append(out, Stored{Hash: e.Name(), Size: fi.Size(), ModTime: fi.ModTime()})
	}
	return out, nil
}

func (s *Store) path(hash string) (string, error) {
	if !buildspec.ValidFilesHash(hash) {
		return "", fmt.Errorf("%w: %q is not a files hash (64 lower-case hex digits)", ErrNotFound, hash)
	}
	return filepath.Join(s.dir, hash), nil
}

// Has reports whether files with hash are stored.
func (s *Store) Has(hash string) bool {
	p, err := s.path(hash)
	if err != nil {
		return false
	}
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular()
}

// Put stores the tar read from r under hash, replacing what was there. It
// reads at most the upload limit, checks that the bytes are a tar (plain
// or gzip) within the limits whose every name is relative and stays inside
// it, and only then makes it visible. A failed Put leaves nothing behind.
func (s *Store) Put(hash string, r io.Reader) (Entry, error) {
	dst, err := s.path(hash)
	if err != nil {
		return Entry{}, fmt.Errorf("%w: %q is not a files hash", ErrBadUpload, hash)
	}
	f, err := os.CreateTemp(s.dir, ".put-*")
	if err != nil {
		return Entry{}, fmt.Errorf("uploads: %w", err)
	}
	tmp := f.Name()
	fail := func(err error) (Entry, error) {
		f.Close()
		os.Remove(tmp)
		return Entry{}, err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), io.LimitReader(r, s.limits.MaxUploadBytes+1))
	if err != nil {
		return fail(fmt.Errorf("uploads: receive %s: %w", hash, err))
	}
	if n > s.limits.MaxUploadBytes {
		return fail(fmt.Errorf("%w: more than %d bytes", ErrTooLarge, s.limits.MaxUploadBytes))
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return fail(fmt.Errorf("uploads: %w", err))
	}
	if err := Check(f, s.limits); err != nil {
		return fail(err)
	}
	if err := f.Chmod(0o600); err != nil {
		return fail(fmt.Errorf("uploads: %w", err))
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("uploads: %w", err))
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return Entry{}, fmt.Errorf("uploads: %w", err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return Entry{}, fmt.Errorf("uploads: %w", err)
	}
	if d, err := os.Open(s.dir); err == nil {
		d.Sync()
		d.Close()
	}
	return Entry{Hash: hash, Digest: hex.EncodeToString(h.Sum(nil)), Size: n}, nil
}

// Open returns the stored tar for hash, positioned at its start, with its
// Entry. The digest is computed from the opened file itself, so it is the
// digest of exactly the bytes the caller reads, even if a concurrent Put
// replaces the name meanwhile. The caller closes the file.
func (s *Store) Open(hash string) (*os.File, Entry, error) {
	p, err := s.path(hash)
	if err != nil {
		return nil, Entry{}, err
	}
	f, err := os.Open(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, Entry{}, fmt.Errorf("%w: %s", ErrNotFound, hash)
	}
	if err != nil {
		return nil, Entry{}, fmt.Errorf("uploads: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, Entry{}, fmt.Errorf("uploads: read %s: %w", hash, err)
	}
	return f, Entry{Hash: hash, Digest: hex.EncodeToString(h.Sum(nil)), Size: n}, nil
}

// Remove deletes the files stored under hash (for garbage collection). A
// build that has the tar open keeps reading it.
func (s *Store) Remove(hash string) error {
	p, err := s.path(hash)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("uploads: %w", err)
	}
	return nil
}

// Check reads a whole upload (plain or gzip tar) and returns an error
// wrapping ErrBadUpload or ErrTooLarge unless it is a tar within limits
// whose every entry has a usable name and type.
func Check(r io.Reader, limits Limits) error {
	limits = limits.withDefaults()
	return walk(r, limits, func(*tar.Header, string, io.Reader) error { return nil })
}

// walk calls fn for every entry of the tar in r with its cleaned name.
func walk(r io.Reader, limits Limits, fn func(h *tar.Header, name string, body io.Reader) error) error {
	tr, err := tarReader(r)
	if err != nil {
		return err
	}
	var entries int
	var total int64
	for {
		h, err := tr.Next()
		if err == io.EOF {
			if entries == 0 {
				return fmt.Errorf("%w: the tar is empty", ErrBadUpload)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: %v", ErrBadUpload, err)
		}
		if h.Typeflag == tar.TypeXGlobalHeader {
			continue
		}
		entries++
		if entries > limits.MaxEntries {
			return fmt.Errorf("%w: more than %d entries", ErrTooLarge, limits.MaxEntries)
		}
		name, err := cleanName(h.Name)
		if err != nil {
			return err
		}
		for k := range h.PAXRecords {
			if strings.HasPrefix(k, "GNU.sparse.") {
				// archive/tar would expand the holes to as many zeros as
				// the header claims; no SDK writes sparse entries.
				return fmt.Errorf("%w: %q is a sparse file", ErrBadUpload, h.Name)
			}
		}
		switch h.Typeflag {
		case tar.TypeReg: // tar.Reader reports the old TypeRegA as TypeReg
			if h.Size < 0 {
				return fmt.Errorf("%w: %q has a negative size", ErrBadUpload, h.Name)
			}
			total += h.Size
			if total > limits.MaxExpandedBytes {
				return fmt.Errorf("%w: more than %d bytes of files", ErrTooLarge, limits.MaxExpandedBytes)
			}
		case tar.TypeDir:
		case tar.TypeSymlink:
			if h.Linkname == "" || strings.IndexByte(h.Linkname, 0) >= 0 {
				return fmt.Errorf("%w: symlink %q has a bad target", ErrBadUpload, h.Name)
			}
		case tar.TypeLink:
			if _, err := cleanName(h.Linkname); err != nil {
				return fmt.Errorf("%w: hard link %q points outside the tar", ErrBadUpload, h.Name)
			}
		default:
			return fmt.Errorf("%w: %q is a %s; only files, directories and links can be copied", ErrBadUpload, h.Name, typeName(h.Typeflag))
		}
		if name == "." && h.Typeflag != tar.TypeDir {
			return fmt.Errorf("%w: the tar's root is not a directory", ErrBadUpload)
		}
		if err := fn(h, name, tr); err != nil {
			return err
		}
	}
}

// tarReader opens a plain or gzip-compressed tar.
func tarReader(r io.Reader) (*tar.Reader, error) {
	br := bufio.NewReader(r)
	magic, _ := br.Peek(2)
	if len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadUpload, err)
		}
		zr.Multistream(true)
		return tar.NewReader(zr), nil
	}
	return tar.NewReader(br), nil
}

// cleanName turns a tar entry name into a clean relative path ("." for the
// root), refusing absolute names and names that climb out with "..".
func cleanName(n string) (string, error) {
	if n == "" || strings.IndexByte(n, 0) >= 0 {
		return "", fmt.Errorf("%w: entry with an empty or NUL-holding name", ErrBadUpload)
	}
	if strings.HasPrefix(n, "/") {
		return "", fmt.Errorf("%w: %q is an absolute path", ErrBadUpload, n)
	}
	c := path.Clean(n)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("%w: %q climbs out of the tar", ErrBadUpload, n)
	}
	return c, nil
}

func typeName(t byte) string {
	switch t {
	case tar.TypeChar:
		return "character device"
	case tar.TypeBlock:
		return "block device"
	case tar.TypeFifo:
		return "named pipe"
	}
	return fmt.Sprintf("tar entry of type %q", t)
}
