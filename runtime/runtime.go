// Package runtime defines the isolation boundary of a sandbox: the one
// interface that the orchestrator drives and that each backend (gvisor today,
// microvm next) implements. A runtime knows how to start, freeze, thaw,
// measure and destroy one sandbox; it knows nothing of the HTTP API, timeouts
// or pools.
package runtime

import (
	"context"
	"errors"
	"net/netip"
	"time"
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

// Egress is a sandbox's outbound network policy in E2B's terms: whether
// it may reach the internet at all, and CIDRs (AllowOut) and domain names
// (AllowDomains: "example.com" or "*.example.com") it may reach, which win
// over the CIDRs it may not (DenyOut). Hard rules no policy opens (other
// sandboxes, the host, link-local and metadata addresses) are the
// runtime's own.
type Egress struct {
	AllowInternet bool           `json:"allowInternet"`
	AllowOut      []netip.Prefix `json:"allowOut,omitempty"`
	AllowDomains  []string       `json:"allowDomains,omitempty"`
	DenyOut       []netip.Prefix `json:"denyOut,omitempty"`
}

// DefaultEgress is the policy of a sandbox nobody asked anything of.
var DefaultEgress = Egress{AllowInternet: true}

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
	// Egress counts what the sandbox sent since it started, as the host's
	// eBPF egress program saw it. Zero where the runtime has no policy.
	Egress EgressCounters
}

// EgressCounters are packets and bytes a sandbox sent that its egress
// policy let out (Passed) and dropped (Dropped, IPv6 included).
type EgressCounters struct {
	PassedPackets, PassedBytes   uint64
	DroppedPackets, DroppedBytes uint64
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
	// Kill destroys the sandbox and everything made for it (processes,
	// network devices, namespaces, overlay, cgroups). Killing a sandbox that
	// is already gone is not an error.
	Kill(ctx context.Context, id string) error
	// List reports every sandbox this runtime finds on the host, including
	// ones started by an earlier run of the server, so that they can be
	// reconciled at start.
	List(ctx context.Context) ([]Sandbox, error)
	// Stats samples the sandbox's resource use.
	Stats(ctx context.Context, id string) (Stats, error)
	// SetEgress replaces the sandbox's outbound policy; it takes effect on
	// the next packet. A new sandbox starts with DefaultEgress.
	SetEgress(ctx context.Context, id string, e Egress) error
	// Wait blocks until the sandbox stops running, and says why, or until
	// ctx is done (ctx's error). It answers at once for a sandbox that has
	// stopped already, and ErrNotFound for one the runtime does not hold.
	// A paused sandbox has not stopped. It must work for sandboxes started
	// by an earlier run of the server, which are not this process's
	// children. A sandbox that Kill destroys stops too; callers that
	// killed it ignore that Exit.
	Wait(ctx context.Context, id string) (Exit, error)
}
