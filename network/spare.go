package network

import (
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"
)

const (
	// fillParallel is how many spares the filler makes at once: enough to
	// refill after a burst of creates, few enough to leave the host's
	// CPUs (and the RTNL lock, which every netlink change takes) to the
	// sandboxes.
	fillParallel = 2
	// fillBackoffMin and fillBackoffMax bound the pause after a failure to
	// make a spare, so that a persistent failure is retried and logged
	// now and then rather than in a loop.
	fillBackoffMin = 100 * time.Millisecond
	fillBackoffMax = 30 * time.Second
)

// claim gives id a ready spare, if there is one. It reports false, with no
// error, when there is none (or the one it took turned out to be unusable
// and is gone now), and the caller makes devices instead.
func (p *Pool) claim(id string) (Attachment, bool, error) {
	p.mu.Lock()
	if idx, ok := p.alloc.lookup(id); ok {
		p.mu.Unlock()
		return Attachment{}, false, fmt.Errorf("%w: sandbox %s already holds slot %d", ErrInUse, id, idx)
	}
	if len(p.ready) == 0 {
		p.mu.Unlock()
		return Attachment{}, false, nil
	}
	idx := p.ready[0]
	p.ready = p.ready[1:]
	if err := p.alloc.assign(idx, id); err != nil {
		p.mu.Unlock()
		panic(fmt.Sprintf("network: ready spare not reserved: %v", err)) // ready holds only reserved slots
	}
	a := p.attachment(id, idx)
	p.mu.Unlock()

	// The alias is what makes the devices the sandbox's, for adopt after a
	// restart; everything else about a spare is already the sandbox's.
	// By index: the name would cost a lookup.
	err := netlink.LinkSetAlias(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: a.HostIndex}}, id)
	if err == nil {
		p.log.Debug("network attached from spare", "sandbox", id, "link", a.HostLink, "addr", a.Addr)
		return a, true, nil
	}
	// Someone removed the link, most likely. Drop the spare and let the
	// caller make devices afresh.
	p.log.Warn("spare unusable; making devices instead", "sandbox", id, "link", a.HostLink, "err", err)
	if derr := p.destroy(a, true); derr != nil {
		return Attachment{}, false, fmt.Errorf("network: set up sandbox %s: claim spare %s: %w (and removing it: %w)", id, a.HostLink, err, derr)
	}
	p.forget(a)
	return Attachment{}, false, nil
}

// refill asks the filler to top the spares up.
func (p *Pool) refill() {
	if p.spares == 0 {
		return
	}
	select {
	case p.wake <- struct{}{}:
	default: // a request is pending already
	}
}

// SparesReady is how many spares can be claimed right now.
func (p *Pool) SparesReady() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ready)
}

// fill keeps Options.Spares spares ready, making up to fillParallel at a
// time, until stop is closed. It closes filled once every spare it started
// is in ready or removed.
func (p *Pool) fill() {
	defer close(p.filled)
	done := make(chan error, fillParallel)
	making := 0
	defer func() {
		for ; making > 0; making-- {
			<-done
		}
	}()
	var (
		backoff time.Duration
		retry   *time.Timer
		// paused is set after a failure, until retry fires or the
		// pool's state changes (a wake).
		paused bool
	)
	stopRetry := func() {
		if retry != nil {
			retry.Stop()
		}
		paused = false
	}
	defer stopRetry()
	for {
		select {
		case <-p.stop:
			return
		default:
		}
		for !paused && making < fillParallel && p.SparesReady()+making < p.spares {
			making++
			go func() { done <- p.makeSpare() }()
		}
		var retryC <-chan time.Time
		if retry != nil {
			retryC = retry.C
		}
		select {
		case <-p.stop:
			return
		case err := <-done:
			making--
			switch {
			case err == nil:
				backoff = 0
			case errors.Is(err, ErrExhausted):
				// Wait for a Teardown to free a slot (it wakes us).
				p.log.Debug("no address left for a spare", "err", err)
				stopRetry()
				paused = true
			default:
				backoff = min(max(2*backoff, fillBackoffMin), fillBackoffMax)
				p.log.Warn("making a spare failed", "err", err, "retry_in", backoff)
				stopRetry()
				paused = true
				retry = time.NewTimer(backoff)
			}
		case <-retryC:
			retry = nil
			paused = false
		case <-p.wake:
			stopRetry()
			retry = nil
		}
	}
}

// makeSpare makes one spare and puts it in ready.
func (p *Pool) makeSpare() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	idx, err := p.alloc.reserve()
	var a Attachment
	if err == nil {
		a = p.attachment("", idx)
	}
	p.mu.Unlock()
	if err != nil {
		return err
	}
	a, err = p.create(a, spareAlias)
	if err != nil {
		return fmt.Errorf("network: make spare: %w", err)
	}
	p.mu.Lock()
	p.ready = append(p.ready, idx)
	p.mu.Unlock()
	p.log.Debug("spare ready", "link", a.HostLink)
	return nil
}

// Close stops making spares and removes the ready ones (running OnDestroy
// for each). Attachments stay: their sandboxes outlive the server, and a
// new Pool adopts them. Setup still works after Close, without spares.
func (p *Pool) Close() error {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		p.mu.Unlock()
		if p.stop != nil {
			close(p.stop)
		}
	})
	if p.filled != nil {
		<-p.filled
	}
	p.mu.Lock()
	var spares []Attachment
	for _, idx := range p.ready {
		spares = append(spares, p.attachment("", idx))
	}
	p.ready = nil
	p.mu.Unlock()
	var errs []error
	for _, a := range spares {
		if err := p.destroy(a, true); err != nil {
			// The slot stays reserved; a new Pool removes the rest.
			errs = append(errs, err)
			continue
		}
		p.forget(a)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("network: close: %w", err)
	}
	return nil
}
