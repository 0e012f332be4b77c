package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/cubicle-dev/cubicle/capacity"
)

// ErrHostFull is returned when the host cannot hold another sandbox
// (Options.Capacity refused it, or its disk could not be reserved).
var ErrHostFull = capacity.ErrFull

// Admission control (Options.Capacity): every sandbox start, a pool fill
// or a cold create, reserves the template's memory, vCPUs and disk before
// the runtime makes anything, and every destroy releases them, so nothing
// is half-made for a refused create.
//
// What yields when the host is full: pooled sandboxes. A pooled slot is
// spare capacity put to use, not a promise to anyone, so a cold create
// that is refused for memory or vCPUs destroys idle pooled slots (any
// template's) until it fits, waiting for fills under way to land so that
// it can reclaim them too; a pool fill that is refused waits (fill
// retries every fullRetry) instead of taking what a user create could
// have had.
// For disk, one slot is reclaimed at a time and its teardown waited for,
// since its image is only freed then: reclaiming on would drain the pools
// for nothing.

// admit reserves what a sandbox of t holds on the host. A cold create
// refused for memory or vCPUs reclaims pooled slots, waiting (up to
// fillWait) for fills under way to land, since they hold reservations too.
func (o *Orchestrator) admit(ctx context.Context, id string, t Template, pooled bool) error {
	l := o.opts.Capacity
	if l == nil {
		return nil
	}
	r := capacity.Resources{CPUs: t.CPUCount, MemoryMB: t.MemoryMB, DiskMB: t.DiskSizeMB}
	deadline := time.Now().Add(fillWait)
	for {
		err := l.Reserve(id, r)
		var full *capacity.FullError
		if err == nil || pooled || !errors.As(err, &full) {
			return err
		}
		// A destroyed sandbox's memory and vCPUs are free at once, its
		// disk only once its teardown has removed the image.
		disk := full.Resource == "disk"
		switch {
		case disk && o.destroying.Load() > 0:
			// wait for the space being freed before taking more
		case o.reclaimPooled():
			if !disk {
				continue
			}
		case o.filling.Load() == 0 && (!disk || o.destroying.Load() == 0):
			return err
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// fillWait bounds how long a refused create waits for pool fills under
// way, whose slots it would reclaim: about what a fill takes.
const fillWait = 30 * time.Second

// settle says the runtime has made (and allocated the disk of) id.
func (o *Orchestrator) settle(id string) {
	if o.opts.Capacity != nil {
		o.opts.Capacity.Settle(id)
	}
}

// release ends id's reservation. Every path that destroys a sandbox calls
// it; it is a no-op for one that holds none.
func (o *Orchestrator) release(id string) {
	if o.opts.Capacity != nil {
		o.opts.Capacity.Release(id)
	}
}

// reclaimPooled destroys one idle pooled slot, of any template, and
// reports whether there was one.
func (o *Orchestrator) reclaimPooled() bool {
	o.mu.Lock()
	pools := make([]*pool, 0, len(o.pools))
	for _, p := range o.pools {
		pools = append(pools, p)
	}
	o.mu.Unlock()
	for _, p := range pools {
		select {
		case s := <-p.ready:
			o.log.Info("host is full: destroying a pooled sandbox to make room for a create", "sandbox", s.ID, "template", p.tmpl.ID)
			o.destroyAsync(s.ID)
			p.wake() // to refill once there is room again
			return true
		default:
		}
	}
	return false
}

// noSpace turns a runtime's failure to reserve a sandbox's disk (ENOSPC
// on the data directory's filesystem) into a refusal like admission's.
func noSpace(err error, t Template) error {
	if errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("%w: no space on the data directory's disk for a %d MiB sandbox disk: %w", ErrHostFull, t.DiskSizeMB, err)
	}
	return err
}
