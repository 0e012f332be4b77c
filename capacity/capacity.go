// Package capacity is cubicle's admission control: it keeps the account of
// what the host has promised its sandboxes (memory limits, vCPUs, disk
// sizes) and refuses a sandbox the host cannot hold before any of it is
// made, so that one client cannot exhaust the host for everybody.
//
// Memory and CPU are promises counted against the host's size: the sum of
// the sandboxes' memory limits against MemTotal less a reserve for the
// host itself, times an over-commit ratio (1 by default: a memory limit the
// host cannot back ends in the host's OOM killer, not the sandbox's); the
// sum of their vCPUs against the host's cores times a ratio (16 by
// default: a vCPU is a CFS quota, a cap on time, which idle sandboxes do
// not use). Disk is different: the runtime reserves each sandbox's disk on
// the host when it makes it (the image is fallocated), so what is left is
// the data directory's free space, less a reserve for the server's own
// files (its database, logs, templates), less the disks of creates still
// under way, which have been admitted but not yet allocated.
//
// Every sandbox that holds host resources is in the ledger, pooled ones
// included: a pool fill is admitted like any create (the orchestrator
// decides what yields when the host is full).
package capacity

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	goruntime "runtime"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// ErrFull is what every refusal wraps.
var ErrFull = errors.New("host is full")

// Defaults of Options; cubicle serve's flags start from them.
const (
	DefaultMemoryOvercommit = 1.0
	DefaultCPUOvercommit    = 16.0
	DefaultReserveMemoryMB  = 1024
	DefaultReserveDiskMB    = 1024
)

// Resources are what one sandbox is promised.
type Resources struct {
	CPUs     int
	MemoryMB int
	DiskMB   int
}

// Options size the host. Zero sizes are probed from this machine.
type Options struct {
	// HostMemoryMB is the host's memory (0: MemTotal of /proc/meminfo).
	HostMemoryMB int
	// HostCPUs is the host's cores (0: the CPUs this process may run on).
	HostCPUs int
	// ReserveMemoryMB is kept for the host and is never promised.
	ReserveMemoryMB int
	// MemoryOvercommit and CPUOvercommit multiply what is left to promise
	// (0: the defaults above).
	MemoryOvercommit float64
	CPUOvercommit    float64
	// DiskPath is a directory on the filesystem that holds the sandboxes'
	// disks; "" leaves disk out of the account.
	DiskPath string
	// ReserveDiskMB of DiskPath's free space is never promised.
	ReserveDiskMB int
}

// Ledger is the account. It is safe for concurrent use.
type Ledger struct {
	opts   Options
	memCap float64 // MiB that may be promised
	cpuCap float64 // vCPUs that may be promised

	mu      sync.Mutex
	held    map[string]entry
	mem     int // MiB promised
	cpus    int // vCPUs promised
	pending int // MiB of disk admitted but not yet allocated
}

type entry struct {
	Resources
	pending bool // its disk is not yet allocated on the host
}

// New makes a ledger for the host opts describe.
func New(opts Options) (*Ledger, error) {
	if opts.MemoryOvercommit == 0 {
		opts.MemoryOvercommit = DefaultMemoryOvercommit
	}
	if opts.CPUOvercommit == 0 {
		opts.CPUOvercommit = DefaultCPUOvercommit
	}
	if opts.MemoryOvercommit < 0 || opts.CPUOvercommit < 0 || opts.ReserveMemoryMB < 0 || opts.ReserveDiskMB < 0 {
		return nil, fmt.Errorf("capacity: over-commit ratios and reserves must not be negative")
	}
	if opts.HostMemoryMB == 0 {
		mb, err := memTotalMB()
		if err != nil {
			return nil, fmt.Errorf("capacity: host memory: %w", err)
		}
		opts.HostMemoryMB = mb
	}
	if opts.HostCPUs == 0 {
		opts.HostCPUs = goruntime.NumCPU()
	}
	if opts.ReserveMemoryMB >= opts.HostMemoryMB {
		return nil, fmt.Errorf("capacity: the memory reserve (%d MiB) is not less than the host's %d MiB", opts.ReserveMemoryMB, opts.HostMemoryMB)
	}
	if opts.DiskPath != "" {
		if _, err := freeMB(opts.DiskPath); err != nil {
			return nil, fmt.Errorf("capacity: %w", err)
		}
	}
	return &Ledger{
		opts:   opts,
		memCap: float64(opts.HostMemoryMB-opts.ReserveMemoryMB) * opts.MemoryOvercommit,
		cpuCap: float64(opts.HostCPUs) * opts.CPUOvercommit,
		held:   map[string]entry{},
	}, nil
}

// FullError says which resource refused a sandbox, and by how much.
type FullError struct {
	Resource string // "memory", "vCPUs" or "disk"
	msg      string
}

func (e *FullError) Error() string { return e.msg }

// Unwrap makes every FullError an ErrFull.
func (e *FullError) Unwrap() error { return ErrFull }

// Reserve promises r to the sandbox id, or refuses with a *FullError when
// the host cannot hold it. A disk reservation stays pending (counted
// against the free space) until Settle says it is allocated.
func (l *Ledger) Reserve(id string, r Resources) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.held[id]; ok {
		return fmt.Errorf("capacity: %s already holds a reservation", id)
	}
	if float64(l.mem+r.MemoryMB) > l.memCap {
		return &FullError{Resource: "memory", msg: fmt.Sprintf(
			"%v: %s of %s memory promised to sandboxes (%d MiB host, %d MiB reserve, over-commit %g); refused %d MiB",
			ErrFull, strconv.FormatFloat(float64(l.mem)/1024, 'f', 1, 64), gib(l.memCap), l.opts.HostMemoryMB, l.opts.ReserveMemoryMB, l.opts.MemoryOvercommit, r.MemoryMB)}
	}
	if float64(l.cpus+r.CPUs) > l.cpuCap {
		return &FullError{Resource: "vCPUs", msg: fmt.Sprintf(
			"%v: %d of %g vCPUs promised to sandboxes (%d cores, over-commit %g); refused %d",
			ErrFull, l.cpus, l.cpuCap, l.opts.HostCPUs, l.opts.CPUOvercommit, r.CPUs)}
	}
	if r.DiskMB > 0 && l.opts.DiskPath != "" {
		free, err := freeMB(l.opts.DiskPath)
		if err != nil {
			return fmt.Errorf("capacity: %w", err)
		}
		if left := free - int64(l.opts.ReserveDiskMB) - int64(l.pending); int64(r.DiskMB) > left {
			return &FullError{Resource: "disk", msg: fmt.Sprintf(
				"%v: %s free on the data directory's disk (%s), %s of it kept for the server and %s for sandboxes being made; refused a %s disk",
				ErrFull, size(free), l.opts.DiskPath, size(int64(l.opts.ReserveDiskMB)), size(int64(l.pending)), size(int64(r.DiskMB)))}
		}
	}
	l.add(id, r, r.DiskMB > 0)
	return nil
}

// Adopt accounts a sandbox that exists already (found again at a restart),
// whether or not it fits: it holds its resources either way. Its disk is
// allocated.
func (l *Ledger) Adopt(id string, r Resources) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.held[id]; !ok {
		l.add(id, r, false)
	}
}

func (l *Ledger) add(id string, r Resources, pending bool) {
	l.held[id] = entry{Resources: r, pending: pending}
	l.mem += r.MemoryMB
	l.cpus += r.CPUs
	if pending {
		l.pending += r.DiskMB
	}
}

// Settle says the sandbox's disk is allocated on the host (or was never
// made): the free space now shows it, so it stops counting as pending.
func (l *Ledger) Settle(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.held[id]; ok && e.pending {
		e.pending = false
		l.held[id] = e
		l.pending -= e.DiskMB
	}
}

// Release ends the sandbox's reservation; releasing one that holds none
// is a no-op, so every path that destroys a sandbox may call it.
func (l *Ledger) Release(id string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	e, ok := l.held[id]
	if !ok {
		return
	}
	delete(l.held, id)
	l.mem -= e.MemoryMB
	l.cpus -= e.CPUs
	if e.pending {
		l.pending -= e.DiskMB
	}
}

// Usage is a snapshot of the account, for logs and tests.
type Usage struct {
	Sandboxes             int
	MemoryMB, MemoryCapMB float64
	CPUs, CPUCap          float64
	PendingDiskMB         int
}

// Usage returns what is promised now.
func (l *Ledger) Usage() Usage {
	l.mu.Lock()
	defer l.mu.Unlock()
	return Usage{Sandboxes: len(l.held), MemoryMB: float64(l.mem), MemoryCapMB: l.memCap,
		CPUs: float64(l.cpus), CPUCap: l.cpuCap, PendingDiskMB: l.pending}
}

// gib formats MiB as GiB with one decimal.
func gib(mb float64) string {
	return strconv.FormatFloat(mb/1024, 'f', 1, 64) + " GiB"
}

// size formats MiB as MiB below 10 GiB, else as GiB with one decimal.
func size(mb int64) string {
	if mb < 10<<10 {
		return strconv.FormatInt(mb, 10) + " MiB"
	}
	return gib(float64(mb))
}

// freeMB is the space, in MiB, that an unprivileged writer may still use
// on dir's filesystem (f_bavail: root's reserved blocks are not counted
// as free, the server must not depend on them).
func freeMB(dir string) (int64, error) {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(fs.Bavail * uint64(fs.Bsize) >> 20), nil
}

func memTotalMB() (int, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// MemTotal:       24683332 kB
		if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/meminfo: %q: %w", sc.Text(), err)
			}
			return int(kb >> 10), nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, errors.New("/proc/meminfo has no MemTotal")
}
