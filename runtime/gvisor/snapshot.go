package gvisor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/sparse"
	"github.com/cubicle-dev/cubicle/runtime"
)

// A snapshot directory holds:
//
//   - snapshot.json: snapshotMeta, written last, so a directory without it
//     is not a snapshot;
//   - disk.img: a copy of the sandbox's disk (its overlay's upper layer)
//     at the instant of the checkpoint, or upper/, a copy of the upper
//     directory, for a sandbox without a disk of its own;
//   - checkpoint/: runsc's image of the sentry (every process, its memory
//     and the kernel's state, netstack included), when Memory was asked.
//
// The template (the overlay's lower layer) is not copied: the snapshot
// names it, and a restore mounts the same directory.
const (
	snapshotMetaFile = "snapshot.json"
	snapshotCkptDir  = "checkpoint"
	snapshotUpperDir = "upper"
	// snapshotVersion changes whenever the directory's layout does; a
	// snapshot of another version is refused, never guessed at.
	snapshotVersion = 1
)

// snapshotMeta is snapshot.json.
type snapshotMeta struct {
	Version int `json:"version"`
	// Runtime is Name: a snapshot is one backend's.
	Runtime string `json:"runtime"`
	// Runsc identifies the runsc binary that wrote the checkpoint; runsc
	// reads only its own images.
	Runsc string `json:"runsc"`
	// Config is the snapshotted sandbox's, its network as it was.
	Config runtime.Config `json:"config"`
	// Memory says checkpoint/ is there.
	Memory bool `json:"memory"`
	// Disk is the snapshotted sandbox's disk record, nil when the upper
	// layer is a directory (upper/).
	Disk    *disk     `json:"disk,omitempty"`
	Created time.Time `json:"created"`
}

// snapshot is a snapshot directory that loadSnapshot checked.
type snapshot struct {
	dir  string
	meta snapshotMeta
}

// Snapshot implements runtime.Snapshotter. The sandbox is paused (if it
// runs) for all of it, so that the filesystem copy and the checkpoint are
// of one instant: runsc's checkpoint first writes back what the sentry
// holds of files, the disk is synced, then copied.
func (r *Runtime) Snapshot(ctx context.Context, id, dir string, opts runtime.SnapshotOptions) (err error) {
	start := time.Now()
	rec, err := r.readRecord(id)
	if err != nil {
		return err
	}
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("gvisor: snapshot of %s: %s exists", id, dir)
	}
	st, err := r.state(ctx, id)
	if err != nil {
		return err
	}
	switch st {
	case runtime.StateRunning:
		if _, err := r.runscCmd(ctx, "pause", id); err != nil {
			return err
		}
		defer func() {
			// The sandbox runs on whatever happened to the snapshot.
			if _, rerr := r.runscCmd(context.WithoutCancel(ctx), "resume", id); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}()
	case runtime.StatePaused:
	default:
		return fmt.Errorf("gvisor: snapshot of %s: sandbox is %s", id, st)
	}
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return err
	}
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return fmt.Errorf("gvisor: snapshot of %s: %w", id, err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	tPause := time.Now()
	if opts.Memory {
		// --leave-running: the sandbox goes on (here: stays paused)
		// instead of exiting once saved.
		if _, err := r.runscCmd(ctx, "checkpoint", "--leave-running", "--image-path="+filepath.Join(tmp, snapshotCkptDir), id); err != nil {
			return err
		}
	}
	tCkpt := time.Now()
	sbDir := r.sandboxDir(id)
	if rec.Disk != nil {
		if err := syncFS(filepath.Join(sbDir, diskMount)); err != nil {
			return fmt.Errorf("gvisor: snapshot of %s: %w", id, err)
		}
		if err := sparse.Copy(filepath.Join(sbDir, diskImage), filepath.Join(tmp, diskImage)); err != nil {
			return fmt.Errorf("gvisor: snapshot of %s: copy disk: %w", id, err)
		}
	} else {
		upper, _ := upperDirs(sbDir, nil)
		if err := sparse.CopyTree(ctx, upper, filepath.Join(tmp, snapshotUpperDir)); err != nil {
			return fmt.Errorf("gvisor: snapshot of %s: %w", id, err)
		}
	}
	tDisk := time.Now()
	meta := snapshotMeta{Version: snapshotVersion, Runtime: Name, Runsc: r.runscID(), Config: rec.Config,
		Memory: opts.Memory, Disk: rec.Disk, Created: start.UTC()}
	if err := writeJSON(filepath.Join(tmp, snapshotMetaFile), meta); err != nil {
		return err
	}
	if !opts.Temporary {
		// Durable before it is named: whoever records the snapshot must
		// find it whole after a crash of the host.
		if err := syncFS(tmp); err != nil {
			return err
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("gvisor: snapshot of %s: %w", id, err)
	}
	r.log.Info("sandbox snapshotted", "sandbox", id, "dir", dir, "memory", opts.Memory,
		"total", time.Since(start), "pause", tPause.Sub(start), "checkpoint", tCkpt.Sub(tPause), "disk", tDisk.Sub(tCkpt))
	return nil
}

// Restore implements runtime.Snapshotter.
func (r *Runtime) Restore(ctx context.Context, cfg runtime.Config, dir string) (runtime.Sandbox, error) {
	snap, err := r.loadSnapshot(dir)
	if err != nil {
		return runtime.Sandbox{}, err
	}
	src := snap.meta.Config
	switch {
	case filepath.Clean(cfg.RootFS) != filepath.Clean(src.RootFS):
		return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot was made on template %s, not %s", ErrInvalidConfig, src.RootFS, cfg.RootFS)
	case cfg.DiskSizeMB != src.DiskSizeMB:
		return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot's disk is %d MiB, not %d", ErrInvalidConfig, src.DiskSizeMB, cfg.DiskSizeMB)
	case snap.meta.Memory && cfg.MemoryMB < src.MemoryMB:
		return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot's processes had %d MiB of memory; %d is too little", ErrInvalidConfig, src.MemoryMB, cfg.MemoryMB)
	}
	// The snapshot's processes had its volumes open: they come back with
	// it, from the same host directories.
	if cfg.Volumes == nil {
		cfg.Volumes = src.Volumes
	}
	for _, v := range cfg.Volumes {
		if fi, err := os.Stat(v.HostDir); err != nil || !fi.IsDir() {
			return runtime.Sandbox{}, fmt.Errorf("%w: the volume the snapshot mounted at %s is gone", ErrInvalidConfig, v.Path)
		}
	}
	return r.create(ctx, cfg, snap)
}

// loadSnapshot reads and checks dir's snapshot.json.
func (r *Runtime) loadSnapshot(dir string) (*snapshot, error) {
	b, err := os.ReadFile(filepath.Join(dir, snapshotMetaFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s is not a snapshot", ErrInvalidConfig, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("gvisor: read snapshot: %w", err)
	}
	var m snapshotMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: snapshot %s: %v", ErrInvalidConfig, dir, err)
	}
	switch {
	case m.Runtime != Name:
		return nil, fmt.Errorf("%w: snapshot %s is of the %q backend", ErrInvalidConfig, dir, m.Runtime)
	case m.Version != snapshotVersion:
		return nil, fmt.Errorf("%w: snapshot %s has version %d; this server reads %d", ErrInvalidConfig, dir, m.Version, snapshotVersion)
	case m.Memory && m.Runsc != r.runscID():
		return nil, fmt.Errorf("%w: snapshot %s was written by another runsc (%s; this is %s)", ErrInvalidConfig, dir, m.Runsc, r.runscID())
	}
	return &snapshot{dir: dir, meta: m}, nil
}

// restoreDisk gives the sandbox in dir a copy of the snapshot's upper
// layer: its disk, or its upper directory.
func (r *Runtime) restoreDisk(dir string, snap *snapshot) (*disk, error) {
	if snap.meta.Disk == nil {
		upper, _ := upperDirs(dir, nil)
		return nil, sparse.CopyTree(context.Background(), filepath.Join(snap.dir, snapshotUpperDir), upper)
	}
	if r.noDisks != "" {
		return nil, fmt.Errorf("the snapshot has a disk and this host cannot mount one: %s", r.noDisks)
	}
	if _, err := r.setupDisk(dir, snap.meta.Config.DiskSizeMB, filepath.Join(snap.dir, diskImage)); err != nil {
		return nil, err
	}
	// Usage is counted from a fresh filesystem, not from the snapshot's.
	return snap.meta.Disk, nil
}

// restore runs `runsc restore` for the bundle in dir: the sandbox starts
// with the snapshot's processes, memory and kernel state.
func (r *Runtime) restore(ctx context.Context, id, dir string, snap *snapshot) error {
	out, err := os.OpenFile(filepath.Join(dir, "envd.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("gvisor: open envd.log: %w", err)
	}
	defer out.Close()
	logPath := filepath.Join(dir, "runsc.log")
	args := append(r.globalFlags(), "--log="+logPath, "restore", "--detach",
		"--image-path="+filepath.Join(snap.dir, snapshotCkptDir), "--bundle="+dir, id)
	cmd := exec.CommandContext(ctx, r.runsc, args...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Run(); err != nil {
		return &RunscError{Args: []string{"restore", id}, Output: lastError(logPath), Err: err}
	}
	return nil
}

// state asks runsc whether sandbox id runs.
func (r *Runtime) state(ctx context.Context, id string) (runtime.State, error) {
	out, err := r.runscCmd(ctx, "state", id)
	if err != nil {
		return "", err
	}
	var s containerState
	if err := json.Unmarshal(out, &s); err != nil {
		return "", fmt.Errorf("gvisor: parse runsc state: %w", err)
	}
	return stateOf(s.Status), nil
}

// runscID names the runsc binary by its size and modification time,
// which change with every install of another build.
func (r *Runtime) runscID() string {
	fi, err := os.Stat(r.runsc)
	if err != nil {
		return r.runsc
	}
	return fmt.Sprintf("%s@%d.%d", r.runsc, fi.Size(), fi.ModTime().Unix())
}

// syncFS writes back every dirty page of the filesystem holding path.
func syncFS(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", path, err)
	}
	return nil
}
