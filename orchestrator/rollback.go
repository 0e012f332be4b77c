package orchestrator

import (
	"context"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/store"
)

// Rollback (a cubicle extension; E2B has none): a sandbox goes back, in
// place, to one of its own snapshots. It keeps its ID, access and traffic
// tokens, metadata, end time and so its URL (the proxy routes by ID; its
// address may change); its processes, memory and files become the
// snapshot's.
//
// A running sandbox cannot be restored into its new runtime sandbox before
// the old one is destroyed (both would be runtime sandbox <id>), so a
// rollback is a pause to disk followed by a resume from the snapshot
// instead of from the pause:
//
//  1. the sandbox is paused to disk (pauseToDisk): its current state is
//     saved to its pause directory and the record says paused before its
//     runtime sandbox is destroyed, so from here on a crash leaves a
//     sandbox paused with its pre-rollback state, which the next start
//     adopts and a connect resumes;
//  2. it is restored from the snapshot (resumeFrom), envd re-initialised
//     with a fresh clock; on success the record says running again and the
//     saved state is removed;
//  3. if that restore fails, the saved state is resumed instead
//     (resumeFromDisk): the sandbox runs on as it was before the rollback,
//     and the rollback answers with its error.
//
// Worst case: the saved state cannot be resumed either (the host filled
// up in between, the template vanished). The sandbox then stays paused to
// disk with its pre-rollback state, nothing lost: a later connect or
// resume brings it back. If the pause in step 1 fails nothing has changed
// and the sandbox runs on.
//
// A sandbox paused to disk stays paused: its pause is replaced by a copy
// of the snapshot (swapped in atomically), and a resume or connect runs
// it from the snapshot's state. A rollback does not start or stop a
// sandbox, as a pause and a resume do.

// Rollback restores sandbox id in place to its snapshot ref (an ID or a
// name, bare or with E2B's ":default" tag). ErrTemplateNotFound when ref
// names no snapshot of this sandbox's owner taken of this sandbox.
func (o *Orchestrator) Rollback(ctx context.Context, id, ref string) (Info, error) {
	snapper, err := o.snapshotter()
	if err != nil {
		return Info{}, err
	}
	sb, err := o.Get(id)
	if err != nil {
		return Info{}, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.gone {
		return Info{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	sn, ok := o.findSnapshot(ctx, sb.rec.Owner, ref)
	if !ok || sn.SandboxID != id {
		// Another sandbox's snapshot is as unknown here as a missing one.
		return Info{}, fmt.Errorf("%w: sandbox %s has no snapshot %q", ErrTemplateNotFound, id, ref)
	}
	// What the restore needs, checked before anything is touched.
	if _, err := o.opts.Templates.Lookup(sb.baseTemplate()); err != nil {
		return Info{}, fmt.Errorf("%w: the template %q of sandbox %s is gone", ErrTemplateNotFound, sb.baseTemplate(), id)
	}
	if _, err := os.Stat(o.snapshotPath(sn.ID)); err != nil {
		return Info{}, fmt.Errorf("orchestrator: rollback of %s: snapshot %s: %w", id, sn.ID, err)
	}
	start := time.Now()
	if sb.rec.State == StatePaused {
		if err := o.rollbackPaused(ctx, sb, sn); err != nil {
			return Info{}, err
		}
		o.log.Info("paused sandbox rolled back", "sandbox", id, "snapshot", sn.ID, "ms", ms(time.Since(start)))
		return sb.infoLocked(), nil
	}

	endAt := sb.rec.EndAt
	o.opts.OnEvict(id)
	if err := o.pauseToDisk(ctx, sb, snapper, PauseOptions{}); err != nil {
		return Info{}, fmt.Errorf("orchestrator: rollback of %s: saving its state: %w", id, err)
	}
	tSaved := time.Now()
	err = o.resumeFrom(ctx, sb, o.snapshotPath(sn.ID), true, sn.EnvdAccessToken, func() time.Time { return endAt })
	if err == nil {
		o.log.Info("sandbox rolled back", "sandbox", id, "snapshot", sn.ID,
			"ms", ms(time.Since(start)), "saveMs", ms(tSaved.Sub(start)), "restoreMs", ms(time.Since(tSaved)))
		return sb.infoLocked(), nil
	}
	if sb.gone {
		// It was restored and died at once: a death like any other.
		return Info{}, fmt.Errorf("orchestrator: rollback of %s: %w", id, err)
	}
	o.log.Error("rollback failed; resuming the sandbox as it was", "sandbox", id, "snapshot", sn.ID, "err", err)
	back := time.Until(endAt)
	if back < time.Second {
		back = time.Second // the reaper ends it as it would have
	}
	if rerr := o.resumeFromDisk(ctx, sb, back); rerr != nil {
		o.log.Error("resuming a sandbox after a failed rollback; it stays paused", "sandbox", id, "err", rerr)
		return Info{}, fmt.Errorf("orchestrator: rollback of %s: %w (and resuming its saved state failed: %v; it is paused with its state as before the rollback)", id, err, rerr)
	}
	if sb.rec.State == StateRunning {
		sb.rec.EndAt = endAt
		if perr := o.opts.Store.PutSandbox(ctx, sb.rec); perr != nil {
			o.log.Error("recording a sandbox's end time", "sandbox", id, "err", perr)
		}
	}
	return Info{}, fmt.Errorf("orchestrator: rollback of %s (it runs on as it was): %w", id, err)
}

// rollbackPaused replaces paused sandbox sb's pause with a copy of sn.
func (o *Orchestrator) rollbackPaused(ctx context.Context, sb *Sandbox, sn store.Snapshot) error {
	id := sb.rec.ID
	if sb.rec.PausedOnDisk == "" {
		return fmt.Errorf("%w: sandbox %s is paused in memory; resume it first", ErrInvalid, id)
	}
	if sn.EnvdAccessToken != sb.rec.EnvdAccessToken {
		// A resume authenticates to envd with the sandbox's token.
		return fmt.Errorf("%w: snapshot %s holds another access token than sandbox %s; resume the sandbox first", ErrInvalid, sn.ID, id)
	}
	paused := o.pausedPath(id)
	// Next to the pause, so the swap is one rename; a crash leaves it to
	// sweepSnapshots (no sandbox is paused under its name).
	tmp := paused + ".rollback"
	if err := os.RemoveAll(tmp); err != nil {
		return fmt.Errorf("orchestrator: rollback of %s: %w", id, err)
	}
	defer os.RemoveAll(tmp)
	if err := copyDir(ctx, o.snapshotPath(sn.ID), tmp); err != nil {
		return fmt.Errorf("orchestrator: rollback of %s: copying snapshot %s: %w", id, sn.ID, err)
	}
	// The record first: a pause with memory is what the directory holds
	// after the swap, and a crash between the two leaves one whose resume
	// fails and is retried, rather than one that boots a memory image
	// afresh.
	rec := sb.rec
	rec.PausedOnDisk = store.PausedMemory
	if err := o.opts.Store.PutSandbox(ctx, rec); err != nil {
		return err
	}
	if err := swapDirs(tmp, paused); err != nil {
		if perr := o.opts.Store.PutSandbox(ctx, sb.rec); perr != nil {
			o.log.Error("restoring a paused sandbox's record", "sandbox", id, "err", perr)
		}
		return fmt.Errorf("orchestrator: rollback of %s: %w", id, err)
	}
	sb.rec = rec
	sb.stateEpoch++
	return nil
}

// swapDirs exchanges two directories atomically.
func swapDirs(a, b string) error {
	err := unix.Renameat2(unix.AT_FDCWD, a, unix.AT_FDCWD, b, unix.RENAME_EXCHANGE)
	if err != nil {
		return &os.LinkError{Op: "exchange", Old: a, New: b, Err: err}
	}
	return nil
}
