package microvm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/cubicle-dev/cubicle/runtime"
)

// TestVolumesRefused: the VMM has no device that shares a host directory,
// so a sandbox with volumes is refused with ErrUnsupported before anything
// is made for it.
func TestVolumesRefused(t *testing.T) {
	state := t.TempDir()
	r := &Runtime{opts: Options{StateDir: state}}
	_, err := r.Create(context.Background(), runtime.Config{
		ID: "vol1", CPUCount: 1, MemoryMB: 256, DiskSizeMB: 1024,
		Volumes: []runtime.VolumeMount{{HostDir: t.TempDir(), Path: "/data"}},
	})
	if !errors.Is(err, runtime.ErrUnsupported) {
		t.Fatalf("Create with volumes = %v, want ErrUnsupported", err)
	}
	if _, err := os.Stat(filepath.Join(state, "vol1")); !os.IsNotExist(err) {
		t.Fatalf("a refused create left its directory: %v", err)
	}
}
