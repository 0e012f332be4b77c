package gvisor

import (
	"fmt"
	"os"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cubicle-dev/cubicle/runtime"
)

// Volumes are bind mounts of their host directories, read-write. runsc's
// gofer creates each mount point in the sandbox's root, which is the host
// overlay (overlay.go), so the directory lands in the sandbox's upper
// layer and never in the template; it resolves the mount point inside the
// root, so a symlink the sandbox's layer holds there cannot send it
// elsewhere on the host. Files in a bind mount are shared with the host
// and with other sandboxes: runsc's default --file-access-mounts=shared
// revalidates what the sentry caches, so that what one sandbox writes the
// others see.
//
// nosuid and nodev: a volume is written by any sandbox it was ever mounted
// in, as root; what one left there must not gain privileges in another.

// checkVolumes checks cfg.Volumes: paths, and host directories that exist.
func checkVolumes(cfg runtime.Config) error {
	if err := runtime.CheckVolumes(cfg.Volumes); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidConfig, err)
	}
	for _, v := range cfg.Volumes {
		fi, err := os.Stat(v.HostDir)
		if err != nil {
			return fmt.Errorf("%w: volume: %w", ErrInvalidConfig, err)
		}
		if !fi.IsDir() {
			return fmt.Errorf("%w: volume %q is not a directory", ErrInvalidConfig, v.HostDir)
		}
	}
	return nil
}

// volumeMounts are the spec's mounts of cfg.Volumes, after every other
// mount.
func volumeMounts(vs []runtime.VolumeMount) []specs.Mount {
	out := make([]specs.Mount, 0, len(vs))
	for _, v := range vs {
		out = append(out, specs.Mount{Destination: v.Path, Type: "bind", Source: v.HostDir,
			Options: []string{"rbind", "rw", "nosuid", "nodev"}})
	}
	return out
}
