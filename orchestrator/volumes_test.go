package orchestrator

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/store"
)

// TestCreateWithVolumes: a sandbox with volumes is started cold with them
// (never a pooled slot, which was made without), its record keeps them,
// and bad mounts are refused before anything is made.
func TestCreateWithVolumes(t *testing.T) {
	w := newWorld(t, "100.89.9.0/24")
	o := w.orchestrator(t, 1)
	defer o.Close(context.Background())
	ctx := context.Background()
	p, err := o.poolFor("tiny")
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the pool to fill", func() bool { return len(p.ready) == 1 })
	pooled := (<-p.ready)
	p.ready <- pooled

	m := VolumeMount{VolumeMount: store.VolumeMount{VolumeID: "v1", Name: "data", Path: "/data"}, HostDir: t.TempDir()}
	in, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Minute, Volumes: []VolumeMount{m}})
	if err != nil {
		t.Fatal(err)
	}
	if in.ID == pooled.ID {
		t.Fatal("a sandbox with volumes was handed a pooled slot")
	}
	if len(in.Volumes) != 1 || in.Volumes[0] != m.VolumeMount {
		t.Fatalf("Info.Volumes = %+v", in.Volumes)
	}
	if err := health(t, in); err != nil {
		t.Fatal(err)
	}
	recs, _ := w.st.ListSandboxes(ctx)
	found := false
	for _, r := range recs {
		if r.ID == in.ID {
			found = len(r.Volumes) == 1 && r.Volumes[0] == m.VolumeMount
		}
	}
	if !found {
		t.Fatalf("the stored record lacks the volume: %+v", recs)
	}

	before, _ := w.rt.List(ctx)
	for _, bad := range []string{"/proc", "relative", "/"} {
		b := m
		b.Path = bad
		if _, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Minute, Volumes: []VolumeMount{b}}); !errors.Is(err, ErrInvalid) {
			t.Errorf("mount at %q: %v, want ErrInvalid", bad, err)
		}
	}
	if after, _ := w.rt.List(ctx); len(after) != len(before) {
		t.Fatalf("refused creates left sandboxes: %d before, %d after", len(before), len(after))
	}
}
