package orchestrator

import (
	"context"
	"errors"
	"fmt"

	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/store"
)

// VolumeMount is a volume to mount into a new sandbox: what its record
// keeps (which volume, where), and where the volume's files are on the
// host.
type VolumeMount struct {
	store.VolumeMount
	HostDir string
}

// takeFor hands out a slot for req: a pooled one, or, for a sandbox with
// volumes, a cold one started with them (pooled slots are made before
// anyone asks for a volume). A backend that cannot mount volumes refuses
// the request as invalid; nothing is left made.
func (p *pool) takeFor(ctx context.Context, req CreateRequest) (slot, error) {
	if len(req.Volumes) == 0 {
		return p.take(ctx)
	}
	vs := make([]runtime.VolumeMount, len(req.Volumes))
	for i, v := range req.Volumes {
		vs[i] = runtime.VolumeMount{HostDir: v.HostDir, Path: v.Path}
	}
	if err := runtime.CheckVolumes(vs); err != nil {
		return slot{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	s, err := p.startWith(ctx, false, vs)
	if errors.Is(err, runtime.ErrUnsupported) {
		return slot{}, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return s, err
}

// recordVolumes is what a sandbox's record keeps of its volumes.
func recordVolumes(vs []VolumeMount) []store.VolumeMount {
	if len(vs) == 0 {
		return nil
	}
	out := make([]store.VolumeMount, len(vs))
	for i, v := range vs {
		out[i] = v.VolumeMount
	}
	return out
}
