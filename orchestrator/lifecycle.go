package orchestrator

import (
	"context"
	"fmt"
	"time"

	"github.com/cubicle-dev/cubicle/network/egress"
	"github.com/cubicle-dev/cubicle/store"
)

// Kill destroys a sandbox, running or paused. Its open connections are cut
// before the runtime tears it down.
func (o *Orchestrator) Kill(ctx context.Context, id string) error {
	sb, err := o.Get(id)
	if err != nil {
		return err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return o.killLocked(ctx, sb, store.EventKilled, store.EventReasonRequest)
}

// killLocked is Kill with sb.mu held. The sandbox stops existing for
// clients at once (no route, no record, connections reset); the runtime
// tears it down in the background, off the request path, because that
// takes longer than the kill takes to answer (runsc kill + delete, unmount,
// netlink). A teardown cut short by a crash is finished by the next start's
// reconciliation, which destroys runtime sandboxes that have no record.
// The end is recorded as an event of type event (store.EventKilled or
// store.EventDied) with reason.
func (o *Orchestrator) killLocked(ctx context.Context, sb *Sandbox, event, reason string) error {
	if sb.gone {
		return fmt.Errorf("%w: %s", ErrNotFound, sb.rec.ID)
	}
	id := sb.rec.ID
	sb.gone = true
	o.mu.Lock()
	delete(o.sandboxes, id)
	o.mu.Unlock()
	o.opts.OnEvict(id)
	// The record goes before the teardown so that a crash mid-kill never
	// resurrects a sandbox the user was told is dead.
	if err := o.opts.Store.DeleteSandbox(ctx, id); err != nil {
		o.log.Error("deleting sandbox record", "sandbox", id, "err", err)
	}
	o.destroyAsync(id)
	if _, err := o.opts.Store.AddEvent(ctx, store.Event{SandboxID: id, TemplateID: sb.rec.TemplateID,
		Owner: sb.rec.Owner, Type: event, Reason: reason}); err != nil {
		o.log.Error("recording sandbox event", "sandbox", id, "event", event, "err", err)
	}
	o.log.Info("sandbox ended", "sandbox", id, "event", event, "reason", reason)
	return nil
}

// Pause freezes a running sandbox in place, keeping all of its state.
func (o *Orchestrator) Pause(ctx context.Context, id string) error {
	sb, err := o.Get(id)
	if err != nil {
		return err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return o.pauseLocked(ctx, sb)
}

func (o *Orchestrator) pauseLocked(ctx context.Context, sb *Sandbox) error {
	if sb.gone {
		return fmt.Errorf("%w: %s", ErrNotFound, sb.rec.ID)
	}
	if sb.rec.State == StatePaused {
		return ErrAlreadyPaused
	}
	// Cut connections first: a frozen sandbox would leave them hanging.
	o.opts.OnEvict(sb.rec.ID)
	if err := o.opts.Runtime.Pause(ctx, sb.rec.ID); err != nil {
		return fmt.Errorf("orchestrator: pause %s: %w", sb.rec.ID, err)
	}
	sb.rec.State = StatePaused
	sb.stateEpoch++
	if err := o.opts.Store.PutSandbox(ctx, sb.rec); err != nil {
		return err
	}
	o.log.Info("sandbox paused", "sandbox", sb.rec.ID)
	return nil
}

// Resume thaws a paused sandbox and gives it timeout to live.
func (o *Orchestrator) Resume(ctx context.Context, id string, timeout time.Duration) (Info, error) {
	if err := o.checkTimeout(timeout); err != nil {
		return Info{}, err
	}
	sb, err := o.Get(id)
	if err != nil {
		return Info{}, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.rec.State != StatePaused {
		return Info{}, ErrNotPaused
	}
	if err := o.resumeLocked(ctx, sb, timeout); err != nil {
		return Info{}, err
	}
	return sb.infoLocked(), nil
}

func (o *Orchestrator) resumeLocked(ctx context.Context, sb *Sandbox, timeout time.Duration) error {
	if sb.gone {
		return fmt.Errorf("%w: %s", ErrNotFound, sb.rec.ID)
	}
	if err := o.opts.Runtime.Resume(ctx, sb.rec.ID); err != nil {
		return fmt.Errorf("orchestrator: resume %s: %w", sb.rec.ID, err)
	}
	sb.rec.State = StateRunning
	sb.stateEpoch++
	sb.probeFails = 0
	sb.rec.EndAt = time.Now().UTC().Add(timeout)
	if err := o.opts.Store.PutSandbox(ctx, sb.rec); err != nil {
		return err
	}
	o.log.Info("sandbox resumed", "sandbox", sb.rec.ID)
	return nil
}

// Connect returns a running sandbox, resuming it if it is paused. resumed
// tells which. A running sandbox's end time only ever moves later.
func (o *Orchestrator) Connect(ctx context.Context, id string, timeout time.Duration) (info Info, resumed bool, err error) {
	if err := o.checkTimeout(timeout); err != nil {
		return Info{}, false, err
	}
	sb, err := o.Get(id)
	if err != nil {
		return Info{}, false, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.gone {
		return Info{}, false, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if sb.rec.State == StatePaused {
		if err := o.resumeLocked(ctx, sb, timeout); err != nil {
			return Info{}, false, err
		}
		return sb.infoLocked(), true, nil
	}
	if end := time.Now().UTC().Add(timeout); end.After(sb.rec.EndAt) {
		sb.rec.EndAt = end
		if err := o.opts.Store.PutSandbox(ctx, sb.rec); err != nil {
			return Info{}, false, err
		}
	}
	return sb.infoLocked(), false, nil
}

// ResumeForTraffic resumes a paused sandbox whose lifecycle says traffic may
// wake it (autoResume). It reports whether the sandbox now runs.
func (o *Orchestrator) ResumeForTraffic(ctx context.Context, id string) bool {
	sb, err := o.Get(id)
	if err != nil {
		return false
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.gone || !sb.rec.AutoResume {
		return false
	}
	if sb.rec.State == StateRunning {
		return true
	}
	timeout := time.Duration(sb.rec.TimeoutSeconds) * time.Second
	if o.checkTimeout(timeout) != nil {
		timeout = o.opts.MaxTimeout
	}
	return o.resumeLocked(ctx, sb, timeout) == nil
}

// SetTimeout sets the sandbox's end time to now + timeout. A zero timeout
// ends it at the reaper's next pass.
func (o *Orchestrator) SetTimeout(ctx context.Context, id string, timeout time.Duration) error {
	if timeout < 0 || timeout > o.opts.MaxTimeout {
		return fmt.Errorf("%w: timeout must be between 0 and %d seconds", ErrInvalid, int(o.opts.MaxTimeout/time.Second))
	}
	sb, err := o.Get(id)
	if err != nil {
		return err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.gone {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	sb.rec.EndAt = time.Now().UTC().Add(timeout)
	return o.opts.Store.PutSandbox(ctx, sb.rec)
}

func (o *Orchestrator) checkTimeout(d time.Duration) error {
	if d <= 0 || d > o.opts.MaxTimeout {
		return fmt.Errorf("%w: timeout must be between 1 and %d seconds", ErrInvalid, int(o.opts.MaxTimeout/time.Second))
	}
	return nil
}

// reapPeriod bounds how late past its end time a sandbox is reaped.
const reapPeriod = 250 * time.Millisecond

// reap ends running sandboxes whose time is up: paused when they asked
// for autoPause, killed otherwise.
func (o *Orchestrator) reap() {
	now := time.Now()
	for _, sb := range o.All() {
		sb.mu.Lock()
		due := !sb.gone && sb.rec.State == StateRunning && now.After(sb.rec.EndAt)
		sb.mu.Unlock()
		if due {
			o.expire(sb)
		}
	}
}

func (o *Orchestrator) expire(sb *Sandbox) {
	ctx, cancel := context.WithTimeout(o.ctx, time.Minute)
	defer cancel()
	sb.mu.Lock()
	defer sb.mu.Unlock()
	// Re-check: the timeout may have moved while the lock was free.
	if sb.gone || sb.rec.State != StateRunning || time.Now().Before(sb.rec.EndAt) {
		return
	}
	if sb.rec.AutoPause {
		if err := o.pauseLocked(ctx, sb); err != nil {
			o.log.Error("auto-pausing expired sandbox; killing it instead", "sandbox", sb.rec.ID, "err", err)
		} else {
			return
		}
	}
	if err := o.killLocked(ctx, sb, store.EventKilled, store.EventReasonTimeout); err != nil {
		o.log.Error("killing expired sandbox", "sandbox", sb.rec.ID, "err", err)
	}
}

// SetNetwork replaces a sandbox's egress policy live (PUT
// /sandboxes/{id}/network) and records it with the request as sent.
func (o *Orchestrator) SetNetwork(ctx context.Context, id string, e egress.Policy, network []byte) error {
	sb, err := o.Get(id)
	if err != nil {
		return err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.gone {
		return fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if sb.net.ID == "" {
		return fmt.Errorf("orchestrator: egress policy of %s: the sandbox has no network devices", id)
	}
	if err := o.applyEgress(sb.net, e); err != nil {
		return err
	}
	sb.rec.AllowInternet = e.AllowInternet
	sb.rec.Network = network
	sb.rec.Egress = &e
	return o.opts.Store.PutSandbox(ctx, sb.rec)
}
