package orchestrator

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"

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
	// The event first: whoever sees the sandbox gone finds why.
	if _, err := o.opts.Store.AddEvent(ctx, store.Event{SandboxID: id, TemplateID: sb.rec.TemplateID,
		Owner: sb.rec.Owner, Type: event, Reason: reason}); err != nil {
		o.log.Error("recording sandbox event", "sandbox", id, "event", event, "err", err)
	}
	o.mu.Lock()
	delete(o.sandboxes, id)
	o.mu.Unlock()
	o.opts.OnEvict(id)
	// The record goes before the teardown so that a crash mid-kill never
	// resurrects a sandbox the user was told is dead.
	if err := o.opts.Store.DeleteSandbox(ctx, id); err != nil {
		o.log.Error("deleting sandbox record", "sandbox", id, "err", err)
	}
	o.dropCheckpoints(ctx, sb.rec) // checkpoint.go
	o.destroyAsync(id)
	if sb.rec.PausedOnDisk != "" {
		if err := os.RemoveAll(o.pausedPath(id)); err != nil {
			o.log.Error("removing a killed sandbox's pause", "sandbox", id, "err", err)
		}
	}
	o.log.Info("sandbox ended", "sandbox", id, "event", event, "reason", reason)
	return nil
}

// PauseOptions say how a sandbox pauses. By default it is written to disk
// with its memory (snapshot.go) and holds nothing else of the host until
// it resumes; where the runtime cannot snapshot, it is frozen in place,
// keeping its memory and CPU on the host.
type PauseOptions struct {
	// FilesystemOnly keeps only its files: a resume boots it afresh
	// (E2B's pause with memory false).
	FilesystemOnly bool
}

// Pause pauses a running sandbox.
func (o *Orchestrator) Pause(ctx context.Context, id string, opts PauseOptions) error {
	sb, err := o.Get(id)
	if err != nil {
		return err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return o.pauseLocked(ctx, sb, opts)
}

func (o *Orchestrator) pauseLocked(ctx context.Context, sb *Sandbox, opts PauseOptions) error {
	if sb.gone {
		return fmt.Errorf("%w: %s", ErrNotFound, sb.rec.ID)
	}
	if sb.rec.State == StatePaused {
		return ErrAlreadyPaused
	}
	snapper, err := o.snapshotter()
	if err != nil && opts.FilesystemOnly {
		return err
	}
	// Cut connections first: a frozen sandbox would leave them hanging.
	o.opts.OnEvict(sb.rec.ID)
	if err != nil {
		if err := o.opts.Runtime.Pause(ctx, sb.rec.ID); err != nil {
			return fmt.Errorf("orchestrator: pause %s: %w", sb.rec.ID, err)
		}
		sb.rec.State = StatePaused
		sb.stateEpoch++
		if err := o.opts.Store.PutSandbox(ctx, sb.rec); err != nil {
			return err
		}
		o.log.Info("sandbox paused in place", "sandbox", sb.rec.ID)
		return nil
	}
	return o.pauseToDisk(ctx, sb, snapper, opts)
}

// pauseToDisk saves sb to its paused directory, then destroys its runtime
// sandbox and releases its devices and reservation. The record says
// paused before anything is destroyed, so a crash in between leaves a
// sandbox the next start keeps paused (and the runtime's half destroyed).
func (o *Orchestrator) pauseToDisk(ctx context.Context, sb *Sandbox, snapper runtime.Snapshotter, opts PauseOptions) error {
	start := time.Now()
	id := sb.rec.ID
	dir := o.pausedPath(id)
	// A leftover of a pause that crashed before its record was written.
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("orchestrator: pause %s: %w", id, err)
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return fmt.Errorf("orchestrator: pause %s: %w", id, err)
	}
	if err := snapper.Snapshot(ctx, id, dir, runtime.SnapshotOptions{Memory: !opts.FilesystemOnly}); err != nil {
		return fmt.Errorf("orchestrator: pause %s: %w", id, err)
	}
	rec := sb.rec
	rec.State = StatePaused
	rec.PausedOnDisk = store.PausedMemory
	if opts.FilesystemOnly {
		rec.PausedOnDisk = store.PausedFilesystem
	}
	if err := o.opts.Store.PutSandbox(ctx, rec); err != nil {
		os.RemoveAll(dir)
		return err
	}
	tSaved := time.Now()
	sb.rec = rec
	sb.stateEpoch++
	// Its watch must not take the runtime sandbox's end for a death.
	sb.life, sb.net, sb.addr = nil, network.Attachment{}, netip.Addr{}
	o.release(id)
	if err := o.destroy(ctx, id); err != nil {
		// The next start's reconciliation destroys what is left.
		o.log.Error("destroying a sandbox paused to disk", "sandbox", id, "err", err)
	}
	o.log.Info("sandbox paused to disk", "sandbox", id, "saved", rec.PausedOnDisk,
		"ms", ms(time.Since(start)), "saveMs", ms(tSaved.Sub(start)), "destroyMs", ms(time.Since(tSaved)))
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
	if sb.rec.PausedOnDisk != "" {
		return o.resumeFromDisk(ctx, sb, timeout)
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

// resumeFromDisk restores sb from its paused directory, with its ID, token
// and egress policy, in devices claimed anew. On error it stays paused.
func (o *Orchestrator) resumeFromDisk(ctx context.Context, sb *Sandbox, timeout time.Duration) error {
	return o.resumeFrom(ctx, sb, o.pausedPath(sb.rec.ID), sb.rec.PausedOnDisk == store.PausedMemory,
		sb.rec.EnvdAccessToken, func() time.Time { return time.Now().UTC().Add(timeout) })
}

// resumeFrom is resumeFromDisk from dir, a snapshot of sb (its pause, or
// one of its snapshots for a rollback) whose envd holds token, to run
// until end(). On success sb's pause is removed; on error sb stays paused.
func (o *Orchestrator) resumeFrom(ctx context.Context, sb *Sandbox, dir string, memory bool, token string, end func() time.Time) error {
	start := time.Now()
	id := sb.rec.ID
	t, err := o.opts.Templates.Lookup(sb.baseTemplate())
	if err != nil {
		return fmt.Errorf("%w: the template %q of paused sandbox %s is gone", ErrTemplateNotFound, sb.baseTemplate(), id)
	}
	t.CPUCount, t.MemoryMB, t.DiskSizeMB = sb.rec.CPUCount, sb.rec.MemoryMB, sb.rec.DiskSizeMB
	s, err := o.restoreSlot(ctx, id, restoreSource{dir: dir, tmpl: t, token: token, memory: memory})
	if err != nil {
		return err
	}
	fail := func(err error) error {
		o.destroyAsync(id)
		return fmt.Errorf("orchestrator: resume %s: %w", id, err)
	}
	if sb.rec.Egress != nil {
		if err := o.applyEgress(s.net, *sb.rec.Egress); err != nil {
			return fail(err)
		}
	}
	init := initRequest{Timestamp: time.Now().UTC()}
	auth := token
	if token != sb.rec.EnvdAccessToken {
		init.AccessToken = sb.rec.EnvdAccessToken
	}
	if !memory {
		// A fresh envd: it learns everything again, and has no token yet.
		init = initFor(t, sb.rec.EnvVars, id, sb.rec.TemplateID, sb.rec.EnvdAccessToken)
		auth = ""
	}
	if err := o.envd.init(ctx, s.Addr, auth, init); err != nil {
		return fail(fmt.Errorf("envd /init: %w", err))
	}
	rec := sb.rec
	rec.State, rec.PausedOnDisk, rec.Addr = StateRunning, "", s.Addr.String()
	rec.EndAt = end()
	if err := o.opts.Store.PutSandbox(ctx, rec); err != nil {
		return fail(err)
	}
	sb.rec = rec
	sb.life, sb.net, sb.addr = s.life, s.net, s.Addr
	sb.stateEpoch++
	sb.probeFails = 0
	if err := os.RemoveAll(o.pausedPath(id)); err != nil {
		o.log.Warn("removing a resumed sandbox's pause", "sandbox", id, "err", err)
	}
	if s.life.isDead() {
		// It died before it was the sandbox's: its watch let it be.
		o.dieLocked(sb, s.life.exit.Reason, s.life.exit.Detail)
		return fmt.Errorf("orchestrator: sandbox %s died as it resumed (%s)", id, s.life.exit.Reason)
	}
	o.log.Info("sandbox resumed from disk", "sandbox", id, "memory", memory, "ms", ms(time.Since(start)))
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
	// One paused without its memory wakes only when asked to: its
	// processes start afresh.
	if sb.gone || !sb.rec.AutoResume || sb.rec.PausedOnDisk == store.PausedFilesystem {
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
		if err := o.pauseLocked(ctx, sb, PauseOptions{FilesystemOnly: sb.rec.AutoPauseFilesOnly}); err != nil {
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
	// A sandbox paused to disk has no devices: its resume applies it.
	if sb.rec.PausedOnDisk == "" {
		if sb.net.ID == "" {
			return fmt.Errorf("orchestrator: egress policy of %s: the sandbox has no network devices", id)
		}
		if err := o.applyEgress(sb.net, e); err != nil {
			return err
		}
	}
	sb.rec.AllowInternet = e.AllowInternet
	sb.rec.Network = network
	sb.rec.Egress = &e
	return o.opts.Store.PutSandbox(ctx, sb.rec)
}
