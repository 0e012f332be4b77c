package gvisor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/cubicle-dev/cubicle/runtime"
)

// record is what sandbox.json keeps of a sandbox, so that List and Stats
// work for sandboxes a previous server process started.
type record struct {
	Config  runtime.Config `json:"config"`
	Addr    netip.Addr     `json:"addr"`
	Created time.Time      `json:"created"`
	// Disk is the sandbox's own filesystem (disk.go); nil when
	// Config.DiskSizeMB is 0, and in sandboxes made before disks were
	// enforced: their upper/ and work/ are in the sandbox directory.
	Disk *disk `json:"disk,omitempty"`
}

const recordFile = "sandbox.json"

// killTimeout bounds each runsc command of Kill.
const killTimeout = 10 * time.Second

// Create implements runtime.Runtime. It claims StateDir/<id>, mounts the
// sandbox's disk (DiskSizeMB > 0) and the overlay, writes the bundle (the
// sandbox joins Config.Network's namespace) and runs `runsc create` and
// `runsc start`. On error everything it made is removed again; the
// network is the caller's.
func (r *Runtime) Create(ctx context.Context, cfg runtime.Config) (runtime.Sandbox, error) {
	return r.create(ctx, cfg, nil)
}

// create is Create, or Restore when snap is not nil: the sandbox's disk
// is then a copy of the snapshot's, and runsc restores its processes
// from the snapshot's checkpoint if it has one.
func (r *Runtime) create(ctx context.Context, cfg runtime.Config, snap *snapshot) (sb runtime.Sandbox, err error) {
	if err := r.checkConfig(cfg); err != nil {
		return runtime.Sandbox{}, err
	}
	start := time.Now()
	dir := r.sandboxDir(cfg.ID)
	// Mkdir is the claim on the ID: it fails if another Create (in this
	// process or an earlier one) holds it.
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return runtime.Sandbox{}, fmt.Errorf("%w: %s", ErrExists, cfg.ID)
		}
		return runtime.Sandbox{}, fmt.Errorf("gvisor: create sandbox dir: %w", err)
	}
	defer func() {
		if err != nil {
			if kerr := r.Kill(context.WithoutCancel(ctx), cfg.ID); kerr != nil {
				r.log.Error("cleaning up failed create", "sandbox", cfg.ID, "err", kerr)
			}
		}
	}()
	att := cfg.Network
	rec := record{Config: cfg, Addr: att.Addr, Created: start.UTC()}
	// Written first, so that a crash anywhere below leaves a sandbox that
	// List reports (as stopped) and Kill removes.
	if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("gvisor: write %s: %w", recordFile, err)
	}
	tRecord := time.Now()

	if snap != nil {
		if rec.Disk, err = r.restoreDisk(dir, snap); err != nil {
			return runtime.Sandbox{}, fmt.Errorf("gvisor: disk from snapshot: %w", err)
		}
	} else if cfg.DiskSizeMB > 0 && r.noDisks == "" {
		if rec.Disk, err = r.setupDisk(dir, cfg.DiskSizeMB, ""); err != nil {
			return runtime.Sandbox{}, fmt.Errorf("gvisor: disk: %w", err)
		}
	}
	if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("gvisor: write %s: %w", recordFile, err)
	}
	tDisk := time.Now()

	upper, work := upperDirs(dir, rec.Disk)
	if err := mountOverlay(cfg.RootFS, upper, work, filepath.Join(dir, "rootfs")); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("gvisor: %w", err)
	}
	// A template without /tmp gets one in the sandbox's own layer: the spec
	// binds it (see spec).
	if err := ensureTmpDir(filepath.Join(dir, "rootfs", "tmp")); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("gvisor: %w", err)
	}
	if cfg.GatewayDNS {
		if err := writeResolvConf(dir, att.Gateway); err != nil {
			return runtime.Sandbox{}, fmt.Errorf("gvisor: %w", err)
		}
	}
	if err := writeJSON(filepath.Join(dir, "config.json"), r.spec(cfg, dir)); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("gvisor: write config.json: %w", err)
	}
	tBundle := time.Now()

	if snap != nil && snap.meta.Memory {
		err = r.restore(ctx, cfg.ID, dir, snap)
	} else {
		err = r.start(ctx, cfg.ID, dir)
	}
	if err != nil {
		return runtime.Sandbox{}, err
	}
	r.log.Info("sandbox created", "sandbox", cfg.ID, "addr", att.Addr,
		"total", time.Since(start), "record", tRecord.Sub(start), "disk", tDisk.Sub(tRecord), "bundle", tBundle.Sub(tDisk), "runsc", time.Since(tBundle))
	return runtime.Sandbox{ID: cfg.ID, Addr: att.Addr, State: runtime.StateRunning}, nil
}

func (r *Runtime) checkConfig(cfg runtime.Config) error {
	if err := checkID(cfg.ID); err != nil {
		return err
	}
	if err := checkLowerDir(cfg.RootFS); err != nil {
		return err
	}
	if n := cfg.Network; n.Netns == "" || !filepath.IsAbs(n.Netns) || !n.Addr.IsValid() || !n.Gateway.IsValid() {
		return fmt.Errorf("%w: Network needs a namespace path, an address and a gateway (got %q, %v, %v)",
			ErrInvalidConfig, n.Netns, n.Addr, n.Gateway)
	}
	if cfg.CPUCount < 1 || cfg.MemoryMB < 1 || cfg.DiskSizeMB < 0 {
		return fmt.Errorf("%w: CPUCount %d, MemoryMB %d and DiskSizeMB %d must be positive",
			ErrInvalidConfig, cfg.CPUCount, cfg.MemoryMB, cfg.DiskSizeMB)
	}
	if !filepath.IsAbs(cfg.Envd) {
		return fmt.Errorf("%w: Envd %q must be an absolute path", ErrInvalidConfig, cfg.Envd)
	}
	if fi, err := os.Stat(cfg.Envd); err != nil || !fi.Mode().IsRegular() || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%w: Envd %q is not an executable file", ErrInvalidConfig, cfg.Envd)
	}
	return checkVolumes(cfg)
}

// start runs `runsc create` then `runsc start` for the bundle in dir.
func (r *Runtime) start(ctx context.Context, id, dir string) error {
	// envd's stdout and stderr go to one file, never a pipe: a pipe would
	// die with this process (and SIGPIPE envd) while the sandbox is meant
	// to outlive it. O_APPEND matters: gVisor writes each of the two
	// descriptors at its own offset, and without it stdout and stderr
	// overwrite each other (the "stdout to a regular file loses data"
	// pitfall).
	out, err := os.OpenFile(filepath.Join(dir, "envd.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("gvisor: open envd.log: %w", err)
	}
	defer out.Close()
	logPath := filepath.Join(dir, "runsc.log")
	// create and start rather than `run --detach`: measured the same,
	// and a failure says which half failed.
	args := append(r.globalFlags(), "--log="+logPath, "create", "--bundle="+dir, id)
	cmd := exec.CommandContext(ctx, r.runsc, args...)
	cmd.Stdin = nil // /dev/null
	// runsc create hands its own stdio to the container, so it gets the
	// log file, never a pipe: a pipe's reader (this process) would wait for
	// EOF until the sandbox exits.
	cmd.Stdout, cmd.Stderr = out, out
	// A session of its own: the sandbox must not get the server's terminal
	// signals (Ctrl-C) or die with its process group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Run(); err != nil {
		return &RunscError{Args: []string{"create", id}, Output: lastError(logPath), Err: err}
	}
	r.log.Debug("runsc create done", "sandbox", id)
	if _, err := r.runscCmd(ctx, "start", id); err != nil {
		return err
	}
	return nil
}

// lastError extracts the last error runsc wrote into its --log file: one
// JSON object per error, {"msg": ..., "level": "error", ...}.
func lastError(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		var e struct{ Msg string }
		if json.Unmarshal([]byte(lines[i]), &e) == nil && e.Msg != "" {
			return e.Msg
		}
	}
	if n := len(b); n > 2048 {
		b = b[n-2048:]
	}
	return string(b)
}

func (r *Runtime) globalFlags() []string {
	return append([]string(nil), r.flags...)
}

// runscCmd runs one runsc subcommand and returns its stdout.
func (r *Runtime) runscCmd(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, r.runsc, append(r.globalFlags(), args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Run(); err != nil {
		return nil, &RunscError{Args: args, Output: stderr.String(), Err: err}
	}
	return stdout.Bytes(), nil
}

// readRecord loads sandbox.json of id; runtime.ErrNotFound if there is none.
func (r *Runtime) readRecord(id string) (record, error) {
	var rec record
	if err := checkID(id); err != nil {
		return rec, fmt.Errorf("%w: %w", runtime.ErrNotFound, err)
	}
	b, err := os.ReadFile(filepath.Join(r.sandboxDir(id), recordFile))
	if errors.Is(err, fs.ErrNotExist) {
		return rec, fmt.Errorf("%w: %s", runtime.ErrNotFound, id)
	}
	if err != nil {
		return rec, fmt.Errorf("gvisor: read %s of %s: %w", recordFile, id, err)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, fmt.Errorf("gvisor: parse %s of %s: %w", recordFile, id, err)
	}
	return rec, nil
}

// Pause implements runtime.Runtime: `runsc pause` stops every task of the
// sandbox inside the sentry, keeping all its memory and state.
func (r *Runtime) Pause(ctx context.Context, id string) error {
	if _, err := r.readRecord(id); err != nil {
		return err
	}
	if _, err := r.runscCmd(ctx, "pause", id); err != nil {
		return err
	}
	r.log.Info("sandbox paused", "sandbox", id)
	return nil
}

// Resume implements runtime.Runtime.
func (r *Runtime) Resume(ctx context.Context, id string) error {
	if _, err := r.readRecord(id); err != nil {
		return err
	}
	if _, err := r.runscCmd(ctx, "resume", id); err != nil {
		return err
	}
	r.log.Info("sandbox resumed", "sandbox", id)
	return nil
}

// Kill implements runtime.Runtime. Each step tolerates its part being gone
// already, so Kill finishes a Kill or Create that was interrupted (by an
// error or a crash) and a second Kill is a no-op. It does not stop at the
// first error: it removes all it can and reports what it could not.
func (r *Runtime) Kill(ctx context.Context, id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	// Past this point, cancellation would only leave litter behind; but a
	// wedged sandbox must not hang Kill, so runsc gets a bounded time and
	// the cgroup fallback below does the rest.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killTimeout)
	defer cancel()
	dir := r.sandboxDir(id)
	var errs []error

	// runsc kill fails when the sandbox has stopped or never started;
	// delete --force does the rest either way.
	if _, err := r.runscCmd(ctx, "kill", id, "KILL"); err != nil {
		r.log.Debug("runsc kill", "sandbox", id, "err", err)
	}
	derr := r.deleteContainer(ctx, id)

	cg, err := hostCgroups()
	if err != nil {
		errs = append(errs, err)
	} else if err := cg.remove(r.cgroupPath(id)); err != nil {
		// remove also kills any process runsc left behind.
		errs = append(errs, err)
	}
	if derr != nil {
		// Retry now that nothing of the sandbox runs any more.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killTimeout)
		defer cancel()
		if err := r.deleteContainer(ctx, id); err != nil {
			errs = append(errs, err)
		}
	}
	// The overlay first: it holds the disk busy. A sandbox without a disk
	// (DiskSizeMB 0, or made before disks) has nothing mounted there.
	if err := unmount(filepath.Join(dir, "rootfs")); err != nil {
		errs = append(errs, err)
	} else if err := unmountDisk(dir); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		// Keep the directory (and sandbox.json): List still shows the
		// sandbox, so the caller can Kill it again.
		return fmt.Errorf("gvisor: kill %s: %w", id, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("gvisor: kill %s: remove %s: %w", id, dir, err)
	}
	r.log.Info("sandbox killed", "sandbox", id)
	return nil
}

// deleteContainer runs `runsc delete --force`; a container runsc does not
// know is already deleted.
func (r *Runtime) deleteContainer(ctx context.Context, id string) error {
	_, err := r.runscCmd(ctx, "delete", "--force", id)
	var re *RunscError
	if errors.As(err, &re) && strings.Contains(re.Output, "does not exist") {
		return nil
	}
	return err
}

// containerState is the part of runsc's `list --format=json` output used.
type containerState struct {
	ID     string `json:"id"`
	Status string `json:"status"`
}

// List implements runtime.Runtime. Every directory with a sandbox.json is a
// sandbox, and so is every container in runsc's root; runsc says whether it
// runs. One that runsc does not know, or that was created but never started
// (a crash mid-Create), is stopped.
func (r *Runtime) List(ctx context.Context) ([]runtime.Sandbox, error) {
	out, err := r.runscCmd(ctx, "list", "--format=json")
	if err != nil {
		return nil, err
	}
	var states []containerState
	if err := json.Unmarshal(out, &states); err != nil {
		return nil, fmt.Errorf("gvisor: parse runsc list: %w", err)
	}
	status := make(map[string]string, len(states))
	for _, s := range states {
		status[s.ID] = s.Status
	}
	ents, err := os.ReadDir(r.stateDir)
	if err != nil {
		return nil, fmt.Errorf("gvisor: read state dir: %w", err)
	}
	var sbs []runtime.Sandbox
	for _, e := range ents {
		if !e.IsDir() || checkID(e.Name()) != nil {
			continue
		}
		rec, err := r.readRecord(e.Name())
		if errors.Is(err, runtime.ErrNotFound) {
			continue // not a sandbox directory
		}
		if err != nil {
			return nil, err
		}
		sb := runtime.Sandbox{ID: rec.Config.ID, Addr: rec.Addr, State: stateOf(status[rec.Config.ID])}
		sbs = append(sbs, sb)
		delete(status, sb.ID)
	}
	// Containers in runsc's root whose directory is gone (removed by hand,
	// or a crash in Kill) are still this runtime's: report them, so that
	// the caller kills them. Their address went with sandbox.json.
	for id, st := range status {
		if checkID(id) != nil {
			continue
		}
		sbs = append(sbs, runtime.Sandbox{ID: id, State: stateOf(st)})
	}
	sort.Slice(sbs, func(i, j int) bool { return sbs[i].ID < sbs[j].ID })
	return sbs, nil
}

// stateOf maps a runsc container status to a runtime.State. "created"
// (never started) and "stopped" are both stopped: neither runs envd.
func stateOf(status string) runtime.State {
	switch status {
	case "running":
		return runtime.StateRunning
	case "paused":
		return runtime.StatePaused
	}
	return runtime.StateStopped
}

// Stats implements runtime.Runtime: CPU and memory from the sandbox's host
// cgroups (they hold the sentry and the gofer, so they include gVisor's own
// overhead), disk from the sandbox's own filesystem: its blocks in use
// less those of a fresh one, so the files' blocks and the filesystem
// metadata they need. DiskTotal is Config.DiskSizeMB, the size of that
// filesystem. A sandbox without one (DiskSizeMB 0, or made before disks
// were enforced) reports the space its upper layer takes on the host.
func (r *Runtime) Stats(ctx context.Context, id string) (runtime.Stats, error) {
	rec, err := r.readRecord(id)
	if err != nil {
		return runtime.Stats{}, err
	}
	cg, err := hostCgroups()
	if err != nil {
		return runtime.Stats{}, err
	}
	s, err := cg.stats(r.cgroupPath(id))
	if errors.Is(err, fs.ErrNotExist) {
		return runtime.Stats{}, fmt.Errorf("gvisor: stats of %s: sandbox is not running: %w", id, err)
	}
	if err != nil {
		return runtime.Stats{}, fmt.Errorf("gvisor: stats of %s: %w", id, err)
	}
	if s.DiskUsed, err = r.diskUsed(id, rec.Disk); err != nil {
		return runtime.Stats{}, fmt.Errorf("gvisor: disk usage of %s: %w", id, err)
	}
	s.DiskTotal = uint64(rec.Config.DiskSizeMB) << 20
	return s, nil
}

func (r *Runtime) diskUsed(id string, d *disk) (uint64, error) {
	if d == nil {
		upper, _ := upperDirs(r.sandboxDir(id), nil)
		return diskUsage(upper)
	}
	used, err := usedBytes(filepath.Join(r.sandboxDir(id), diskMount))
	if err != nil {
		return 0, err
	}
	return used - min(used, d.BaseUsed), nil
}

// ensureTmpDir makes a world-writable sticky /tmp when it is missing.
func ensureTmpDir(dir string) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return os.Chmod(dir, 0o777|os.ModeSticky)
}
