package virtio

import (
	"errors"
	"testing"
)

// fakeDevice records what its Lifecycle asks of it; a real device's worker
// goroutine is replaced by the activation it would serve.
type fakeDevice struct {
	serving         int // activation whose goroutines run; 0 when none
	starts, stops   int
	drops, releases int
}

// activation returns the start function of activation n.
func (f *fakeDevice) activation(n int) func() {
	return func() { f.serving = n; f.starts++ }
}

func (f *fakeDevice) stop() {
	if f.serving != 0 {
		f.serving = 0
		f.stops++
	}
}

var errFakeClosed = errors.New("closed")

func TestLifecycle(t *testing.T) {
	f, k := &fakeDevice{}, NewKicks()
	l := NewLifecycle(k, f.stop, errFakeClosed)
	if err := l.Resume(); !errors.Is(err, ErrNotActivated) {
		t.Fatalf("Resume before Activate = %v", err)
	}
	if err := l.Activate(nil, f.activation(1)); err != nil || f.serving != 1 {
		t.Fatalf("Activate = %v, %+v", err, f)
	}
	l.Pause()
	if f.serving != 0 {
		t.Fatal("running after Pause")
	}
	if err := l.Resume(); err != nil || f.serving != 1 {
		t.Fatalf("Resume = %v, %+v", err, f)
	}

	// A failed prepare leaves nothing running and the first activation in
	// place.
	errPrepare := errors.New("prepare")
	if err := l.Activate(func() error { return errPrepare }, f.activation(2)); !errors.Is(err, errPrepare) || f.serving != 0 {
		t.Fatalf("failed Activate = %v, %+v", err, f)
	}
	if err := l.Resume(); err != nil || f.serving != 1 {
		t.Fatalf("Resume after failed Activate = %v, %+v", err, f)
	}

	l.Notify(0)
	l.Reset(func() { f.drops++ })
	if f.serving != 0 || f.drops != 1 || k.Take() != 0 {
		t.Fatalf("Reset left %+v or kicks", f)
	}
	if err := l.Resume(); !errors.Is(err, ErrNotActivated) {
		t.Fatalf("Resume after Reset = %v", err)
	}

	if err := l.Activate(nil, f.activation(3)); err != nil || f.serving != 3 {
		t.Fatalf("second Activate = %v, %+v", err, f)
	}
	errRelease := errors.New("release")
	if err := l.Close(func() error { f.releases++; return errRelease }); !errors.Is(err, errRelease) || f.serving != 0 {
		t.Fatalf("Close = %v, %+v", err, f)
	}
	if err := l.Close(func() error { f.releases++; return nil }); err != nil || f.releases != 1 {
		t.Fatalf("second Close = %v, %+v", err, f)
	}
	l.Reset(func() { f.drops++ })
	if f.drops != 1 {
		t.Fatal("Reset after Close called drop")
	}
	if err := l.Activate(nil, f.activation(4)); !errors.Is(err, errFakeClosed) {
		t.Fatalf("Activate after Close = %v", err)
	}
	if err := l.Resume(); !errors.Is(err, ErrNotActivated) || f.serving != 0 {
		t.Fatalf("Resume after Close = %v, %+v", err, f)
	}
	if f.starts != f.stops {
		t.Fatalf("%d starts, %d stops", f.starts, f.stops)
	}
}
