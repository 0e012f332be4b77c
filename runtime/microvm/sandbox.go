//go:build linux && amd64

package microvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/sparse"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
)

// record is sandbox.json: what List, Stats, Wait and Kill need of a
// sandbox a previous server process may have started.
type record struct {
	Config  runtime.Config `json:"config"`
	Addr    netip.Addr     `json:"addr"`
	Created time.Time      `json:"created"`
	// Pid is the VMM process and PidStart its start time (field 22 of
	// /proc/<pid>/stat), which tells it from a later process that got
	// the same pid. Zero until the VMM holds the sandbox.
	Pid      int    `json:"pid,omitempty"`
	PidStart uint64 `json:"pidStart,omitempty"`
	// Snapshot is the template snapshot's directory it was restored from
	// (empty for a sandbox restored from a sandbox snapshot).
	Snapshot string `json:"snapshot,omitempty"`
	// Origin is what its guest was made from, which its snapshots record
	// (sandboxsnap.go).
	Origin *origin `json:"origin,omitempty"`
	// Jail is the VMM's jail (root and cgroups), nil if unjailed; set as
	// soon as the sandbox has its VMM, so that Kill removes it whatever
	// happens after.
	Jail *jailer.Handle `json:"jail,omitempty"`
}

const recordFile = "sandbox.json"

func (r *Runtime) paths(id string) (dir, sock, vsock, disk, console string) {
	dir = r.sandboxDir(id)
	return dir, filepath.Join(dir, "vmm.sock"), filepath.Join(dir, "vsock.sock"), filepath.Join(dir, "disk.img"), filepath.Join(dir, "console.log")
}

func (r *Runtime) checkConfig(cfg runtime.Config) error {
	if err := checkID(cfg.ID); err != nil {
		return err
	}
	// No device of the VMM shares a host directory (virtio-fs would):
	// refused before anything is made.
	if len(cfg.Volumes) > 0 {
		return fmt.Errorf("%w: volumes are not supported by the microvm backend (it cannot share a host directory read-write)", runtime.ErrUnsupported)
	}
	if cfg.CPUCount < 1 || cfg.MemoryMB < 1 || cfg.DiskSizeMB < 1 {
		return fmt.Errorf("%w: CPUCount %d, MemoryMB %d and DiskSizeMB %d must be positive (a microVM needs a disk)",
			ErrInvalidConfig, cfg.CPUCount, cfg.MemoryMB, cfg.DiskSizeMB)
	}
	if n := cfg.Network; n.Tap == "" || !filepath.IsAbs(n.Netns) || !n.Addr.IsValid() {
		return fmt.Errorf("%w: Network must be a claimed tap-mode attachment (tap %q in netns %q, address %v)",
			ErrInvalidConfig, n.Tap, n.Netns, n.Addr)
	}
	return nil
}

// Create implements runtime.Runtime: claim StateDir/<id>, find (or
// build) the template snapshot, attach the network, copy the disk, restore
// the snapshot in a pooled VMM process, detach it, and give the guest its
// identity. On error everything made is removed again.
func (r *Runtime) Create(ctx context.Context, cfg runtime.Config) (sb runtime.Sandbox, err error) {
	if err := r.checkConfig(cfg); err != nil {
		return runtime.Sandbox{}, err
	}
	start := time.Now()
	dir, sock, uds, diskPath, console := r.paths(cfg.ID)
	if err := claimDir(cfg.ID, dir); err != nil {
		return runtime.Sandbox{}, err
	}
	var proc *control.Process
	defer func() {
		if err == nil {
			return
		}
		if proc != nil {
			proc.Kill()
		}
		if kerr := r.Kill(context.WithoutCancel(ctx), cfg.ID); kerr != nil {
			r.log.Error("cleaning up failed create", "sandbox", cfg.ID, "err", kerr)
		}
	}()
	rec := record{Config: cfg, Created: start.UTC()}
	// Written first, so that a crash anywhere below leaves a sandbox that
	// List reports (as stopped) and Kill removes.
	if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: write %s: %w", recordFile, err)
	}
	snap, err := r.snapshot(ctx, cfg)
	if err != nil {
		return runtime.Sandbox{}, err
	}
	rec.Snapshot = snap.Dir
	org := originOfTemplate(snap.Meta)
	rec.Origin = &org
	tSnap := time.Now()

	att := cfg.Network
	rec.Addr = att.Addr
	tap, err := openTap(att)
	if err != nil {
		return runtime.Sandbox{}, err
	}
	defer tap.Close()
	if err := sparse.Copy(snap.disk(), diskPath); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: disk: %w", err)
	}
	disk, err := os.OpenFile(diskPath, os.O_RDWR, 0)
	if err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: disk: %w", err)
	}
	defer disk.Close()

	image, err := os.Open(snap.Image)
	if err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: template image: %w", err)
	}
	defer image.Close()
	tDevs := time.Now()

	pool, err := r.pool(snap)
	if err != nil {
		return runtime.Sandbox{}, err
	}
	if proc, err = pool.Get(ctx); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: VMM pool: %w", err)
	}
	// The paths as the VMM sees them: in its jail, if it has one.
	vmmSock, vmmUDS, vmmConsole := sock, uds, console
	if j := proc.Jail(); j != nil {
		h := j.Handle()
		rec.Jail = &h
		if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
			return runtime.Sandbox{}, fmt.Errorf("microvm: write %s: %w", recordFile, err)
		}
		vmmSock, vmmUDS, vmmConsole = jailVMMSock, jailVsock, jailConsole
		_, uds, console = r.vmmPaths(cfg.ID, rec)
	}
	prepared, err := proc.Restore(ctx, r.vmmSnapshot(snap), control.RestoreOptions{
		Devices: []control.Device{
			{Kind: control.KindBlock, Name: devRootFS, FD: ptr(2), ReadOnly: true},
			{Kind: control.KindBlock, Name: devDisk, FD: ptr(0)},
			{Kind: control.KindRNG, Name: devRNG},
			{Kind: control.KindVsock, Name: devVsock, CID: guestCID, UDS: vmmUDS},
			{Kind: control.KindNet, Name: devNet, FD: ptr(1), MAC: GuestMAC.String()},
		},
		Console:      vmmConsole,
		ConsoleLimit: ConsoleLimit,
		Files:        []*os.File{disk, tap, image},
	})
	if err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: restore: %w", err)
	}
	// From here the VMM outlives this process: it serves sock and ends
	// when its VM does.
	if err := proc.Listen(ctx, vmmSock); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: detach VMM: %w", err)
	}
	rec.Pid = proc.Pid()
	if rec.PidStart, err = procStart(rec.Pid); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: VMM process: %w", err)
	}
	if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: write %s: %w", recordFile, err)
	}
	proc.Client.Close() // the pool's connection; sock serves from now on
	proc = nil
	tRestore := time.Now()

	// A new identity before anything else reaches the guest.
	gctx, cancel := context.WithTimeout(ctx, r.opts.GuestTimeout)
	defer cancel()
	if err := withGuest(gctx, uds, func(g *guestConn) error { return g.identity(gctx, cfg.ID) }); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: %w (the VM is destroyed); console:\n%s", err, tail(console, 2048))
	}
	r.log.Info("sandbox created", "sandbox", cfg.ID, "addr", att.Addr, "prepared", prepared, "total", time.Since(start),
		"snapshot", tSnap.Sub(start), "devices", tDevs.Sub(tSnap), "restore", tRestore.Sub(tDevs), "identity", time.Since(tRestore))
	return runtime.Sandbox{ID: cfg.ID, Addr: att.Addr, State: runtime.StateRunning}, nil
}

// pool returns the pool of VMM processes prepared for snap.
func (r *Runtime) pool(snap *templateSnapshot) (*control.Pool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p := r.pools[snap.Meta.Key]; p != nil {
		return p, nil
	}
	p, err := control.NewPool(control.PoolConfig{
		Size:     r.opts.PoolSize,
		Spawn:    r.spawnConfig(snap),
		Snapshot: r.vmmSnapshot(snap),
		Logger:   r.log,
	})
	if err != nil {
		return nil, fmt.Errorf("microvm: VMM pool: %w", err)
	}
	r.pools[snap.Meta.Key] = p
	return p, nil
}

// readRecord reads sandbox.json; ErrNotFound if there is none.
func (r *Runtime) readRecord(id string) (record, error) {
	var rec record
	if err := checkID(id); err != nil {
		return rec, err
	}
	b, err := os.ReadFile(filepath.Join(r.sandboxDir(id), recordFile))
	if errors.Is(err, fs.ErrNotExist) {
		return rec, fmt.Errorf("%w: %s", runtime.ErrNotFound, id)
	}
	if err != nil {
		return rec, fmt.Errorf("microvm: %w", err)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, fmt.Errorf("microvm: %s/%s: %w", id, recordFile, err)
	}
	return rec, nil
}

// alive reports whether rec's VMM process still runs (the same process:
// its start time matches).
func alive(rec record) bool {
	if rec.Pid <= 0 {
		return false
	}
	st, err := procStart(rec.Pid)
	return err == nil && st == rec.PidStart
}

// procStart is a process's start time in clock ticks since boot (field
// 22 of /proc/<pid>/stat).
func procStart(pid int) (uint64, error) {
	f, err := procStat(pid)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(f[19], 10, 64)
}

// procStat returns the fields of /proc/<pid>/stat after the command
// name: f[0] is field 3 (state).
func procStat(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return nil, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 22 {
		return nil, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	if f[0] == "Z" {
		return nil, fmt.Errorf("process %d has exited", pid)
	}
	return f, nil
}

// client connects to a running sandbox's VMM.
func (r *Runtime) client(id string) (*control.Client, record, error) {
	rec, err := r.readRecord(id)
	if err != nil {
		return nil, rec, err
	}
	if !alive(rec) {
		return nil, rec, fmt.Errorf("%w: %s: its VMM process is gone", runtime.ErrNotFound, id)
	}
	sock, _, _ := r.vmmPaths(id, rec)
	c, err := dialControl(sock)
	if err != nil {
		return nil, rec, fmt.Errorf("microvm: %s: %w", id, err)
	}
	return c, rec, nil
}

// Pause implements runtime.Runtime: the VMM stops the vCPUs and devices;
// the guest's memory stays where it is.
func (r *Runtime) Pause(ctx context.Context, id string) error {
	c, _, err := r.client(id)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Pause(ctx); err != nil {
		return fmt.Errorf("microvm: pause %s: %w", id, err)
	}
	return nil
}

// Resume implements runtime.Runtime.
func (r *Runtime) Resume(ctx context.Context, id string) error {
	c, _, err := r.client(id)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Resume(ctx); err != nil {
		return fmt.Errorf("microvm: resume %s: %w", id, err)
	}
	return nil
}

// Kill implements runtime.Runtime: stop the VMM (killing it if it does not
// exit) and remove the sandbox's directory. The network is the caller's.
func (r *Runtime) Kill(ctx context.Context, id string) error {
	if err := checkID(id); err != nil {
		return err
	}
	var errs []error
	rec, err := r.readRecord(id)
	if err != nil && !errors.Is(err, runtime.ErrNotFound) {
		errs = append(errs, err)
	}
	if err == nil && alive(rec) {
		errs = append(errs, r.stopVMM(ctx, id, rec))
	}
	if err == nil && rec.Jail != nil {
		// Whatever else ran in the jail's cgroups goes too; then the
		// cgroups and the root.
		errs = append(errs, rec.Jail.Kill(), rec.Jail.Remove())
	}
	if err := os.RemoveAll(r.sandboxDir(id)); err != nil {
		errs = append(errs, fmt.Errorf("microvm: %w", err))
	}
	return errors.Join(errs...)
}

// stopVMM asks the VMM to stop and kills it if it has not exited a few
// seconds later; it returns once the process is gone.
func (r *Runtime) stopVMM(ctx context.Context, id string, rec record) error {
	fd, err := unix.PidfdOpen(rec.Pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("microvm: pidfd_open %d: %w", rec.Pid, err)
	}
	defer unix.Close(fd)
	if !alive(rec) { // the pid was reused before pidfd_open
		return nil
	}
	sock, _, _ := r.vmmPaths(id, rec)
	if c, err := dialControl(sock); err == nil {
		sctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		c.Stop(sctx)
		cancel()
		c.Close()
	}
	if waitFD(fd, 3*time.Second) {
		return nil
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("microvm: kill VMM %d: %w", rec.Pid, err)
	}
	if !waitFD(fd, 10*time.Second) {
		return fmt.Errorf("microvm: VMM %d did not exit after SIGKILL", rec.Pid)
	}
	return nil
}

// waitFD polls a pidfd until it is readable (the process exited) or d
// passes.
func waitFD(fd int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		ms := int(time.Until(deadline).Milliseconds())
		if ms < 0 {
			return false
		}
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(p, ms)
		if err == nil && n > 0 {
			return true
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return false
		}
	}
}

// List implements runtime.Runtime: every sandbox directory, running or
// paused by its VMM's word, stopped when the VMM is gone.
func (r *Runtime) List(ctx context.Context) ([]runtime.Sandbox, error) {
	entries, err := os.ReadDir(r.opts.StateDir)
	if err != nil {
		return nil, fmt.Errorf("microvm: %w", err)
	}
	var out []runtime.Sandbox
	for _, e := range entries {
		if !e.IsDir() || checkID(e.Name()) != nil {
			continue
		}
		rec, err := r.readRecord(e.Name())
		if err != nil {
			if errors.Is(err, runtime.ErrNotFound) {
				continue
			}
			return nil, err
		}
		sb := runtime.Sandbox{ID: e.Name(), Addr: rec.Addr, State: runtime.StateStopped}
		if alive(rec) {
			sb.State = runtime.StateRunning
			sock, _, _ := r.vmmPaths(e.Name(), rec)
			if c, err := dialControl(sock); err == nil {
				if m, err := c.Metrics(ctx); err == nil && m.State == "paused" {
					sb.State = runtime.StatePaused
				}
				c.Close()
			}
		}
		out = append(out, sb)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// clockTick is USER_HZ, the unit of /proc/<pid>/stat's times (100 on
// every Linux that cubicle runs on).
const clockTick = 100

// Stats implements runtime.Runtime: CPU time and resident memory of the
// VMM process (the guest's vCPUs and its touched memory are the
// process's; for a jailed VMM, its memory cgroup's charge), the disk's
// allocated bytes.
func (r *Runtime) Stats(ctx context.Context, id string) (runtime.Stats, error) {
	rec, err := r.readRecord(id)
	if err != nil {
		return runtime.Stats{}, err
	}
	if !alive(rec) {
		return runtime.Stats{}, fmt.Errorf("%w: %s: its VMM process is gone", runtime.ErrNotFound, id)
	}
	var s runtime.Stats
	f, err := procStat(rec.Pid)
	if err != nil {
		return s, fmt.Errorf("microvm: %w", err)
	}
	utime, _ := strconv.ParseUint(f[11], 10, 64)
	stime, _ := strconv.ParseUint(f[12], 10, 64)
	s.CPUUsage = time.Duration(utime+stime) * time.Second / clockTick
	rss, _ := strconv.ParseUint(f[21], 10, 64)
	s.MemUsed = rss * uint64(os.Getpagesize())
	if rec.Jail != nil && rec.Jail.Memory != "" {
		// The memory cgroup's charge: what the limit is held against.
		if s.MemUsed, err = rec.Jail.MemoryUsage(); err != nil {
			return s, fmt.Errorf("microvm: %w", err)
		}
	}
	s.MemLimit = uint64(rec.Config.MemoryMB) << 20
	_, _, _, diskPath, _ := r.paths(id)
	var st syscall.Stat_t
	if err := syscall.Stat(diskPath, &st); err == nil {
		s.DiskUsed = uint64(st.Blocks) * 512
		s.DiskTotal = uint64(st.Size)
	}
	return s, nil
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// claimDir makes sandbox id's directory: the claim on the ID, which fails
// if another Create or Restore (in this process or an earlier one) holds it.
func claimDir(id, dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%w: %s", ErrExists, id)
		}
		return fmt.Errorf("microvm: create sandbox dir: %w", err)
	}
	return nil
}
