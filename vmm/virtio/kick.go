package virtio

import "sync/atomic"

// Kicks coalesces queue notifications for one device worker goroutine. The
// transport calls Kick from vCPU goroutines (or an ioeventfd goroutine); the
// worker waits on C and then calls Take to learn which queues were kicked.
// Kick never blocks: a burst of notifications becomes one wakeup with the
// union of the queue bits. The zero value is not usable; call NewKicks.
type Kicks struct {
	pending atomic.Uint64
	ch      chan struct{}
}

// NewKicks returns an empty Kicks.
func NewKicks() *Kicks { return &Kicks{ch: make(chan struct{}, 1)} }

// Kick records a notification for queue (0..63; others are ignored) and wakes
// the worker.
func (k *Kicks) Kick(queue int) {
	if queue < 0 || queue >= 64 {
		return
	}
	k.pending.Or(1 << uint(queue))
	select {
	case k.ch <- struct{}{}:
	default:
	}
}

// C is readable when at least one Kick happened since the last Take.
func (k *Kicks) C() <-chan struct{} { return k.ch }

// Take returns and clears the set of kicked queues (bit i = queue i).
func (k *Kicks) Take() uint64 { return k.pending.Swap(0) }
