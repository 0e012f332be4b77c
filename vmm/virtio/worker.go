package virtio

// Worker runs a device's processing goroutine and stops it on demand. It is
// not safe for concurrent use: the device calls Start and Stop under its
// lifecycle lock.
type Worker struct {
	stop chan struct{}
	done chan struct{}
}

// Start runs run on a new goroutine unless one is already running. run must
// return soon after stop is closed.
func (w *Worker) Start(run func(stop <-chan struct{})) {
	if w.stop != nil {
		return
	}
	w.stop, w.done = make(chan struct{}), make(chan struct{})
	stop, done := w.stop, w.done
	go func() {
		defer close(done)
		run(stop)
	}()
}

// Stop closes the stop channel and waits for the goroutine to return. It is a
// no-op when nothing runs.
func (w *Worker) Stop() {
	if w.stop == nil {
		return
	}
	close(w.stop)
	<-w.done
	w.stop, w.done = nil, nil
}

// Running reports whether the goroutine was started and not stopped.
func (w *Worker) Running() bool { return w.stop != nil }
