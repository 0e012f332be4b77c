// Package gvisor is the gVisor backend of runtime.Runtime: it runs each
// sandbox as a runsc container whose root filesystem is a host overlayfs
// (the template's rootfs as the read-only lower layer, a per-sandbox upper
// layer on the sandbox's own ext4 disk of Config.DiskSizeMB) and whose
// network is the namespace of Config.Network, which the caller claimed
// (and put under its egress policy) and releases after Kill: the runtime
// only joins it.
//
// Everything a sandbox needs lives in StateDir/<id>/ (the OCI bundle, the
// disk image, the overlay layers, the persisted Config) and in runsc's own
// state root StateDir/runsc, and runsc's processes run in their own
// session; the mounts and loop devices belong to the host, not to this
// process. So sandboxes outlive the server and a new Runtime finds them
// again.
//
// Layout of StateDir/<id>/:
//
//	config.json   OCI runtime spec (runtime-spec Go types)
//	sandbox.json  the runtime.Config, address and disk, for List/Stats after a restart
//	disk.img      the sandbox's disk: sparse ext4 image of Config.DiskSizeMB
//	disk/         its mount point (loop device, cleared by the kernel at unmount)
//	disk/upper/   the sandbox's writable layer (overlayfs upperdir)
//	disk/work/    overlayfs's work dir
//	rootfs/       overlayfs mount point: lower=Config.RootFS, upper=disk/upper/
//	envd.log      stdout and stderr of envd
//	runsc.log     runsc's own errors
//
// With DiskSizeMB 0 there is no disk.img or disk/, and upper/ and work/
// are directly in StateDir/<id>/ on the host's filesystem, with no limit:
// the layout of sandboxes made before disks were enforced, which Stats
// and Kill still handle. StateDir/disk-cache/ holds one formatted image
// per disk size, copied for each sandbox (see disk.go).
//
// Cost, measured on the 2-core development VM (BenchmarkCreate,
// BenchmarkRunscRun): Create until envd answers /health takes a median of
// about 110 ms (network 2 ms, disk 1 to 2 ms, overlay and bundle under 1
// ms, `runsc create` about 60 ms, `runsc start` about 35 ms, envd start
// about 15 ms), against about 97 ms for a cold `runsc run` of a program
// that exits at once. About 25 ms of `runsc create` is two cgroup v1
// migrations (runsc joining the sandbox's cgroups and leaving them), each
// waiting for an RCU grace period in the kernel; about 8 ms of `runsc
// start` is compiling the seccomp filter, which this (non-Bazel) build of
// runsc has no precompiled copy of.
// --file-access=shared, --directfs=false, --platform=ptrace and `runsc run
// --detach` were measured and were no faster (within noise, or slower), so
// runsc's defaults stay; --platform=kvm does not boot on the development
// machines' PVM. Hence the orchestrator's pool of pre-started sandboxes.
//
// The disk's share (BenchmarkDisk, BenchmarkCreateDisk): copying the
// cached image, attaching the loop device and mounting take a median of
// 0.8 ms (64 MiB), 1.0 ms (1 GiB) and 1.3 ms (10 GiB), and Kill's unmount
// and removal about as much. Creates alternating in one run (loaded VM,
// two runs) took a median of 122 and 121 ms without a disk, 121 and 125
// ms with 1 GiB, 126 and 128 ms with 10 GiB: the disk adds its setup and
// a few ms of noise-sized cost to the sandbox's start.
package gvisor

import (
	_ "embed"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/template"
)

// Name is the backend's name.
const Name = "gvisor"

// platforms are the values of Options.Platform runsc accepts.
var platforms = []string{"systrap", "ptrace", "kvm"}

// runscVersionFile is the one place the pinned gVisor version is written:
// scripts/lib.sh reads the same file to build runsc.
//
//go:embed runsc.version
var runscVersionFile string

// RunscVersion is the gVisor module version the runtime is built and
// tested against (see shared/DESIGN.md). A cgo build of runsc fails at
// sandbox start.
var RunscVersion = strings.TrimSpace(runscVersionFile)

// RunscModule is the Go package runsc is built from, at RunscVersion.
const RunscModule = "gvisor.dev/gvisor/runsc"

// DefaultCgroupParent is the cgroup, in every controller's hierarchy, under
// which each sandbox gets a cgroup named after its ID.
const DefaultCgroupParent = "/cubicle"

var (
	// ErrInvalidConfig is returned for a runtime.Config or Options that
	// cannot be used.
	ErrInvalidConfig = errors.New("gvisor: invalid config")
	// ErrExists is returned by Create when the sandbox ID is in use.
	ErrExists = errors.New("gvisor: sandbox already exists")
	// ErrRunscNotFound is returned by New when no runsc binary is found.
	ErrRunscNotFound = errors.New("gvisor: runsc not found")
)

// RunscError is a failed runsc command, with what it printed.
type RunscError struct {
	Args   []string
	Output string
	Err    error
}

func (e *RunscError) Error() string {
	out := strings.TrimSpace(e.Output)
	if out == "" {
		return fmt.Sprintf("gvisor: runsc %s: %v", strings.Join(e.Args, " "), e.Err)
	}
	return fmt.Sprintf("gvisor: runsc %s: %v: %s", strings.Join(e.Args, " "), e.Err, out)
}

func (e *RunscError) Unwrap() error { return e.Err }

// Options configures a Runtime.
type Options struct {
	// Runsc is the runsc binary. Empty means what FindRunsc finds with
	// the default cache directory.
	Runsc string
	// StateDir holds the sandboxes' bundles and runsc's state; typically a
	// directory under the server's data dir. Required.
	StateDir string
	// Platform is runsc's --platform: "systrap" (the default; needs
	// nothing from the host), "ptrace" (slower) or "kvm" (needs /dev/kvm
	// with hardware virtualisation: on a PVM host such as the development
	// machines the sandbox fails to boot).
	Platform string
	// CgroupParent is the parent cgroup of every sandbox's cgroup
	// (DefaultCgroupParent).
	CgroupParent string
	// RunscFlags are extra global runsc flags, appended last so that they
	// override the runtime's own choices (e.g. "--debug-log=/tmp/runsc/").
	RunscFlags []string
	// Logger receives lifecycle events (slog.Default()).
	Logger *slog.Logger
}

// Runtime runs sandboxes under gVisor. It keeps no state in memory: the
// sandbox directories, runsc's state root and the kernel (cgroups, mounts,
// network devices) are the state, which is what lets a new Runtime take
// over the sandboxes of an old one. There is therefore no mutex; calls for
// different sandboxes run in parallel, and callers serialise calls for one
// sandbox as runtime.Runtime requires.
type Runtime struct {
	runsc        string
	stateDir     string
	runscRoot    string
	cgroupParent string
	// noDisks, when set, says why this host cannot give sandboxes disks of
	// their own (no loop devices, no mkfs.ext4): DiskSizeMB is then
	// reported but not enforced, and New warned about it.
	noDisks string
	// flags are the global runsc flags given to every runsc command, so
	// that every command agrees on the state root and configuration.
	flags []string
	log   *slog.Logger
}

var _ runtime.Runtime = (*Runtime)(nil)

// validID restricts sandbox IDs to what is safe in paths, cgroup names and
// runsc container IDs.
var validID = regexp.MustCompile(`^[a-z0-9]{1,64}$`)

// runscDir is StateDir's subdirectory that runsc uses as its --root. It can
// never clash with a sandbox directory: see checkID.
const runscDir = "runsc"

// New makes a Runtime. It checks that runsc exists and creates StateDir.
func New(opts Options) (*Runtime, error) {
	if opts.StateDir == "" || !filepath.IsAbs(opts.StateDir) {
		return nil, fmt.Errorf("%w: StateDir %q must be an absolute path", ErrInvalidConfig, opts.StateDir)
	}
	if opts.Platform == "" {
		opts.Platform = "systrap"
	}
	if err := CheckPlatform(opts.Platform); err != nil {
		return nil, err
	}
	if opts.CgroupParent == "" {
		opts.CgroupParent = DefaultCgroupParent
	}
	if !filepath.IsAbs(opts.CgroupParent) {
		return nil, fmt.Errorf("%w: CgroupParent %q must start with /", ErrInvalidConfig, opts.CgroupParent)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	runsc, err := FindRunsc(opts.Runsc, "")
	if err != nil {
		return nil, err
	}
	r := &Runtime{
		runsc:        runsc,
		stateDir:     opts.StateDir,
		runscRoot:    filepath.Join(opts.StateDir, runscDir),
		cgroupParent: filepath.Clean(opts.CgroupParent),
		log:          opts.Logger.With("runtime", Name),
		noDisks:      diskSupport(),
	}
	if r.noDisks != "" {
		r.log.Warn("sandbox disk sizes are not enforced on this host: a sandbox can fill the data directory's disk", "why", r.noDisks)
	}
	if err := os.MkdirAll(r.runscRoot, 0o700); err != nil {
		return nil, fmt.Errorf("gvisor: create state dir: %w", err)
	}
	// Root's alone: it holds the sandboxes' file systems, setuid binaries
	// included (their mounts are nosuid as well).
	if err := os.Chmod(r.stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("gvisor: state dir: %w", err)
	}
	r.flags = append([]string{
		"--root=" + r.runscRoot,
		"--platform=" + opts.Platform,
		// runsc moves the namespace's addresses and routes into its own
		// network stack (and strips them from eth0, so a namespace serves
		// one sandbox only).
		"--network=sandbox",
		// The root filesystem is already an overlay on the host: see
		// overlay.go for why runsc's own overlay is not used.
		"--overlay2=none",
		// Setuid and setgid bits work inside the sandbox (sudo, as E2B's
		// user has passwordless sudo). The sentry decides it at execve
		// from the bits the gofer reports and its own mount flags; the
		// host's nosuid on the sandbox's mounts (overlay.go, disk.go) is
		// not consulted, and keeps the host from ever honouring the bits.
		"--allow-suid",
	}, opts.RunscFlags...)
	return r, nil
}

// RunscPath is where scripts/deps.sh puts the pinned runsc under a cache
// directory (template.DefaultCacheDir when empty), one directory per version.
func RunscPath(cacheDir string) string {
	if cacheDir == "" {
		cacheDir = template.DefaultCacheDir()
	}
	return filepath.Join(cacheDir, "runsc", RunscVersion, "runsc")
}

// FindRunsc is the one runsc finder: path when given, else $CUBICLE_RUNSC,
// else the pinned build under cacheDir (RunscPath), else runsc on $PATH.
// The pinned build comes before $PATH because it is the version cubicle is
// tested with. An explicit path or $CUBICLE_RUNSC that does not work is an
// error, not a reason to pick some other binary.
func FindRunsc(path, cacheDir string) (string, error) {
	var candidates []string
	switch {
	case path != "":
		candidates = []string{path}
	case os.Getenv("CUBICLE_RUNSC") != "":
		candidates = []string{os.Getenv("CUBICLE_RUNSC")}
	default:
		candidates = []string{RunscPath(cacheDir), "runsc"}
	}
	for _, c := range candidates {
		if p, err := exec.LookPath(c); err == nil {
			return filepath.Abs(p)
		}
	}
	return "", fmt.Errorf("%w (tried %s): run scripts/deps.sh, which builds it static into %s, or set --runsc or $CUBICLE_RUNSC",
		ErrRunscNotFound, strings.Join(candidates, ", "), RunscPath(cacheDir))
}

// CheckPlatform says whether runsc accepts p as its --platform, so that a
// server can refuse a bad one before doing anything.
func CheckPlatform(p string) error {
	if !contains(platforms, p) {
		return fmt.Errorf("%w: platform %q is not one of %v", ErrInvalidConfig, p, platforms)
	}
	return nil
}

// Name implements runtime.Runtime.
func (r *Runtime) Name() string { return Name }

// StateDir is where the sandboxes' files, their disks included, live.
func (r *Runtime) StateDir() string { return r.stateDir }

// Runsc is the path of the runsc binary in use.
func (r *Runtime) Runsc() string { return r.runsc }

func (r *Runtime) sandboxDir(id string) string { return filepath.Join(r.stateDir, id) }

func checkID(id string) error {
	if !validID.MatchString(id) || id == runscDir {
		return fmt.Errorf("%w: sandbox id %q (want 1-64 characters of [a-z0-9], not %q)", ErrInvalidConfig, id, runscDir)
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
