package orchestrator

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cubicle-dev/cubicle/store"
)

// Per-command checkpoints (a cubicle extension): a sandbox created with
// metadata cubicle.checkpoint=per-command is snapshotted before every
// command it is asked to run (every envd process Start the proxy
// forwards; the proxy calls CheckpointCommand first), so that an agent can
// undo a command with a rollback to the checkpoint taken before it.
//
// Checkpoints are ordinary snapshots of the sandbox's owner, named
// cmd-<n>.<sandbox ID> (n counting from 1 per sandbox), so GET
// /snapshots?sandboxID= lists them and a rollback takes their names or
// IDs; names of that form are reserved for them. A sandbox keeps its last
// MaxCommandCheckpoints: taking one removes the oldest beyond that. All of
// a sandbox's checkpoints are removed when it ends (killed, timed out,
// died); the snapshots its user took by name are not.

// Metadata that asks for per-command checkpoints.
const (
	CheckpointKey        = "cubicle.checkpoint"
	CheckpointPerCommand = "per-command"
)

// MaxCommandCheckpoints is how many per-command checkpoints a sandbox
// keeps.
const MaxCommandCheckpoints = 20

// CheckpointsPerCommand says whether the sandbox asked for per-command
// checkpoints.
func (in Info) CheckpointsPerCommand() bool { return perCommand(in.Metadata) }

func perCommand(md map[string]string) bool { return md[CheckpointKey] == CheckpointPerCommand }

// checkCheckpointMetadata refuses a create whose cubicle.checkpoint this
// server cannot honour: a checkpoint silently not taken would make an
// agent's undo lose work.
func (o *Orchestrator) checkCheckpointMetadata(md map[string]string) error {
	v, ok := md[CheckpointKey]
	if !ok {
		return nil
	}
	if v != CheckpointPerCommand {
		return fmt.Errorf("%w: metadata %s must be %q, not %q", ErrInvalid, CheckpointKey, CheckpointPerCommand, v)
	}
	if _, err := o.snapshotter(); err != nil {
		return fmt.Errorf("per-command checkpoints: %w", err)
	}
	return nil
}

// checkpointName is the name of sandbox id's nth checkpoint.
func checkpointName(id string, n int) string { return "cmd-" + strconv.Itoa(n) + "." + id }

// checkpointNumber is n for a name of the form cmd-<n>.<sandbox>.
func checkpointNumber(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "cmd-")
	if !ok {
		return 0, false
	}
	num, sandbox, ok := strings.Cut(rest, ".")
	if !ok || sandbox == "" || num == "" || len(num) > 9 || num[0] == '0' {
		return 0, false
	}
	for _, c := range num {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, _ := strconv.Atoi(num)
	return n, true
}

// checkpoint is one of a sandbox's checkpoints.
type checkpoint struct {
	n  int
	sn store.Snapshot
}

// checkpointsOf lists sandbox rec's checkpoints, oldest first.
func (o *Orchestrator) checkpointsOf(ctx context.Context, rec store.Sandbox) ([]checkpoint, error) {
	sns, err := o.opts.Store.ListSnapshots(ctx, store.SnapshotFilter{Owner: rec.Owner, SandboxID: rec.ID})
	if err != nil {
		return nil, err
	}
	var out []checkpoint
	for _, sn := range sns {
		if n, ok := checkpointNumber(sn.Name); ok && sn.Name == checkpointName(rec.ID, n) {
			out = append(out, checkpoint{n, sn})
		}
	}
	slices.SortFunc(out, func(a, b checkpoint) int { return a.n - b.n })
	return out, nil
}

// CheckpointCommand snapshots sandbox id before a command runs in it, as
// its next per-command checkpoint, and removes its oldest beyond
// MaxCommandCheckpoints. ErrInvalid for a sandbox that did not ask for
// them.
func (o *Orchestrator) CheckpointCommand(ctx context.Context, id string) (store.Snapshot, error) {
	snapper, err := o.snapshotter()
	if err != nil {
		return store.Snapshot{}, err
	}
	sb, err := o.Get(id)
	if err != nil {
		return store.Snapshot{}, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.gone {
		return store.Snapshot{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if !perCommand(sb.rec.Metadata) {
		return store.Snapshot{}, fmt.Errorf("%w: sandbox %s takes no per-command checkpoints", ErrInvalid, id)
	}
	start := time.Now()
	have, err := o.checkpointsOf(ctx, sb.rec)
	if err != nil {
		return store.Snapshot{}, err
	}
	n := 1
	if len(have) > 0 {
		n = have[len(have)-1].n + 1
	}
	sn, err := o.snapshotLocked(ctx, snapper, sb, checkpointName(id, n))
	if err != nil {
		return store.Snapshot{}, err
	}
	tTaken := time.Now()
	for len(have) >= MaxCommandCheckpoints {
		o.removeSnapshot(ctx, have[0].sn.ID)
		have = have[1:]
	}
	o.log.Debug("per-command checkpoint", "sandbox", id, "snapshot", sn.ID, "n", n,
		"ms", ms(time.Since(start)), "snapshotMs", ms(tTaken.Sub(start)))
	return sn, nil
}

// removeSnapshot removes a snapshot, its record first (a snapshot whose
// files are half gone must not be found).
func (o *Orchestrator) removeSnapshot(ctx context.Context, id string) {
	if err := o.opts.Store.DeleteSnapshot(ctx, id); err != nil {
		o.log.Warn("removing a checkpoint", "snapshot", id, "err", err)
		return
	}
	if err := os.RemoveAll(o.snapshotPath(id)); err != nil {
		o.log.Warn("removing a checkpoint's files", "snapshot", id, "err", err)
	}
}

// dropCheckpoints removes an ended sandbox's checkpoints: their records at
// once, their files in the background (killLocked answers fast). What a
// crash leaves, sweepCheckpoints removes at the next start.
func (o *Orchestrator) dropCheckpoints(ctx context.Context, rec store.Sandbox) {
	if !perCommand(rec.Metadata) || o.opts.SnapshotDir == "" {
		return
	}
	have, err := o.checkpointsOf(ctx, rec)
	if err != nil {
		o.log.Error("listing an ended sandbox's checkpoints", "sandbox", rec.ID, "err", err)
		return
	}
	var dirs []string
	for _, c := range have {
		if err := o.opts.Store.DeleteSnapshot(ctx, c.sn.ID); err != nil {
			o.log.Error("removing an ended sandbox's checkpoint", "sandbox", rec.ID, "snapshot", c.sn.ID, "err", err)
			continue
		}
		dirs = append(dirs, o.snapshotPath(c.sn.ID))
	}
	if len(dirs) == 0 {
		return
	}
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		for _, d := range dirs {
			if err := os.RemoveAll(d); err != nil {
				o.log.Warn("removing an ended sandbox's checkpoint", "path", d, "err", err)
			}
		}
	}()
}

// sweepCheckpoints removes the checkpoints of sandboxes that no longer
// exist (a crash between a sandbox's end and dropCheckpoints). Called at
// start, after reconciliation, before sweepSnapshots removes their files.
func (o *Orchestrator) sweepCheckpoints(ctx context.Context) {
	sns, err := o.opts.Store.ListSnapshots(ctx, store.SnapshotFilter{})
	if err != nil {
		o.log.Warn("listing snapshots for leftover checkpoints", "err", err)
		return
	}
	for _, sn := range sns {
		n, ok := checkpointNumber(sn.Name)
		if !ok || sn.Name != checkpointName(sn.SandboxID, n) {
			continue
		}
		if _, live := o.sandboxes[sn.SandboxID]; live {
			continue
		}
		o.log.Info("removing a leftover checkpoint", "snapshot", sn.ID, "sandbox", sn.SandboxID)
		if err := o.opts.Store.DeleteSnapshot(ctx, sn.ID); err != nil {
			o.log.Warn("removing a leftover checkpoint", "snapshot", sn.ID, "err", err)
		}
	}
}
