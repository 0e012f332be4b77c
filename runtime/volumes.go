package runtime

import (
	"errors"
	"fmt"
	"path"
	"strings"
)

// ErrUnsupported is returned by a runtime's Create for a Config it cannot
// honour on its backend (e.g. Volumes where the backend cannot share a host
// directory read-write): the request's fault, not the host's.
var ErrUnsupported = errors.New("not supported by this backend")

// VolumeMount is a host directory shared read-write with a sandbox: a
// persistent volume (package volume) that outlives the sandbox and may be
// mounted into several at once.
type VolumeMount struct {
	// HostDir is the volume's directory on the host. What is in it is
	// untrusted: other sandboxes write there.
	HostDir string `json:"hostDir"`
	// Path is where it appears in the sandbox: see CheckMountPath.
	Path string `json:"path"`
}

// reservedPaths are the sandbox paths a volume may not cover (nor any path
// under them): the root, the kernel's file systems, and cubicle's own
// mounts (envd lives in /.cubicle).
var reservedPaths = []string{"/proc", "/dev", "/sys", "/.cubicle"}

// CheckMountPath says whether p may be a volume's mount point in a
// sandbox: absolute, clean, not / and not in reservedPaths.
func CheckMountPath(p string) error {
	switch {
	case p == "" || !path.IsAbs(p):
		return fmt.Errorf("volume mount path %q must be an absolute path", p)
	case path.Clean(p) != p:
		return fmt.Errorf("volume mount path %q is not clean (want %q)", p, path.Clean(p))
	case p == "/":
		return errors.New("a volume cannot be mounted at /")
	case strings.ContainsRune(p, 0) || len(p) > 4096:
		return fmt.Errorf("volume mount path %.64q is not a usable path", p)
	}
	for _, r := range reservedPaths {
		if p == r || strings.HasPrefix(p, r+"/") {
			return fmt.Errorf("volume mount path %q is reserved: a volume cannot be mounted at or under %s", p, r)
		}
	}
	return nil
}

// CheckVolumes checks every mount's path, and that no two mounts overlap
// (one at or under another's path).
func CheckVolumes(vs []VolumeMount) error {
	for i, v := range vs {
		if err := CheckMountPath(v.Path); err != nil {
			return err
		}
		if !path.IsAbs(v.HostDir) {
			return fmt.Errorf("volume host directory %q must be an absolute path", v.HostDir)
		}
		for _, w := range vs[:i] {
			if v.Path == w.Path || strings.HasPrefix(v.Path, w.Path+"/") || strings.HasPrefix(w.Path, v.Path+"/") {
				return fmt.Errorf("volume mount paths %q and %q overlap", w.Path, v.Path)
			}
		}
	}
	return nil
}
