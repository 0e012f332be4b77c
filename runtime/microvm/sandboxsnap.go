//go:build linux && amd64

package microvm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/sparse"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
)

// Sandbox snapshots (runtime.Snapshotter): snapshots, forks and pause to
// disk of one sandbox, as opposed to the template snapshot every sandbox
// starts from (snapshot.go). A sandbox snapshot directory holds
//
//	snapshot.json  sandboxSnapMeta, written last: a directory without it
//	               is not a snapshot
//	disk.img       a sparse copy of the sandbox's writable disk (/dev/vdb)
//	state, memory  the VM's device and vCPU state and its whole memory,
//	               saved by the sandbox's own VMM (Memory only)
//
// and is made in dir+".tmp" and renamed into place. The template image
// (/dev/vda) is not copied: the meta names its key, and a restore attaches
// the image the runtime has for cfg, which must be the same.
//
// The memory file is a full one: a restore maps it MAP_PRIVATE, so it
// depends on nothing else, not on the template snapshot whose pages most
// of it still shares. (A diff against the template snapshot's memory,
// from the VMM's dirty logging, would be much smaller; not done yet.)
//
// A snapshot without memory restores by booting the template afresh on a
// copy of its disk, never by restoring the template snapshot on it: that
// snapshot's kernel holds the page cache and ext4 state of the disk it was
// taken with, and another disk under it would be corrupted.

const (
	sbSnapMeta = "snapshot.json"
	// sbSnapVersion changes whenever the directory's layout or meaning
	// does; a snapshot of another version is refused, never guessed at.
	sbSnapVersion = 1
)

// sandboxSnapMeta is snapshot.json.
type sandboxSnapMeta struct {
	Version int `json:"version"`
	// Runtime is Name: a snapshot is one backend's.
	Runtime string `json:"runtime"`
	// Config is the snapshotted sandbox's, its network as it was.
	Config runtime.Config `json:"config"`
	// Memory says state and memory are there.
	Memory bool `json:"memory"`
	// Origin is what the snapshotted guest was made from: the template
	// image it has mounted (a memory snapshot's page cache holds its
	// blocks), the kernel it runs, the VMM that wrote the state, and the
	// template snapshot it descends from.
	Origin origin `json:"origin"`
	// VCPUs and MemoryMiB are the VM's (those of its snapshot, which a
	// restore cannot change); DiskMB the disk's size.
	VCPUs     int       `json:"vcpus"`
	MemoryMiB int       `json:"memoryMiB"`
	DiskMB    int       `json:"diskMB"`
	Created   time.Time `json:"created"`
}

// origin is where a running guest comes from (sandbox.json keeps it).
type origin struct {
	// TemplateSnapshot is the key of the template snapshot the guest was
	// restored from, directly or through sandbox snapshots; empty for a
	// guest booted afresh.
	TemplateSnapshot string `json:"templateSnapshot,omitempty"`
	ImageKey         string `json:"imageKey"`
	KernelKey        string `json:"kernelKey"`
	VMMHash          string `json:"vmmHash"`
	VCPUs            int    `json:"vcpus"`
	MemoryMiB        int    `json:"memoryMiB"`
}

// parseSandboxSnapMeta parses and checks snapshot.json; everything in it
// is untrusted (a file on disk that anyone with access may have changed).
func parseSandboxSnapMeta(b []byte) (sandboxSnapMeta, error) {
	var m sandboxSnapMeta
	if err := json.Unmarshal(b, &m); err != nil {
		return m, err
	}
	switch {
	case m.Runtime != Name:
		return m, fmt.Errorf("it is of the %q backend, not %q", m.Runtime, Name)
	case m.Version != sbSnapVersion:
		return m, fmt.Errorf("it has version %d; this server reads %d", m.Version, sbSnapVersion)
	case m.DiskMB < 1 || m.DiskMB != m.Config.DiskSizeMB:
		return m, fmt.Errorf("its disk size %d MiB does not match its config's %d", m.DiskMB, m.Config.DiskSizeMB)
	case m.VCPUs < 1 || m.MemoryMiB < 1:
		return m, fmt.Errorf("%d vCPUs and %d MiB are not a VM", m.VCPUs, m.MemoryMiB)
	case m.Memory && (m.Origin.ImageKey == "" || m.Origin.VMMHash == ""):
		return m, errors.New("a memory snapshot must name its template image and VMM")
	}
	return m, checkID(m.Config.ID)
}

// sandboxSnap is a snapshot directory that loadSandboxSnap checked.
type sandboxSnap struct {
	dir  string
	meta sandboxSnapMeta
}

// loadSandboxSnap reads dir's snapshot.json and checks that the files it
// promises are there and whole.
func loadSandboxSnap(dir string) (*sandboxSnap, error) {
	b, err := os.ReadFile(filepath.Join(dir, sbSnapMeta))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s is not a snapshot", ErrInvalidConfig, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("microvm: read snapshot: %w", err)
	}
	m, err := parseSandboxSnapMeta(b)
	if err != nil {
		return nil, fmt.Errorf("%w: snapshot %s: %v", ErrInvalidConfig, dir, err)
	}
	fi, err := os.Stat(filepath.Join(dir, snapDisk))
	if err != nil || fi.Size() != int64(m.DiskMB)<<20 {
		return nil, fmt.Errorf("%w: snapshot %s: its disk is missing or not %d MiB (truncated?): %v", ErrInvalidConfig, dir, m.DiskMB, err)
	}
	if m.Memory {
		st, err := snapshot.ReadFile(filepath.Join(dir, snapState))
		if err != nil {
			return nil, fmt.Errorf("%w: snapshot %s: %v", ErrInvalidConfig, dir, err)
		}
		if st.Diff != nil || len(st.VCPUs) != m.VCPUs || st.MemSize != uint64(m.MemoryMiB)<<20 {
			return nil, fmt.Errorf("%w: snapshot %s: its state (%d vCPUs, %d bytes, diff %v) does not match its meta (%d vCPUs, %d MiB)",
				ErrInvalidConfig, dir, len(st.VCPUs), st.MemSize, st.Diff != nil, m.VCPUs, m.MemoryMiB)
		}
		fi, err := os.Stat(filepath.Join(dir, snapMemory))
		if err != nil || uint64(fi.Size()) != st.MemSize {
			return nil, fmt.Errorf("%w: snapshot %s: its memory file is missing or not %d bytes (truncated?): %v", ErrInvalidConfig, dir, st.MemSize, err)
		}
	}
	return &sandboxSnap{dir: dir, meta: m}, nil
}

// originOf is what rec's guest comes from. A sandbox created before
// records kept it has its template snapshot's meta.json.
func (r *Runtime) originOf(rec record) (origin, error) {
	if rec.Origin != nil {
		return *rec.Origin, nil
	}
	b, err := os.ReadFile(filepath.Join(rec.Snapshot, snapMeta))
	if err != nil {
		return origin{}, fmt.Errorf("microvm: the template snapshot of %s: %w", rec.Config.ID, err)
	}
	var m snapMetaData
	if err := json.Unmarshal(b, &m); err != nil {
		return origin{}, fmt.Errorf("microvm: the template snapshot of %s: %w", rec.Config.ID, err)
	}
	return originOfTemplate(m), nil
}

func originOfTemplate(m snapMetaData) origin {
	return origin{TemplateSnapshot: m.Key, ImageKey: m.ImageKey, KernelKey: m.KernelKey, VMMHash: m.VMMHash, VCPUs: m.VCPUs, MemoryMiB: m.MemoryMiB}
}

// Snapshot implements runtime.Snapshotter. A running guest is told to
// sync first (so that a disk copy alone holds everything written before
// the call), then paused for the rest: the VMM saves its state and memory,
// the disk is copied, and the VM resumes. A paused guest cannot sync: its
// disk copy is what its block device had at the pause, crash-consistent
// (ext4's journal), and its memory, if saved, holds the rest.
func (r *Runtime) Snapshot(ctx context.Context, id, dir string, opts runtime.SnapshotOptions) (err error) {
	start := time.Now()
	c, rec, err := r.client(id)
	if err != nil {
		return err
	}
	defer c.Close()
	if _, err := os.Lstat(dir); err == nil {
		return fmt.Errorf("microvm: snapshot of %s: %s exists", id, dir)
	}
	org, err := r.originOf(rec)
	if err != nil {
		return err
	}
	m, err := c.Metrics(ctx)
	if err != nil {
		return fmt.Errorf("microvm: snapshot of %s: %w", id, err)
	}
	_, uds, _ := r.vmmPaths(id, rec)
	switch m.State {
	case "running":
		gctx, cancel := context.WithTimeout(ctx, r.opts.GuestTimeout)
		err := withGuest(gctx, uds, func(g *guestConn) error {
			_, err := g.do(gctx, map[string]any{"op": "sync"})
			return err
		})
		cancel()
		if err != nil {
			return fmt.Errorf("microvm: snapshot of %s: sync the guest: %w", id, err)
		}
		if err := c.Pause(ctx); err != nil {
			return fmt.Errorf("microvm: snapshot of %s: pause: %w", id, err)
		}
		defer func() {
			// The sandbox runs on whatever happened to the snapshot.
			if rerr := c.Resume(context.WithoutCancel(ctx)); rerr != nil {
				err = errors.Join(err, fmt.Errorf("microvm: resume %s after its snapshot: %w", id, rerr))
			}
		}()
	case "paused":
	default:
		return fmt.Errorf("microvm: snapshot of %s: its VM is %s", id, m.State)
	}
	tPause := time.Now()
	tmp := dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return fmt.Errorf("microvm: snapshot of %s: %w", id, err)
	}
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return fmt.Errorf("microvm: snapshot of %s: %w", id, err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if opts.Memory {
		if err := r.saveVM(ctx, c, rec, tmp, org.MemoryMiB); err != nil {
			return fmt.Errorf("microvm: snapshot of %s: %w", id, err)
		}
	}
	tVM := time.Now()
	_, _, _, diskPath, _ := r.paths(id)
	if err := sparse.Copy(diskPath, filepath.Join(tmp, snapDisk)); err != nil {
		return fmt.Errorf("microvm: snapshot of %s: copy disk: %w", id, err)
	}
	tDisk := time.Now()
	meta := sandboxSnapMeta{Version: sbSnapVersion, Runtime: Name, Config: rec.Config, Memory: opts.Memory, Origin: org,
		VCPUs: org.VCPUs, MemoryMiB: org.MemoryMiB, DiskMB: rec.Config.DiskSizeMB, Created: start.UTC()}
	if err := writeJSON(filepath.Join(tmp, sbSnapMeta), meta); err != nil {
		return fmt.Errorf("microvm: snapshot of %s: %w", id, err)
	}
	names := []string{snapDisk, sbSnapMeta}
	if opts.Memory {
		names = append(names, snapState, snapMemory)
	}
	for _, name := range names {
		if err := syncPath(filepath.Join(tmp, name)); err != nil {
			return fmt.Errorf("microvm: snapshot of %s: sync %s: %w", id, name, err)
		}
	}
	// A jailed VMM restoring it (uid 65534, no capabilities) reads state
	// and memory through a read-only bind mount of the directory; what is
	// above it (the caller's) keeps everyone else out.
	modes := map[string]os.FileMode{tmp: 0o711}
	if opts.Memory {
		modes[filepath.Join(tmp, snapState)], modes[filepath.Join(tmp, snapMemory)] = 0o644, 0o644
	}
	for p, mode := range modes {
		if err := os.Chmod(p, mode); err != nil {
			return fmt.Errorf("microvm: snapshot of %s: %w", id, err)
		}
	}
	if err := os.Rename(tmp, dir); err != nil {
		return fmt.Errorf("microvm: snapshot of %s: %w", id, err)
	}
	syncPath(filepath.Dir(dir))
	r.log.Info("sandbox snapshotted", "sandbox", id, "dir", dir, "memory", opts.Memory, "total", time.Since(start),
		"sync+pause", tPause.Sub(start), "vm", tVM.Sub(tPause), "disk", tDisk.Sub(tVM))
	return nil
}

// saveVM has rec's paused VMM write its state and memory into dir. A
// jailed VMM can write only in its jail: the files are made there and
// copied out (never followed through a link the VMM may have put in their
// place), and the jail's copies removed.
//
// The memory file's page cache is charged to the writer's memory cgroup,
// which a jailed VMM's guest may fill already: the jail's limit is raised
// by the guest's memory for the time of the save (where the files cannot
// be written back, as on a tmpfs, the VMM would otherwise be OOM-killed
// mid-snapshot), and set back once the jail's copies, and so their
// charge, are gone.
func (r *Runtime) saveVM(ctx context.Context, c *control.Client, rec record, dir string, memoryMiB int) (err error) {
	if rec.Jail == nil {
		return c.Snapshot(ctx, control.Snapshot{State: filepath.Join(dir, snapState), Memory: filepath.Join(dir, snapMemory)})
	}
	if rec.Jail.Memory != "" {
		limit := filepath.Join(rec.Jail.Memory, "memory.limit_in_bytes")
		old, err := os.ReadFile(limit)
		if err != nil {
			return fmt.Errorf("jail memory limit: %w", err)
		}
		n, err := strconv.ParseInt(strings.TrimSpace(string(old)), 10, 64)
		if err != nil {
			return fmt.Errorf("jail memory limit %q: %w", old, err)
		}
		if err := os.WriteFile(limit, []byte(strconv.FormatInt(n+int64(memoryMiB)<<20, 10)), 0); err != nil {
			return fmt.Errorf("raise the jail's memory limit: %w", err)
		}
		defer func() {
			if werr := os.WriteFile(limit, old, 0); werr != nil {
				err = errors.Join(err, fmt.Errorf("set the jail's memory limit back to %s: %w", bytes.TrimSpace(old), werr))
			}
		}()
	}
	name := ".snapshot-" + randHex(6)
	vmmSnap := control.Snapshot{State: "/" + name + "." + snapState, Memory: "/" + name + "." + snapMemory}
	host := map[string]string{
		snapState:  filepath.Join(rec.Jail.Root, vmmSnap.State),
		snapMemory: filepath.Join(rec.Jail.Root, vmmSnap.Memory),
	}
	defer func() {
		for _, p := range host {
			os.Remove(p)
		}
	}()
	if err := c.Snapshot(ctx, vmmSnap); err != nil {
		return err
	}
	for _, n := range []string{snapState, snapMemory} {
		if err := copyOut(host[n], filepath.Join(dir, n)); err != nil {
			return err
		}
	}
	return nil
}

// copyOut copies the regular file from (not a symbolic link: it is
// opened O_NOFOLLOW and copied through its descriptor) to a new file to
// and removes from.
func copyOut(from, to string) error {
	f, err := os.OpenFile(from, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s: not a regular file", from)
	}
	if err := sparse.Copy(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), to); err != nil {
		return err
	}
	return os.Remove(from)
}

// Restore implements runtime.Snapshotter: Create's path from the
// sandbox's snapshot instead of the template's. A memory snapshot is
// restored in a VMM process of its own (the pool's are prepared for the
// template snapshot), with the sandbox's devices under the snapshot's
// names; a filesystem-only one is booted afresh on a copy of its disk.
// Either way the guest then gets its own identity (hostname, clock,
// entropy: forks of one snapshot must not share their RNG state). Its
// network needs nothing more: every guest has the same address
// (network.GuestAddr) behind its own namespace's translation, so a
// restored guest in another namespace is reached at cfg.Network.Addr.
func (r *Runtime) Restore(ctx context.Context, cfg runtime.Config, dir string) (sb runtime.Sandbox, err error) {
	snap, err := loadSandboxSnap(dir)
	if err != nil {
		return runtime.Sandbox{}, err
	}
	src, m := snap.meta.Config, snap.meta
	if cfg.Volumes == nil {
		cfg.Volumes = src.Volumes
	}
	if err := r.checkConfig(cfg); err != nil {
		return runtime.Sandbox{}, err
	}
	switch {
	case filepath.Clean(cfg.RootFS) != filepath.Clean(src.RootFS):
		return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot was made on template %s, not %s", ErrInvalidConfig, src.RootFS, cfg.RootFS)
	case cfg.DiskSizeMB != m.DiskMB:
		return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot's disk is %d MiB, not %d", ErrInvalidConfig, m.DiskMB, cfg.DiskSizeMB)
	case m.Memory && cfg.MemoryMB < m.MemoryMiB:
		return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot's VM had %d MiB of memory; %d is too little", ErrInvalidConfig, m.MemoryMiB, cfg.MemoryMB)
	case m.Memory && cfg.CPUCount < m.VCPUs:
		return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot's VM had %d vCPUs; %d is too few", ErrInvalidConfig, m.VCPUs, cfg.CPUCount)
	}
	img, err := r.opts.Image(ctx, cfg)
	if err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: template image: %w", err)
	}
	org := origin{ImageKey: img.Key, KernelKey: r.opts.KernelKey, VCPUs: cfg.CPUCount, MemoryMiB: cfg.MemoryMB}
	if org.VMMHash, err = r.vmmHash(); err != nil {
		return runtime.Sandbox{}, err
	}
	if m.Memory {
		// The guest has the image's blocks in its page cache and runs the
		// kernel it was saved with; the state is the VMM's own format.
		switch {
		case m.Origin.ImageKey != img.Key:
			return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot's guest has template image %s mounted; the template's image is now %s", ErrInvalidConfig, m.Origin.ImageKey, img.Key)
		case m.Origin.VMMHash != org.VMMHash:
			return runtime.Sandbox{}, fmt.Errorf("%w: the snapshot was written by another VMM binary", ErrInvalidConfig)
		}
		org = m.Origin
	}
	return r.restore(ctx, cfg, snap, img, org)
}

// restore makes sandbox cfg.ID from snap; on error everything made is
// removed again (as in Create).
func (r *Runtime) restore(ctx context.Context, cfg runtime.Config, snap *sandboxSnap, img Image, org origin) (sb runtime.Sandbox, err error) {
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
			r.log.Error("cleaning up failed restore", "sandbox", cfg.ID, "err", kerr)
		}
	}()
	rec := record{Config: cfg, Addr: cfg.Network.Addr, Created: start.UTC(), Origin: &org}
	if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: write %s: %w", recordFile, err)
	}
	tap, err := openTap(cfg.Network)
	if err != nil {
		return runtime.Sandbox{}, err
	}
	defer tap.Close()
	if err := sparse.Copy(filepath.Join(snap.dir, snapDisk), diskPath); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: disk: %w", err)
	}
	disk, err := os.OpenFile(diskPath, os.O_RDWR, 0)
	if err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: disk: %w", err)
	}
	defer disk.Close()
	image, err := os.Open(img.Path)
	if err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: template image: %w", err)
	}
	defer image.Close()

	// A VMM of its own: jailed like the pool's, with the snapshot (to
	// restore) or the kernel (to boot) mounted read-only.
	memory := snap.meta.Memory
	sc := control.SpawnConfig{Path: r.opts.VMM, Args: []string{"vmm"}, Detach: true, Stderr: r.vmmLog()}
	vmmSnap := control.Snapshot{State: filepath.Join(snap.dir, snapState), Memory: filepath.Join(snap.dir, snapMemory)}
	kernel := r.opts.Kernel
	vmmSock, vmmUDS, vmmConsole := sock, uds, console
	if j := r.opts.Jail; j != nil {
		// Named as the pools' jails are (<pool>/<n>, cubicle-vmm-<pool>-<n>),
		// so that sweepJails finds one a crash left.
		n := randHex(6)
		mount := jailer.Mount{Source: r.opts.Kernel, Target: "/vmlinux", ReadOnly: true}
		if memory {
			mount = jailer.Mount{Source: snap.dir, Target: jailSnapshot, ReadOnly: true}
		}
		sc.Jail = &jailer.Config{
			Root:        filepath.Join(r.opts.StateDir, jailDir, restoreJails, n),
			UID:         j.UID,
			GID:         j.GID,
			Cgroup:      "cubicle-vmm-" + restoreJails + "-" + n,
			Mounts:      []jailer.Mount{mount},
			MemoryLimit: int64(cfg.MemoryMB+orDefault(j.OverheadMB, DefaultOverheadMB)) << 20,
			PidsLimit:   orDefault(j.PidsLimit, DefaultPidsLimit),
		}
		vmmSnap = control.Snapshot{State: filepath.Join(jailSnapshot, snapState), Memory: filepath.Join(jailSnapshot, snapMemory)}
		kernel = "/vmlinux"
		vmmSock, vmmUDS, vmmConsole = jailVMMSock, jailVsock, jailConsole
	}
	if proc, err = control.Spawn(sc); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: VMM: %w", err)
	}
	if j := proc.Jail(); j != nil {
		h := j.Handle()
		rec.Jail = &h
		if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
			return runtime.Sandbox{}, fmt.Errorf("microvm: write %s: %w", recordFile, err)
		}
		_, uds, console = r.vmmPaths(cfg.ID, rec)
	}
	devs := []control.Device{
		{Kind: control.KindBlock, Name: devRootFS, FD: ptr(2), ReadOnly: true},
		{Kind: control.KindBlock, Name: devDisk, FD: ptr(0)},
		{Kind: control.KindRNG, Name: devRNG},
		{Kind: control.KindVsock, Name: devVsock, CID: guestCID, UDS: vmmUDS},
		{Kind: control.KindNet, Name: devNet, FD: ptr(1), MAC: GuestMAC.String()},
	}
	files := []*os.File{disk, tap, image}
	if memory {
		if _, err := proc.Restore(ctx, vmmSnap, control.RestoreOptions{Devices: devs, Console: vmmConsole, ConsoleLimit: ConsoleLimit, Files: files}); err != nil {
			return runtime.Sandbox{}, fmt.Errorf("microvm: restore: %w; console:\n%s", err, tail(console, 2048))
		}
	} else if err := r.boot(ctx, proc, cfg, kernel, devs, vmmConsole, files, uds, console); err != nil {
		return runtime.Sandbox{}, err
	}
	tVM := time.Now()
	// From here the VMM outlives this process.
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
	proc.Client.Close()
	proc = nil

	gctx, cancel := context.WithTimeout(ctx, r.opts.GuestTimeout)
	defer cancel()
	if err := withGuest(gctx, uds, func(g *guestConn) error { return g.identity(gctx, cfg.ID) }); err != nil {
		return runtime.Sandbox{}, fmt.Errorf("microvm: %w (the VM is destroyed); console:\n%s", err, tail(console, 2048))
	}
	r.log.Info("sandbox restored", "sandbox", cfg.ID, "from", snap.dir, "memory", memory, "addr", cfg.Network.Addr,
		"total", time.Since(start), "vm", tVM.Sub(start), "identity", time.Since(tVM))
	return runtime.Sandbox{ID: cfg.ID, Addr: cfg.Network.Addr, State: runtime.StateRunning}, nil
}

// restoreJails is the pool name under which restores' VMMs have their
// jails (StateDir/vmm-jail/restore/<n>).
const restoreJails = "restore"

// boot boots the template's kernel in proc with devs and waits until
// envd answers (BootTimeout), as a template's first boot does.
func (r *Runtime) boot(ctx context.Context, proc *control.Process, cfg runtime.Config, kernel string, devs []control.Device,
	vmmConsole string, files []*os.File, uds, console string) error {
	ctx, cancel := context.WithTimeout(ctx, r.opts.BootTimeout)
	defer cancel()
	fail := func(what string, err error) error {
		return fmt.Errorf("microvm: boot: %s: %w; console:\n%s", what, err, tail(console, 4096))
	}
	mach := control.Machine{MemoryMiB: uint64(cfg.MemoryMB), VCPUs: cfg.CPUCount, Kernel: kernel, Cmdline: cmdline(cfg.MemoryMB), Protocol: "pvh"}
	if _, err := proc.Do(ctx, control.Request{Op: control.OpConfigure, Machine: &mach, Devices: devs, Console: vmmConsole, ConsoleLimit: ConsoleLimit}, files...); err != nil {
		return fail("configure", err)
	}
	if err := proc.Start(ctx, false); err != nil {
		return fail("start", err)
	}
	vmEnded := func() bool {
		mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		m, err := proc.Metrics(mctx)
		return err == nil && m.State == "stopped"
	}
	if err := waitEnvd(ctx, uds, proc.Done(), vmEnded); err != nil {
		return fail("waiting for envd", err)
	}
	return nil
}
