// Package fsutil holds the file operations envd's filesystem RPCs and its /files
// endpoint share: creating directories owned by the requesting user, and user
// metadata kept as extended attributes.
package fsutil

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// MetadataXattrPrefix namespaces the extended attributes that hold the metadata a
// client attaches to a file (X-Metadata-<key> on upload, EntryInfo.metadata on read).
const MetadataXattrPrefix = "user.e2b."

// Limits on metadata, from the E2B envd OpenAPI description: a key must fit the Linux
// VFS xattr name limit (XATTR_NAME_MAX = 255) after the prefix, and all metadata of a
// file together must fit a typical per-inode xattr budget (one 4 KiB block).
const (
	MaxMetadataKeyLen   = 255 - len(MetadataXattrPrefix)
	MaxMetadataTotalLen = 4096
)

// MetadataHeaderPrefix introduces a metadata header on upload.
const MetadataHeaderPrefix = "X-Metadata-"

// ErrInvalidMetadata is returned for metadata that breaks the rules above.
var ErrInvalidMetadata = errors.New("invalid metadata")

// MkdirAllOwned creates dir and any missing parents with mode 0755, giving every
// directory it creates (and only those) to uid:gid when chown is true. Existing
// directories keep their owner.
func MkdirAllOwned(dir string, uid, gid int, chown bool) error {
	dir = filepath.Clean(dir)
	fi, err := os.Stat(dir)
	if err == nil {
		if !fi.IsDir() {
			return &os.PathError{Op: "mkdir", Path: dir, Err: unix.ENOTDIR}
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := MkdirAllOwned(parent, uid, gid, chown); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		// Lost a race with another creator: fine if what exists is a directory.
		if errors.Is(err, os.ErrExist) {
			if fi, statErr := os.Stat(dir); statErr == nil && fi.IsDir() {
				return nil
			}
		}
		return err
	}
	if chown {
		if err := os.Lchown(dir, uid, gid); err != nil {
			return err
		}
	}
	return nil
}

// ReadMetadata returns a file's metadata (prefix stripped), or nil when it has none
// or the filesystem keeps no user xattrs. Symlinks are not followed.
func ReadMetadata(path string) map[string]string {
	names, err := listXattrs(path)
	if err != nil {
		return nil
	}
	var md map[string]string
	for _, name := range names {
		key, ok := strings.CutPrefix(name, MetadataXattrPrefix)
		if !ok || key == "" {
			continue
		}
		val, err := getXattr(path, name)
		if err != nil {
			continue
		}
		if md == nil {
			md = map[string]string{}
		}
		md[key] = val
	}
	return md
}

// ReplaceMetadata makes md the file's complete metadata: keys not in md are removed.
// Setting metadata on a filesystem without user xattrs fails; clearing it (empty md)
// there succeeds, so plain uploads work everywhere.
func ReplaceMetadata(path string, md map[string]string) error {
	names, err := listXattrs(path)
	if err != nil && len(md) > 0 {
		return fmt.Errorf("list xattrs of %s: %w", path, err)
	}
	for _, name := range names {
		key, ok := strings.CutPrefix(name, MetadataXattrPrefix)
		if !ok {
			continue
		}
		if _, keep := md[key]; keep {
			continue
		}
		if err := unix.Lremovexattr(path, name); err != nil && !errors.Is(err, unix.ENODATA) {
			return fmt.Errorf("remove xattr %s of %s: %w", name, path, err)
		}
	}
	for k, v := range md {
		if err := unix.Lsetxattr(path, MetadataXattrPrefix+k, []byte(v), 0); err != nil {
			return fmt.Errorf("set xattr %s%s of %s: %w", MetadataXattrPrefix, k, path, err)
		}
	}
	return nil
}

// MetadataFromHeaders collects X-Metadata-<key> headers. Keys are lowercased (HTTP
// header names are case-insensitive, so that is the only stable spelling); when a
// header repeats, its first value wins.
func MetadataFromHeaders(h http.Header) (map[string]string, error) {
	var md map[string]string
	total := 0
	for name, vals := range h {
		if len(name) <= len(MetadataHeaderPrefix) || !strings.EqualFold(name[:len(MetadataHeaderPrefix)], MetadataHeaderPrefix) || len(vals) == 0 {
			continue
		}
		key := strings.ToLower(name[len(MetadataHeaderPrefix):])
		val := vals[0]
		if err := ValidateMetadata(key, val); err != nil {
			return nil, err
		}
		total += len(MetadataXattrPrefix) + len(key) + len(val)
		if total > MaxMetadataTotalLen {
			return nil, fmt.Errorf("%w: all metadata together exceeds %d bytes", ErrInvalidMetadata, MaxMetadataTotalLen)
		}
		if md == nil {
			md = map[string]string{}
		}
		md[key] = val
	}
	return md, nil
}

// ValidateMetadata checks one key/value pair: the key must be a non-empty HTTP token
// of at most MaxMetadataKeyLen bytes, the value printable US-ASCII.
func ValidateMetadata(key, val string) error {
	if key == "" || len(key) > MaxMetadataKeyLen {
		return fmt.Errorf("%w: key %q must be 1..%d bytes", ErrInvalidMetadata, key, MaxMetadataKeyLen)
	}
	for i := 0; i < len(key); i++ {
		if !isTokenChar(key[i]) {
			return fmt.Errorf("%w: key %q has a character that is not an HTTP token character", ErrInvalidMetadata, key)
		}
	}
	for i := 0; i < len(val); i++ {
		if val[i] < 0x20 || val[i] > 0x7e {
			return fmt.Errorf("%w: value of key %q must be printable US-ASCII", ErrInvalidMetadata, key)
		}
	}
	return nil
}

// isTokenChar reports whether c may appear in an HTTP token (RFC 9110 section 5.6.2).
func isTokenChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

func listXattrs(path string) ([]string, error) {
	size, err := unix.Llistxattr(path, nil)
	if err != nil || size == 0 {
		return nil, err
	}
	buf := make([]byte, size)
	n, err := unix.Llistxattr(path, buf)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name != "" {
			names = append(names, name)
		}
	}
	return names, nil
}

func getXattr(path, name string) (string, error) {
	size, err := unix.Lgetxattr(path, name, nil)
	if err != nil {
		return "", err
	}
	buf := make([]byte, size)
	n, err := unix.Lgetxattr(path, name, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}
