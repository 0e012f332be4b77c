package orchestrator

import (
	"errors"
	"fmt"
	"syscall"

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
// What yields when the host is full: user sandboxes. A pooled slot is
// spare capacity put to use, not a promise to anyone, so a cold create
// that is refused for memory or vCPUs destroys idle pooled slots (any
// template's) until it fits, and a pool fill that is refused waits
// (fill retries) instead of taking what a user create could have had.
// Disk is not reclaimed that way: a destroyed slot frees its disk only
// when its teardown finishes, so it would drain pools for nothing.

// admit reserves what a sandbox of t holds on the host.
func (o *Orchestrator) admit(id string, t Template, pooled bool) error {
	l := o.opts.Capacity
	if l == nil {
		return nil
	}
	r := capacity.Resources{CPUs: t.CPUCount, MemoryMB: t.MemoryMB, DiskMB: t.DiskSizeMB}
	for {
		err := l.Reserve(id, r)
		var full *capacity.FullError
		if err == nil || pooled || !errors.As(err, &full) || full.Resource == "disk" || !o.reclaimPooled() {
			return err
		}
	}
}

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
