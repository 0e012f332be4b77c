package virtio

import "sync"

// Lifecycle is the part of Activate, Notify, Pause, Resume, Reset and Close
// that is the same for every device: one lock, the current activation,
// whether the device was closed, and the order in which each call stops and
// starts the device's goroutines. The device supplies only what differs: how
// it starts its goroutines for a driver's queues and stops them, what a reset
// drops and what Close releases.
//
// The lock guards the fields the device keeps across activations; stop and
// the functions passed in run with it held. The transport calls in with its
// own lock held (lock order: the transport's lock, then Lifecycle) and the
// device's goroutines never take it.
type Lifecycle struct {
	kicks     *Kicks
	stop      func()
	errClosed error

	mu     sync.Mutex
	start  func() // starts the current activation's goroutines; nil when none
	closed bool
}

// NewLifecycle returns the lifecycle of a device whose notifications arrive
// on kicks. stop stops the device's goroutines, returns once they have
// stopped, and does nothing when none run. errClosed is what Activate
// returns after Close.
func NewLifecycle(kicks *Kicks, stop func(), errClosed error) *Lifecycle {
	return &Lifecycle{kicks: kicks, stop: stop, errClosed: errClosed}
}

// Activate stops the goroutines of an earlier activation, calls prepare
// (unless nil), then start, which starts the goroutines for the driver's
// queues; Resume calls start again. If prepare fails, nothing runs and an
// earlier activation stays the one Resume restarts.
func (l *Lifecycle) Activate(prepare func() error, start func()) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return l.errClosed
	}
	l.stop()
	if prepare != nil {
		if err := prepare(); err != nil {
			return err
		}
	}
	l.start = start
	start()
	return nil
}

// Notify records the driver's notification for queue i. It never blocks and
// takes no lock, so vCPUs may call it in any state.
func (l *Lifecycle) Notify(i int) { l.kicks.Kick(i) }

// Pause stops the goroutines; the activation stays for Resume.
func (l *Lifecycle) Pause() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.stop()
}

// Resume starts the goroutines of the current activation again. It returns
// ErrNotActivated if there is none (never activated, reset, or closed).
func (l *Lifecycle) Resume() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.start == nil || l.closed {
		return ErrNotActivated
	}
	l.start()
	return nil
}

// Reset stops the goroutines, forgets the activation, calls drop (unless nil)
// to release what else belonged to the driver, and discards notifications
// still pending, so the next driver starts clean. After Close it does
// nothing: Close stopped everything for good.
func (l *Lifecycle) Reset(drop func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return
	}
	l.stop()
	l.start = nil
	if drop != nil {
		drop()
	}
	l.kicks.Take()
}

// Close stops the goroutines for good and calls release, whose error it
// returns; later calls return nil without calling release again.
func (l *Lifecycle) Close(release func() error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	l.stop()
	return release()
}
