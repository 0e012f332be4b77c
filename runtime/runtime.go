// Package runtime defines the isolation boundary of a sandbox: the one
// interface that the orchestrator drives and that each backend (gvisor today,
// microvm next) implements. A runtime knows how to start, freeze, thaw,
// measure and destroy one sandbox; it knows nothing of the HTTP API, timeouts
// or pools.
//
// Nor of egress policy: the orchestrator claims each sandbox's network
// devices from a network.Pool, puts them under the sandbox's policy
// (network/egress) and releases them after Kill. A runtime is handed the
// claimed devices in Config.Network and plugs the sandbox into them: gVisor
// into the namespace's veth, a microVM's VMM into its tap. Policy,
// resolver and counters live on the host end of those devices, which no
// runtime touches, so every backend is confined the same way.
//
// Imports run one way: runtime uses network's Attachment, a plain
// description of devices, and network never imports runtime.
package runtime

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/cubicle-dev/cubicle/network"
)

// EnvdPort is the TCP port envd listens on inside every sandbox.
const EnvdPort = 49983

// ErrNotFound is returned when a runtime has no sandbox with the given ID.
var ErrNotFound = errors.New("runtime: sandbox not found")

// Config describes one sandbox to start.
type Config struct {
	// ID is the sandbox ID: 20 characters of [a-z0-9]. Runtimes use it to name
	// everything they create for the sandbox, so that it can be found again.
	ID string
	// TemplateID names the template the sandbox is made from.
	TemplateID string
	// RootFS is the template's root filesystem directory. It is never
	// written: each sandbox writes into its own overlay above it.
	RootFS string
	// CPUCount, MemoryMB and DiskSizeMB are the sandbox's limits.
	CPUCount   int
	MemoryMB   int
	DiskSizeMB int
	// Envd is the host path of the binary that runs as the sandbox's first
	// process, and EnvdArgs its arguments (argv[1:]).
	Envd     string
	EnvdArgs []string
	// Network is the sandbox's network devices, claimed by the caller and
	// already under its egress policy: the runtime runs the sandbox in
	// Network.Netns (on eth0 with Network.Addr, or on Network.Tap for a
	// VMM) and never creates, changes or removes them; the caller
	// releases them after Kill.
	Network network.Attachment
	// GatewayDNS says that a resolver answers on the sandbox's gateway
	// (the host end: Network.Gateway, or Network.GuestGateway inside a
	// microVM), and only there: the runtime makes it the sandbox's
	// nameserver. False keeps the template's resolver configuration.
	GatewayDNS bool
	// Volumes are host directories shared read-write with the sandbox
	// (volumes.go). A backend that cannot share one fails Create with
	// ErrUnsupported.
	Volumes []VolumeMount `json:",omitempty"`
}

// State is where a sandbox stands as the runtime sees it.
type State string

const (
	StateRunning State = "running"
	StatePaused  State = "paused"
	StateStopped State = "stopped"
)

// Sandbox is what a runtime reports of a sandbox it holds.
type Sandbox struct {
	ID string
	// Addr is the address at which the host reaches the sandbox's TCP ports.
	Addr  netip.Addr
	State State
}

// Stats are resource figures sampled on the host side (cgroups, disk).
type Stats struct {
	// CPUUsage is the cumulative CPU time the sandbox has used.
	CPUUsage time.Duration
	// MemUsed and MemLimit are in bytes; MemCache is page cache, in bytes.
	MemUsed  uint64
	MemLimit uint64
	MemCache uint64
	// DiskUsed is the bytes written into the sandbox's own layer; DiskTotal
	// is its size limit in bytes.
	DiskUsed  uint64
	DiskTotal uint64
}

// Reasons a sandbox stopped on its own, as Exit.Reason gives them.
const (
	// ExitOOM: the host killed the sandbox for exceeding its memory limit.
	ExitOOM = "oom"
	// ExitExited: the sandbox's processes ended or were killed (a crash,
	// its first process exiting, a kill from outside the server).
	ExitExited = "exited"
)

// Exit says why a sandbox stopped without the runtime being asked to stop
// it.
type Exit struct {
	ID string
	// Reason is ExitOOM or ExitExited.
	Reason string
	// Detail is what else the runtime knows (an exit status), for logs.
	Detail string
}

// Runtime is one isolation backend. All methods are safe for concurrent use
// on different sandboxes; callers serialise calls for one sandbox, except
// Wait, which runs alongside the others.
type Runtime interface {
	// Name is the backend's name, e.g. "gvisor".
	Name() string
	// Create starts a sandbox whose first process is envd. It returns once the
	// sandbox's processes run; envd may still be starting.
	Create(ctx context.Context, cfg Config) (Sandbox, error)
	// Pause freezes every process of the sandbox, keeping all its state.
	Pause(ctx context.Context, id string) error
	// Resume thaws a paused sandbox.
	Resume(ctx context.Context, id string) error
	// Kill destroys the sandbox and everything the runtime made for it
	// (processes, overlay, disks, cgroups), not Config.Network, which is
	// the caller's to release afterwards. Killing a sandbox that is
	// already gone is not an error.
	Kill(ctx context.Context, id string) error
	// List reports every sandbox this runtime finds on the host, including
	// ones started by an earlier run of the server, so that they can be
	// reconciled at start.
	List(ctx context.Context) ([]Sandbox, error)
	// Stats samples the sandbox's resource use. (Egress counters are
	// not the runtime's: see the package documentation.)
	Stats(ctx context.Context, id string) (Stats, error)
	// Wait blocks until the sandbox stops running, and says why, or until
	// ctx is done (ctx's error). It answers at once for a sandbox that has
	// stopped already, and ErrNotFound for one the runtime does not hold.
	// A paused sandbox has not stopped. It must work for sandboxes started
	// by an earlier run of the server, which are not this process's
	// children. A sandbox that Kill destroys stops too; callers that
	// killed it ignore that Exit.
	Wait(ctx context.Context, id string) (Exit, error)
}

// SnapshotOptions say what Snapshotter.Snapshot saves.
type SnapshotOptions struct {
	// Memory saves the processes and their memory as well as the
	// filesystem: a sandbox restored from the snapshot continues every
	// process where it was. Without it only the filesystem is saved, and a
	// restored sandbox boots afresh on it (E2B's pause with memory false).
	Memory bool
	// Temporary says the snapshot serves this process only (a fork's,
	// removed once its copies run): it need not survive a crash of the
	// host, so it is not flushed to disk.
	Temporary bool
}

// Snapshotter is a Runtime that can save a sandbox's state to a directory
// and start sandboxes that continue from it: snapshots, forks and pause to
// disk are all made of these two calls. A snapshot directory is the
// runtime's own format; the caller only names, moves and removes it.
type Snapshotter interface {
	// Snapshot saves sandbox id into dir, which must not exist: it appears
	// complete or not at all. A running sandbox is frozen for the time it
	// takes and runs on afterwards; a paused one stays paused.
	Snapshot(ctx context.Context, id, dir string, opts SnapshotOptions) error
	// Restore starts the sandbox cfg describes from the snapshot in dir,
	// as Create starts one from a template: cfg.RootFS must be the
	// template the snapshotted sandbox was made from, and its limits at
	// least the snapshotted sandbox's. cfg.Volumes nil mounts the
	// snapshotted sandbox's volumes, whose files its processes may hold
	// open. (A microVM restored with its memory keeps the snapshot's
	// vCPUs and memory size: larger limits are accepted, not used.) The
	// snapshot is only read, so one snapshot restores any number of
	// sandboxes.
	Restore(ctx context.Context, cfg Config, dir string) (Sandbox, error)
}
