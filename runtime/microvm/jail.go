//go:build linux && amd64

package microvm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
)

// Jailing the VMMs: with Options.Jail set, every sandbox's VMM process
// runs as vmm/jailer confines it (its own mount, PID, network, IPC and
// UTS namespaces, uid 65534 with no capabilities, a seccomp allow-list,
// a jail directory as its whole filesystem) in cgroups of its own with
// the sandbox's memory (MemoryMB plus the VMM's overhead) and a pids
// limit. The pool spawns the processes before a sandbox is known, so a
// jail is not the sandbox's directory: it lives in StateDir/vmm-jail/
// <pool>/<n> (a name no sandbox ID matches), and sandbox.json keeps its
// jailer.Handle (root and cgroup directories) so that any later server
// finds, reads (Stats: memory; Wait: OOM kills), kills and removes it.
//
// Inside the jail the VMM sees the template snapshot read-only at
// /snapshot and makes its control socket, vsock socket and console at
// jailVMMSock, jailVsock and jailConsole; the host reaches them under the
// jail's root. The disks and the tap come as descriptors. The jail's root
// belongs to the jailed uid: the host never follows a symbolic link there
// (dialNoFollow, tail), so a VMM taken over by its guest cannot point
// the host's connections or reads elsewhere.

// Jail configures the VMMs' confinement.
type Jail struct {
	// UID and GID of the VMM processes; 0 means jailer.DefaultUID/GID.
	UID, GID int
	// OverheadMB is the VMM's own memory on top of the guest's, in the
	// memory cgroup's limit (0: DefaultOverheadMB).
	OverheadMB int
	// PidsLimit bounds the VMM's tasks, threads included (0:
	// DefaultPidsLimit).
	PidsLimit int64
}

// DefaultOverheadMB and DefaultPidsLimit are Jail's defaults: the VMM's
// runtime, device buffers and the page cache it brings in fit in the
// former; its threads (vCPUs, device workers, the Go runtime's) in the
// latter, with room.
const (
	DefaultOverheadMB = 128
	DefaultPidsLimit  = 512
)

// Where a jailed VMM finds its things and puts its sockets.
const (
	jailDir      = "vmm-jail" // under StateDir; not a valid sandbox ID
	jailSnapshot = "/snapshot"
	jailVMMSock  = "/vmm.sock"
	jailVsock    = "/vsock.sock"
	jailConsole  = "/console.log"
)

// CheckJail says why this host cannot jail VMMs (vmm/jailer.Check), or
// nil.
func CheckJail() error { return jailer.Check() }

// spawnConfig is the pool's SpawnConfig for snap's VMM processes: jailed
// when Options.Jail says so, with the snapshot's directory mounted.
func (r *Runtime) spawnConfig(snap *templateSnapshot) control.SpawnConfig {
	sc := control.SpawnConfig{Path: r.opts.VMM, Args: []string{"vmm"}, Detach: true, Stderr: r.logfLocked()}
	j := r.opts.Jail
	if j == nil {
		return sc
	}
	id := randHex(6)
	sc.Jail = &jailer.Config{
		Root:        filepath.Join(r.opts.StateDir, jailDir, id), // the pool adds /<n>
		UID:         j.UID,
		GID:         j.GID,
		Cgroup:      "cubicle-vmm-" + id, // the pool adds -<n>
		Mounts:      []jailer.Mount{{Source: snap.Dir, Target: jailSnapshot, ReadOnly: true}},
		MemoryLimit: int64(snap.Meta.MemoryMiB+orDefault(j.OverheadMB, DefaultOverheadMB)) << 20,
		PidsLimit:   orDefault(j.PidsLimit, DefaultPidsLimit),
	}
	return sc
}

func orDefault[T int | int64](v, def T) T {
	if v > 0 {
		return v
	}
	return def
}

// vmmSnapshot is snap's files as its VMM processes see them.
func (r *Runtime) vmmSnapshot(snap *templateSnapshot) control.Snapshot {
	if r.opts.Jail == nil {
		return snap.files()
	}
	return control.Snapshot{State: filepath.Join(jailSnapshot, snapState), Memory: filepath.Join(jailSnapshot, snapMemory)}
}

// vmmPaths are the control socket, the vsock socket and the console of
// rec's VMM, as the host reaches them.
func (r *Runtime) vmmPaths(id string, rec record) (sock, vsock, console string) {
	if rec.Jail != nil {
		root := rec.Jail.Root
		return filepath.Join(root, jailVMMSock), filepath.Join(root, jailVsock), filepath.Join(root, jailConsole)
	}
	_, sock, vsock, _, console = r.paths(id)
	return sock, vsock, console
}

// dialNoFollow connects to the Unix socket at path unless its last
// component is a symbolic link or not a socket: it opens the socket file
// itself (O_PATH|O_NOFOLLOW) and connects through /proc/self/fd, so what
// it checked is what it reaches.
func dialNoFollow(ctx context.Context, path string) (*net.UnixConn, error) {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, fmt.Errorf("%s: %w", path, errNotSocket)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c.(*net.UnixConn), nil
}

var errNotSocket = errors.New("not a socket (a symbolic link?)")

// dialControl connects to a VMM's control socket (see dialNoFollow).
func dialControl(path string) (*control.Client, error) {
	c, err := dialNoFollow(context.Background(), path)
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	return control.NewClient(c), nil
}

// sweepJails removes the jails that no sandbox holds and no process runs
// in: those of the pooled VMMs of a server that ended without closing
// its pools (the VMMs exit with their connections; their jails stay).
// A jail younger than a minute is left alone: its process may be between
// start and cgroup (jailer.Jail.Started).
func (r *Runtime) sweepJails() {
	held := map[string]bool{}
	entries, _ := os.ReadDir(r.opts.StateDir)
	for _, e := range entries {
		if rec, err := r.readRecord(e.Name()); err == nil && rec.Jail != nil {
			held[filepath.Clean(rec.Jail.Root)] = true
		}
	}
	roots, _ := filepath.Glob(filepath.Join(r.opts.StateDir, jailDir, "*", "*"))
	for _, root := range roots {
		fi, err := os.Lstat(root)
		if err != nil || !fi.IsDir() || held[root] || time.Since(fi.ModTime()) < time.Minute {
			continue
		}
		// The names spawnConfig and control.Pool give: root
		// <pool>/<n>, cgroup cubicle-vmm-<pool>-<n>.
		h, err := jailer.Find(root, "cubicle-vmm-"+filepath.Base(filepath.Dir(root))+"-"+filepath.Base(root))
		if err != nil {
			continue
		}
		if empty, err := h.Empty(); err != nil || !empty {
			continue
		}
		if err := h.Remove(); err != nil {
			r.log.Warn("removing an abandoned VMM jail", "root", root, "err", err)
			continue
		}
		r.log.Info("removed an abandoned VMM jail", "root", root)
		os.Remove(filepath.Dir(root)) // the pool's, once empty
	}
}
