//go:build linux && amd64

// Package microvm is the KVM microVM backend of runtime.Runtime: every
// sandbox is a Linux guest in its own `cubicle vmm` process, restored
// copy-on-write from its template's snapshot (snapshot.go) rather than
// booted. The guest side is `cubicle init` (package guest/init, whose doc
// comment is the host–guest contract): it mounts the read-only template
// disk (/dev/vda) under an overlay whose upper layer is the sandbox's
// writable disk (/dev/vdb), brings eth0 up at network.GuestAddr and starts
// envd, and answers the host on vsock port 1024 (guest.go).
//
// Create takes a VMM process from a pool (vmm/control.Pool) that has the
// snapshot's memory mapped already, restores the snapshot into it with
// the sandbox's own devices (a copy of the snapshot-time disk, a tap in
// the sandbox's network namespace from network.Pool in tap mode, a vsock
// socket in the sandbox's directory), detaches it (control's listen: the
// VMM serves StateDir/<id>/vmm.sock and outlives this process) and gives
// the guest a new identity (clock, entropy) before anything else reaches
// it. envd then gets /init from the orchestrator as under gVisor.
//
// As with runtime/gvisor, the state is on disk and in the kernel, not in
// memory: StateDir/<id>/ holds
//
//	sandbox.json  the record: Config, address, VMM pid and start time, snapshot
//	disk.img      the sandbox's writable disk (a sparse copy of the snapshot's)
//	vmm.sock      the VMM process's control socket
//	vsock.sock    the guest's vsock (Firecracker's hybrid Unix socket)
//	console.log   the guest's serial console, bounded (ConsoleLimit)
//
// so a new Runtime (a restarted `cubicle serve`) finds every running VMM
// again by its pid and socket (List, Wait, Kill), and loses nothing.
//
// With Options.Jail the VMM processes are confined by vmm/jailer, each in
// cgroups of its own with the sandbox's memory limit (jail.go); its
// sockets and console are then in its jail, not in StateDir/<id>/.
//
// Snapshot and Restore (sandboxsnap.go) save a sandbox's VM and disk to a
// directory and start sandboxes from it: the orchestrator's snapshots,
// forks and pause to disk. Pause itself keeps the paused VM in memory.
//
// Not yet: a sandbox snapshot's memory is a full file, not a diff against
// the template snapshot's; the template's start and ready commands run
// after each restore (the orchestrator's pool), not once before the
// snapshot.
package microvm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/vmm/control"
)

// Name is the backend's name.
const Name = "microvm"

// ConsoleLimit bounds each sandbox's console log: a guest that floods its
// serial port fills this much of the host's disk, no more.
const ConsoleLimit = 1 << 20

var (
	// ErrInvalidConfig is returned for a runtime.Config or Options that
	// cannot be used.
	ErrInvalidConfig = errors.New("microvm: invalid config")
	// ErrExists is returned by Create when the sandbox ID is in use.
	ErrExists = errors.New("microvm: sandbox already exists")
	// ErrGuest is returned when the guest does not answer as the
	// contract says (never comes up, answers garbage, says no).
	ErrGuest = errors.New("microvm: guest not answering")
)

// Image is a template's root filesystem as an ext4 image (the guest's
// read-only /dev/vda) and the key of its inputs.
type Image struct {
	Path string
	Key  string
}

// Options configures a Runtime.
type Options struct {
	// StateDir holds the sandboxes' directories. Required, absolute.
	StateDir string
	// CacheDir holds the template snapshots (CacheDir/microvm/<key>/).
	// Required, absolute.
	CacheDir string
	// Kernel is the guest kernel (vmlinux, vmm/linux.Build) and KernelKey
	// the key of its inputs (vmm/linux.Key). Required.
	Kernel    string
	KernelKey string
	// Image returns the template's ext4 image for a sandbox's config
	// (building it if needed). Required.
	Image func(ctx context.Context, cfg runtime.Config) (Image, error)
	// VMM is the binary run as `VMM vmm`; empty means this executable.
	VMM string
	// Network gives a template's first boot its own namespace and tap
	// (claimed and released around the boot); it must be in
	// network.ModeTap. Sandboxes get theirs from their runtime.Config,
	// claimed by the orchestrator from the same pool. Required.
	Network *network.Pool
	// PoolSize is how many prepared VMM processes each template snapshot
	// keeps ready (0: 2).
	PoolSize int
	// BootTimeout bounds a template's first boot to envd (0: 2 minutes;
	// under emulation, as in nested KVM, more).
	BootTimeout time.Duration
	// GuestTimeout bounds each exchange with a restored guest (0: 30 s).
	GuestTimeout time.Duration
	// FormatDisk makes the empty ext4 image of sizeMB at path that a
	// template's first boot gets as its sandbox disk; nil runs mkfs.ext4.
	// (Inside scripts/nested-kvm.sh's L1 there is no mkfs: tests copy
	// one formatted beforehand.)
	FormatDisk func(path string, sizeMB int) error
	// Jail confines the sandboxes' VMM processes (jail.go); nil runs them
	// unconfined, as root. New refuses a Jail this host cannot provide
	// (CheckJail).
	Jail   *Jail
	Logger *slog.Logger
}

// Runtime runs sandboxes as microVMs. The pools and the verified
// snapshots are caches; the sandboxes themselves are found on disk.
type Runtime struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	snaps  map[string]*snapshotEntry // by snapshot key
	pools  map[string]*control.Pool  // by snapshot key
	vmmSum string                    // the VMM binary's hash, once known
	logf   *os.File                  // StateDir/vmm.log, once opened
}

var (
	_ runtime.Runtime     = (*Runtime)(nil)
	_ runtime.Snapshotter = (*Runtime)(nil)
)

var validID = regexp.MustCompile(`^[a-z0-9]{1,64}$`)

// New makes a Runtime.
func New(opts Options) (*Runtime, error) {
	for name, p := range map[string]string{"StateDir": opts.StateDir, "CacheDir": opts.CacheDir, "Kernel": opts.Kernel} {
		if !filepath.IsAbs(p) {
			return nil, fmt.Errorf("%w: %s %q must be an absolute path", ErrInvalidConfig, name, p)
		}
	}
	if opts.KernelKey == "" || opts.Image == nil {
		return nil, fmt.Errorf("%w: KernelKey and Image are required", ErrInvalidConfig)
	}
	if opts.Network == nil || opts.Network.Mode() != network.ModeTap {
		return nil, fmt.Errorf("%w: a network pool in tap mode is required", ErrInvalidConfig)
	}
	if _, err := os.Stat(opts.Kernel); err != nil {
		return nil, fmt.Errorf("%w: kernel: %w", ErrInvalidConfig, err)
	}
	if opts.Jail != nil {
		if err := CheckJail(); err != nil {
			return nil, fmt.Errorf("%w: the VMMs cannot be jailed here: %w", ErrInvalidConfig, err)
		}
	}
	if opts.VMM == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("microvm: %w", err)
		}
		opts.VMM = exe
	}
	if opts.PoolSize <= 0 {
		opts.PoolSize = 2
	}
	if opts.BootTimeout <= 0 {
		opts.BootTimeout = 2 * time.Minute
	}
	if opts.GuestTimeout <= 0 {
		opts.GuestTimeout = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("microvm: state dir: %w", err)
	}
	if err := os.Chmod(opts.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("microvm: state dir: %w", err)
	}
	r := &Runtime{
		opts:  opts,
		log:   opts.Logger.With("runtime", Name),
		snaps: map[string]*snapshotEntry{},
		pools: map[string]*control.Pool{},
	}
	r.sweepJails()
	return r, nil
}

// Name implements runtime.Runtime.
func (r *Runtime) Name() string { return Name }

// StateDir is where the sandboxes' files, their disks included, live.
func (r *Runtime) StateDir() string { return r.opts.StateDir }

// Close stops the pools of idle VMM processes. Sandboxes keep running.
func (r *Runtime) Close() error {
	r.mu.Lock()
	pools := r.pools
	r.pools = map[string]*control.Pool{}
	r.mu.Unlock()
	var errs []error
	for _, p := range pools {
		errs = append(errs, p.Close())
	}
	// The pools' jail directories, once their last jail is gone (a
	// sandbox's stays until Kill).
	dirs, _ := filepath.Glob(filepath.Join(r.opts.StateDir, jailDir, "*"))
	for _, d := range dirs {
		os.Remove(d) // fails, as it should, while one holds a jail
	}
	r.mu.Lock()
	if r.logf != nil {
		errs = append(errs, r.logf.Close())
		r.logf = nil
	}
	r.mu.Unlock()
	return errors.Join(errs...)
}

// vmmLog is where VMM processes write their own log (not the guest's
// console): StateDir/vmm.log, a file so that it outlives this process.
func (r *Runtime) vmmLog() io.Writer {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.logfLocked()
}

func (r *Runtime) logfLocked() io.Writer {
	if r.logf == nil {
		f, err := os.OpenFile(filepath.Join(r.opts.StateDir, "vmm.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			r.log.Warn("no VMM log", "err", err)
			return io.Discard
		}
		r.logf = f
	}
	return r.logf
}

func (r *Runtime) sandboxDir(id string) string { return filepath.Join(r.opts.StateDir, id) }

func checkID(id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("%w: sandbox id %q (want 1-64 characters of [a-z0-9])", ErrInvalidConfig, id)
	}
	return nil
}
