package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cubicle-dev/cubicle/internal/sparse"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/store"
)

// Snapshots, forks and pause to disk. All three are a runtime snapshot
// (runtime.Snapshotter) in a directory under Options.SnapshotDir and
// sandboxes restored from it:
//
//   - SnapshotDir/<snapshot ID>: a snapshot a client asked for, recorded
//     in the store (store.Snapshot) and usable as a templateID by its
//     owner until it is deleted;
//   - SnapshotDir/paused/<sandbox ID>: a sandbox paused to disk, which
//     holds no runtime sandbox, network devices or reservation until it
//     is resumed (lifecycle.go);
//   - SnapshotDir/forks/<random>: the one snapshot a fork takes, removed
//     once its copies have started.
//
// A snapshot keeps the sandbox's processes, memory and files; the
// template's files are not copied (runtime.Snapshotter), so a template a
// snapshot was made from cannot be removed while the snapshot exists.

// ErrUnsupported is returned for what this server's backend cannot do.
var ErrUnsupported = errors.New("not supported")

// Names of SnapshotDir's subdirectories; no snapshot ID (NewID: 20
// characters) can be either.
const (
	pausedDir = "paused"
	forksDir  = "forks"
)

// Fork limits, as E2B's API sets them.
const (
	MaxForks = 100
	// forkParallel is how many copies of a fork start at once.
	forkParallel = 4
)

// snapshotter is the runtime's snapshot half, or ErrUnsupported.
func (o *Orchestrator) snapshotter() (runtime.Snapshotter, error) {
	s, ok := o.opts.Runtime.(runtime.Snapshotter)
	if !ok || o.opts.SnapshotDir == "" {
		return nil, fmt.Errorf("%w: the %s backend cannot snapshot sandboxes", ErrUnsupported, o.opts.Runtime.Name())
	}
	return s, nil
}

func (o *Orchestrator) snapshotPath(id string) string {
	return filepath.Join(o.opts.SnapshotDir, id)
}

func (o *Orchestrator) pausedPath(id string) string {
	return filepath.Join(o.opts.SnapshotDir, pausedDir, id)
}

// SnapshotTag is the one tag snapshots have: E2B names them name:tag.
const SnapshotTag = "default"

// Snapshot saves sandbox id, with its processes and memory, as a snapshot
// owned by the sandbox's owner and named name ("" for none). A running
// sandbox is paused for as long as it takes and runs on; one paused to
// disk is copied.
func (o *Orchestrator) Snapshot(ctx context.Context, id, name string) (store.Snapshot, error) {
	snapper, err := o.snapshotter()
	if err != nil {
		return store.Snapshot{}, err
	}
	if name != "" {
		if err := checkSnapshotName(name); err != nil {
			return store.Snapshot{}, err
		}
		if _, err := o.opts.Templates.Lookup(name); err == nil {
			return store.Snapshot{}, fmt.Errorf("%w: %q names a template", ErrInvalid, name)
		}
	}
	sb, err := o.Get(id)
	if err != nil {
		return store.Snapshot{}, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	return o.snapshotLocked(ctx, snapper, sb, name)
}

// snapshotLocked is Snapshot with sb.mu held and name checked.
func (o *Orchestrator) snapshotLocked(ctx context.Context, snapper runtime.Snapshotter, sb *Sandbox, name string) (store.Snapshot, error) {
	id := sb.rec.ID
	var err error
	if sb.gone {
		return store.Snapshot{}, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if name != "" {
		if _, err := o.opts.Store.FindSnapshot(ctx, sb.rec.Owner, name); err == nil {
			return store.Snapshot{}, fmt.Errorf("%w: a snapshot named %q exists", store.ErrNameTaken, name)
		}
	}
	if sb.rec.PausedOnDisk == store.PausedFilesystem {
		return store.Snapshot{}, fmt.Errorf("%w: sandbox %s was paused without its memory; resume it first", ErrInvalid, id)
	}
	start := time.Now()
	sn := store.Snapshot{
		ID: NewID(), Name: name, Owner: sb.rec.Owner, SandboxID: id,
		TemplateID: sb.baseTemplate(), CPUCount: sb.rec.CPUCount, MemoryMB: sb.rec.MemoryMB,
		DiskSizeMB: sb.rec.DiskSizeMB, Runtime: o.opts.Runtime.Name(), Volumes: sb.rec.Volumes,
		EnvdAccessToken: sb.rec.EnvdAccessToken, CreatedAt: start.UTC(),
	}
	dir := o.snapshotPath(sn.ID)
	if err := os.MkdirAll(o.opts.SnapshotDir, 0o700); err != nil {
		return store.Snapshot{}, fmt.Errorf("orchestrator: %w", err)
	}
	if sb.rec.PausedOnDisk != "" {
		err = copyDir(ctx, o.pausedPath(id), dir)
	} else {
		err = snapper.Snapshot(ctx, id, dir, runtime.SnapshotOptions{Memory: true})
	}
	if err != nil {
		return store.Snapshot{}, fmt.Errorf("orchestrator: snapshot of %s: %w", id, err)
	}
	if err := o.opts.Store.PutSnapshot(ctx, sn); err != nil {
		os.RemoveAll(dir)
		return store.Snapshot{}, err
	}
	o.log.Info("sandbox snapshotted", "sandbox", id, "snapshot", sn.ID, "name", name, "ms", ms(time.Since(start)))
	return sn, nil
}

// checkSnapshotName allows what E2B's template names allow.
func checkSnapshotName(name string) error {
	if len(name) > 128 {
		return fmt.Errorf("%w: snapshot name longer than 128 characters", ErrInvalid)
	}
	if _, ok := checkpointNumber(name); ok {
		return fmt.Errorf("%w: snapshot name %q: names cmd-<n>.<sandbox> are cubicle's per-command checkpoints'", ErrInvalid, name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("%w: snapshot name %q: only letters, digits, '-', '_' and '.' are allowed", ErrInvalid, name)
		}
	}
	return nil
}

// SnapshotRef strips the tag E2B's snapshot IDs carry ("id:default",
// "name:default"), reporting false for any other tag.
func SnapshotRef(ref string) (string, bool) {
	name, tag, tagged := strings.Cut(ref, ":")
	if tagged && tag != SnapshotTag {
		return "", false
	}
	return name, true
}

// findSnapshot resolves a templateID that names one of owner's snapshots.
func (o *Orchestrator) findSnapshot(ctx context.Context, owner, ref string) (store.Snapshot, bool) {
	if o.opts.SnapshotDir == "" {
		return store.Snapshot{}, false
	}
	name, ok := SnapshotRef(ref)
	if !ok || name == "" {
		return store.Snapshot{}, false
	}
	sn, err := o.opts.Store.FindSnapshot(ctx, owner, name)
	return sn, err == nil
}

// ListSnapshots returns owner's snapshots (store.SnapshotFilter).
func (o *Orchestrator) ListSnapshots(ctx context.Context, f store.SnapshotFilter) ([]store.Snapshot, error) {
	if f.Name != "" {
		name, ok := SnapshotRef(f.Name)
		if !ok {
			return nil, nil
		}
		f.Name = name
	}
	return o.opts.Store.ListSnapshots(ctx, f)
}

// DeleteSnapshot removes owner's snapshot ref; ErrNotFound if owner has
// none such. Sandboxes made from it are not affected: each has its own
// copy of what it needs.
func (o *Orchestrator) DeleteSnapshot(ctx context.Context, owner, ref string) error {
	sn, ok := o.findSnapshot(ctx, owner, ref)
	if !ok {
		return fmt.Errorf("%w: snapshot %q", ErrTemplateNotFound, ref)
	}
	// The record first: a snapshot whose files are half gone must not be
	// found.
	if err := o.opts.Store.DeleteSnapshot(ctx, sn.ID); err != nil {
		return err
	}
	if err := os.RemoveAll(o.snapshotPath(sn.ID)); err != nil {
		o.log.Warn("removing a deleted snapshot's files", "snapshot", sn.ID, "err", err)
	}
	o.log.Info("snapshot deleted", "snapshot", sn.ID)
	return nil
}

// restoreSource is what a sandbox is restored from.
type restoreSource struct {
	dir string
	// tmpl is the template the snapshotted sandbox was made from, with the
	// snapshotted sandbox's limits.
	tmpl Template
	// token is the access token envd holds in the snapshot.
	token string
	// memory says the snapshot's processes continue; false boots afresh.
	memory bool
}

// snapshotSource resolves a stored snapshot.
func (o *Orchestrator) snapshotSource(sn store.Snapshot) (restoreSource, error) {
	t, err := o.opts.Templates.Lookup(sn.TemplateID)
	if err != nil {
		return restoreSource{}, fmt.Errorf("%w: the template %q that snapshot %s was made from is gone", ErrTemplateNotFound, sn.TemplateID, sn.ID)
	}
	t.CPUCount, t.MemoryMB, t.DiskSizeMB = sn.CPUCount, sn.MemoryMB, sn.DiskSizeMB
	return restoreSource{dir: o.snapshotPath(sn.ID), tmpl: t, token: sn.EnvdAccessToken, memory: true}, nil
}

// restoreSlot starts runtime sandbox id from src and waits until its envd
// answers. On error nothing of it is left.
func (o *Orchestrator) restoreSlot(ctx context.Context, id string, src restoreSource) (slot, error) {
	snapper, err := o.snapshotter()
	if err != nil {
		return slot{}, err
	}
	if err := o.admit(ctx, id, src.tmpl, false); err != nil {
		return slot{}, err
	}
	att, err := o.claimNetwork(ctx, id)
	if err != nil {
		o.release(id)
		return slot{}, err
	}
	rs, err := snapper.Restore(ctx, runtime.Config{
		ID:         id,
		TemplateID: src.tmpl.ID,
		RootFS:     src.tmpl.RootFS,
		CPUCount:   src.tmpl.CPUCount,
		MemoryMB:   src.tmpl.MemoryMB,
		DiskSizeMB: src.tmpl.DiskSizeMB,
		Envd:       o.opts.Envd,
		EnvdArgs:   o.opts.EnvdArgs,
		Network:    att,
		GatewayDNS: o.opts.Egress != nil,
	}, src.dir)
	if err != nil {
		o.releaseNetwork(ctx, id)
		o.release(id)
		return slot{}, fmt.Errorf("orchestrator: restore %s: %w", id, noSpace(err, src.tmpl))
	}
	l := o.watch(id, nil)
	o.settle(id)
	s := slot{ID: id, Addr: rs.Addr, net: att, life: l}
	if err := o.envd.waitHealthy(ctx, rs.Addr, 30*time.Second); err != nil {
		o.destroyAsync(id)
		return slot{}, fmt.Errorf("orchestrator: restored sandbox %s: envd: %w", id, err)
	}
	if !src.memory {
		if err := o.startTemplate(ctx, rs.Addr, src.tmpl); err != nil {
			o.destroyAsync(id)
			return slot{}, fmt.Errorf("orchestrator: restored sandbox %s: %w", id, err)
		}
	}
	return s, nil
}

// createFromSnapshot is Create for a templateID that names a snapshot:
// the new sandbox continues the snapshot's processes with its own ID,
// token, network and timeout.
func (o *Orchestrator) createFromSnapshot(ctx context.Context, req CreateRequest, sn store.Snapshot) (Info, error) {
	if len(req.Volumes) > 0 {
		return Info{}, fmt.Errorf("%w: a sandbox made from a snapshot mounts the snapshot's volumes, and no others", ErrInvalid)
	}
	req.Volumes = mountsOf(sn.Volumes)
	src, err := o.snapshotSource(sn)
	if err != nil {
		return Info{}, err
	}
	tmpl := src.tmpl
	tmpl.ID, tmpl.Alias, tmpl.base = sn.ID, sn.Name, sn.TemplateID
	return o.startRestored(ctx, req, src, tmpl)
}

// startRestored makes req's sandbox from src and hands it out as made from
// tmpl.
func (o *Orchestrator) startRestored(ctx context.Context, req CreateRequest, src restoreSource, tmpl Template) (Info, error) {
	began := time.Now()
	id := NewID()
	s, err := o.restoreSlot(ctx, id, src)
	if err != nil {
		return Info{}, err
	}
	tRestored := time.Now()
	if req.Egress != nil {
		if err := o.applyEgress(s.net, *req.Egress); err != nil {
			o.destroyAsync(id)
			return Info{}, err
		}
	}
	token := newToken()
	if err := o.envd.init(ctx, s.Addr, src.token, initFor(src.tmpl, req.EnvVars, id, tmpl.ID, token)); err != nil {
		o.destroyAsync(id)
		return Info{}, fmt.Errorf("orchestrator: initialise envd of %s: %w", id, err)
	}
	return o.handOut(ctx, req, s, tmpl, token, began, "restoredFrom", src.dir, "restoreMs", ms(tRestored.Sub(began)))
}

// initFor is the /init that gives a sandbox of t its user's envVars,
// its identity (E2B_SANDBOX_ID, E2B_TEMPLATE_ID: templateID, which is
// t's or a snapshot's) and its access token, and t's defaults.
func initFor(t Template, vars map[string]string, id, templateID, token string) initRequest {
	env := make(map[string]string, len(t.Env)+len(vars)+2)
	for _, kv := range t.Env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	for k, v := range vars {
		env[k] = v
	}
	env["E2B_SANDBOX_ID"] = id
	env["E2B_TEMPLATE_ID"] = templateID
	user := t.User
	if user == "" {
		// E2B's sandboxes run commands as "user" unless told otherwise.
		user = EnvdUser
	}
	return initRequest{EnvVars: env, AccessToken: token, Timestamp: time.Now().UTC(), DefaultUser: user, DefaultWorkdir: t.Workdir}
}

// ForkResult is one copy of a fork: a sandbox or why it did not start.
type ForkResult struct {
	Info Info
	Err  error
}

// Fork snapshots sandbox id once and starts count sandboxes from the
// snapshot, each with timeout to live and the source's template, limits,
// metadata, envVars and egress policy. The source runs on (a paused one
// stays paused). Each copy succeeds or fails on its own; an error is
// returned only when none could be tried.
func (o *Orchestrator) Fork(ctx context.Context, id string, count int, timeout time.Duration) ([]ForkResult, error) {
	if count < 1 || count > MaxForks {
		return nil, fmt.Errorf("%w: count must be between 1 and %d", ErrInvalid, MaxForks)
	}
	if err := o.checkTimeout(timeout); err != nil {
		return nil, err
	}
	snapper, err := o.snapshotter()
	if err != nil {
		return nil, err
	}
	sb, err := o.Get(id)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(o.opts.SnapshotDir, forksDir, NewID())
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return nil, fmt.Errorf("orchestrator: %w", err)
	}
	defer os.RemoveAll(dir)

	sb.mu.Lock()
	if sb.gone {
		sb.mu.Unlock()
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	rec := sb.rec
	rec.Metadata, rec.EnvVars = cloneMap(rec.Metadata), cloneMap(rec.EnvVars)
	switch rec.PausedOnDisk {
	case store.PausedFilesystem:
		err = fmt.Errorf("%w: sandbox %s was paused without its memory; resume it first", ErrInvalid, id)
	case store.PausedMemory:
		err = copyDir(ctx, o.pausedPath(id), dir)
	default:
		err = snapper.Snapshot(ctx, id, dir, runtime.SnapshotOptions{Memory: true, Temporary: true})
	}
	sb.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("orchestrator: fork of %s: %w", id, err)
	}
	t, err := o.opts.Templates.Lookup(sb.baseTemplateOf(rec))
	if err != nil {
		return nil, fmt.Errorf("%w: the template of sandbox %s is gone", ErrTemplateNotFound, id)
	}
	t.CPUCount, t.MemoryMB, t.DiskSizeMB = rec.CPUCount, rec.MemoryMB, rec.DiskSizeMB
	src := restoreSource{dir: dir, tmpl: t, token: rec.EnvdAccessToken, memory: true}
	// Forks report the source's template, as the source does.
	shown := t
	shown.ID, shown.Alias = rec.TemplateID, rec.Alias
	if rec.BaseTemplate != "" {
		shown.base = rec.BaseTemplate
	}
	req := CreateRequest{
		Template: rec.TemplateID, Timeout: timeout, AutoPause: rec.AutoPause, AutoPauseFilesOnly: rec.AutoPauseFilesOnly,
		AutoResume: rec.AutoResume, AllowInternet: rec.AllowInternet, Network: rec.Network, Egress: rec.Egress,
		PublicTraffic: rec.TrafficToken == "", Metadata: rec.Metadata, EnvVars: rec.EnvVars,
		APIKeyID: rec.APIKeyID, Owner: rec.Owner, Volumes: mountsOf(rec.Volumes),
	}
	results := make([]ForkResult, count)
	sem := make(chan struct{}, forkParallel)
	var wg sync.WaitGroup
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			results[i].Info, results[i].Err = o.startRestored(ctx, req, src, shown)
		}()
	}
	wg.Wait()
	return results, nil
}

// mountsOf is the volumes a restored sandbox has: the runtime mounts
// its snapshot's (runtime.Snapshotter), so only the record's part is known
// here.
func mountsOf(vs []store.VolumeMount) []VolumeMount {
	var out []VolumeMount
	for _, v := range vs {
		out = append(out, VolumeMount{VolumeMount: v})
	}
	return out
}

// baseTemplate is the template whose files the sandbox sees.
func (s *Sandbox) baseTemplate() string { return s.baseTemplateOf(s.rec) }

func (s *Sandbox) baseTemplateOf(rec store.Sandbox) string {
	if rec.BaseTemplate != "" {
		return rec.BaseTemplate
	}
	return rec.TemplateID
}

// copyDir copies a snapshot directory, sharing extents where the
// filesystem can.
func copyDir(ctx context.Context, src, dst string) error {
	if _, err := os.Stat(src); err != nil {
		return err
	}
	return sparse.CopyTree(ctx, src, dst)
}

// adoptPausedOnDisk takes a sandbox paused to disk back after a restart,
// reporting false when its pause is gone (then it is dropped as dead).
func (o *Orchestrator) adoptPausedOnDisk(rec store.Sandbox) bool {
	if o.opts.SnapshotDir == "" {
		return false
	}
	if _, err := os.Stat(filepath.Join(o.pausedPath(rec.ID))); err != nil {
		o.log.Error("a sandbox paused to disk lost its pause", "sandbox", rec.ID, "err", err)
		return false
	}
	rec.State = StatePaused
	o.sandboxes[rec.ID] = &Sandbox{rec: rec}
	o.log.Info("adopted sandbox paused to disk", "sandbox", rec.ID, "saved", rec.PausedOnDisk)
	return true
}

// sweepSnapshots removes what crashes left in SnapshotDir: forks' snapshots,
// pauses and snapshots that no record names, half-written ones.
func (o *Orchestrator) sweepSnapshots(ctx context.Context) {
	if o.opts.SnapshotDir == "" {
		return
	}
	o.sweepCheckpoints(ctx) // checkpoint.go
	remove := func(path, why string) {
		o.log.Info("removing a leftover snapshot", "path", path, "why", why)
		if err := os.RemoveAll(path); err != nil {
			o.log.Warn("removing a leftover snapshot", "path", path, "err", err)
		}
	}
	if _, err := os.Stat(filepath.Join(o.opts.SnapshotDir, forksDir)); err == nil {
		remove(filepath.Join(o.opts.SnapshotDir, forksDir), "forks finish in one request")
	}
	paused, _ := os.ReadDir(filepath.Join(o.opts.SnapshotDir, pausedDir))
	for _, e := range paused {
		if sb, ok := o.sandboxes[e.Name()]; !ok || sb.rec.PausedOnDisk == "" {
			remove(o.pausedPath(e.Name()), "no sandbox is paused there")
		}
	}
	ents, _ := os.ReadDir(o.opts.SnapshotDir)
	for _, e := range ents {
		name := e.Name()
		if name == pausedDir || name == forksDir {
			continue
		}
		if _, err := o.opts.Store.GetSnapshot(ctx, name); errors.Is(err, store.ErrNotFound) {
			remove(filepath.Join(o.opts.SnapshotDir, name), "no snapshot record names it")
		}
	}
}

// TemplateInUse says why template id must stay ("" if nothing needs it):
// sandboxes made from it (their overlays read its files) or snapshots of
// them.
func (o *Orchestrator) TemplateInUse(ctx context.Context, id string) string {
	for _, sb := range o.All() {
		in := sb.Info()
		if in.TemplateID == id || in.BaseTemplate == id {
			return fmt.Sprintf("sandbox %s was made from it", in.ID)
		}
	}
	sns, err := o.opts.Store.ListSnapshots(ctx, store.SnapshotFilter{})
	if err != nil {
		return err.Error()
	}
	for _, sn := range sns {
		if sn.TemplateID == id {
			return fmt.Sprintf("snapshot %s was made from it", sn.ID)
		}
	}
	return ""
}
