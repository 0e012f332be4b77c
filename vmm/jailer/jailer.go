//go:build linux && amd64

// Package jailer confines a VMM process, as Firecracker's jailer does, so
// that a guest that breaks out of KVM's isolation into the VMM finds
// little to use. The parent side (Config.Apply, then Jail.Started once the
// child runs) starts the process in its own mount, PID, network, IPC and
// UTS namespaces and puts it into its own cgroups (cgroup v1 memory and
// pids controllers, which enforce limits here, and the cgroup2 hierarchy
// when there is one, for cgroup.kill). The child side (Enter, called
// first thing by `cubicle vmm`) waits until the parent has placed it, then
// turns a host directory into its whole filesystem (private bind mount,
// a tmpfs /dev holding only kvm, null and optionally net/tun, the
// configured bind mounts, pivot_root), drops to an unprivileged uid and
// gid (which clears every capability on every thread), and installs a
// seccomp allow-list (see rules) on all threads with no_new_privs.
//
// A jail outlives its parent when Config.Detach says so (a VMM whose
// lifetime is its VM's); its Handle (the root and cgroup directories,
// JSON) is then all a later process needs to read its memory and OOM
// kills, kill it and remove it. (The kernel clears the parent-death
// signal anyway when Enter drops the uid; Detach leaves it out from the
// start.)
//
// The jailed process sees its root directory as "/": the host puts what
// it needs (disk images, snapshot files, the vsock socket directory) under
// Config.Root or mounts it there, and passes what it cannot place there
// (a tap) as a descriptor.
package jailer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// EnvVar carries the child's Config (JSON) from Apply to Enter.
const EnvVar = "CUBICLE_JAIL"

// Device numbers of the nodes the jail's /dev holds
// (Documentation/admin-guide/devices.txt).
const (
	kvmMajor, kvmMinor   = 10, 232 // /dev/kvm
	tunMajor, tunMinor   = 10, 200 // /dev/net/tun
	nullMajor, nullMinor = 1, 3    // /dev/null
)

// DefaultUID and DefaultGID are the identity of a jailed VMM when Config
// leaves it unset: nobody/nogroup on Debian.
const (
	DefaultUID = 65534
	DefaultGID = 65534
)

var (
	// ErrConfig is returned for an unusable Config.
	ErrConfig = errors.New("jailer: invalid configuration")
	// ErrEnter is wrapped by the errors of the child's confinement steps.
	ErrEnter = errors.New("jailer: entering the jail failed")
)

// Mount is a host path bind-mounted into the jail.
type Mount struct {
	Source   string `json:"source"`
	Target   string `json:"target"` // absolute path inside the jail
	ReadOnly bool   `json:"read_only"`
}

// Config describes a jail.
type Config struct {
	// Root is the host directory that becomes the process's "/". Apply
	// creates it (mode 0700, owned by UID:GID).
	Root string `json:"root"`
	// UID and GID the process runs as; 0 means DefaultUID/DefaultGID.
	// Root (uid 0) is refused.
	UID int `json:"uid"`
	GID int `json:"gid"`
	// Mounts are bind-mounted into the jail before pivot_root.
	Mounts []Mount `json:"mounts,omitempty"`
	// Tun adds /dev/net/tun (only needed to open a tap by name; taps are
	// normally passed as descriptors).
	Tun bool `json:"tun,omitempty"`
	// Cgroup names the process's cgroup, created below the parent's own
	// cgroup in each hierarchy; empty means "cubicle-vmm-<pid>".
	Cgroup string `json:"cgroup,omitempty"`
	// MemoryLimit (bytes, cgroup v1 memory.limit_in_bytes) and PidsLimit
	// (pids.max); 0 means unlimited.
	MemoryLimit int64 `json:"memory_limit,omitempty"`
	PidsLimit   int64 `json:"pids_limit,omitempty"`
	// Detach leaves out the parent-death signal: the process outlives
	// the parent (a VMM whose lifetime is its VM's, adopted by the next
	// server). Whoever finds it later kills it and removes the jail
	// through the jail's Handle.
	Detach bool `json:"-"`
	// SyncFD is the child's end of the start pipe (set by Apply).
	SyncFD int `json:"sync_fd"`
}

func (c *Config) ids() (uid, gid int) {
	uid, gid = c.UID, c.GID
	if uid == 0 {
		uid = DefaultUID
	}
	if gid == 0 {
		gid = DefaultGID
	}
	return uid, gid
}

func (c *Config) check() error {
	if !filepath.IsAbs(c.Root) || filepath.Clean(c.Root) == "/" {
		return fmt.Errorf("%w: root %q must be an absolute directory other than /", ErrConfig, c.Root)
	}
	for _, m := range c.Mounts {
		if !filepath.IsAbs(m.Source) || !filepath.IsAbs(m.Target) || strings.Contains(m.Target, "..") {
			return fmt.Errorf("%w: mount %q -> %q: paths must be absolute and free of \"..\"", ErrConfig, m.Source, m.Target)
		}
	}
	if c.UID < 0 || c.GID < 0 {
		return fmt.Errorf("%w: negative uid or gid", ErrConfig)
	}
	return nil
}

// Jail is the parent's handle on a jailed process.
type Jail struct {
	cfg      Config
	sync     *os.File // parent's end of the start pipe
	childEnd *os.File // the child's end, closed here once it started
	cgroups  *cgroups
}

// Apply prepares cmd (not yet started) to run in the jail: namespaces,
// parent-death signal (unless Detach), the start pipe and the Config in
// the environment, and the root directory. Call Started right after
// cmd.Start succeeds, and Cleanup after the process has exited.
func (c Config) Apply(cmd *exec.Cmd) (*Jail, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	uid, gid := c.ids()
	if err := os.MkdirAll(c.Root, 0o700); err != nil {
		return nil, fmt.Errorf("jailer: root: %w", err)
	}
	if err := os.Chown(c.Root, uid, gid); err != nil {
		return nil, fmt.Errorf("jailer: root: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("jailer: start pipe: %w", err)
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, r)
	c.SyncFD = 2 + len(cmd.ExtraFiles)
	enc, err := json.Marshal(c)
	if err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("jailer: %w", err)
	}
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Env = append(slices.Clip(cmd.Env), EnvVar+"="+string(enc))
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Cloneflags |= unix.CLONE_NEWNS | unix.CLONE_NEWPID | unix.CLONE_NEWNET |
		unix.CLONE_NEWIPC | unix.CLONE_NEWUTS
	if !c.Detach {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	return &Jail{cfg: c, sync: w, childEnd: r}, nil
}

// Started puts the just-started process pid into its cgroups and lets it
// enter the jail. The start pipe is closed either way; on error the child
// gives up without confining itself and exits. Call Abort instead when
// cmd.Start failed.
func (j *Jail) Started(pid int) error {
	defer j.sync.Close()
	j.childEnd.Close()
	name := j.cfg.Cgroup
	if name == "" {
		name = fmt.Sprintf("cubicle-vmm-%d", pid)
	}
	cg, err := newCgroups(name, j.cfg.MemoryLimit, j.cfg.PidsLimit)
	if err != nil {
		return err
	}
	j.cgroups = cg
	if err := cg.add(pid); err != nil {
		return err
	}
	if _, err := j.sync.Write([]byte{1}); err != nil {
		return fmt.Errorf("jailer: releasing the child: %w", err)
	}
	return nil
}

// Abort releases what Apply set up for a process that did not start.
func (j *Jail) Abort() {
	j.sync.Close()
	j.childEnd.Close()
}

// InCgroup reports whether process pid is in the jail's cgroups (all of
// those made).
func (h Handle) InCgroup(pid int) (bool, error) {
	cg := h.cgroups()
	dirs := cg.dirs()
	if len(dirs) == 0 {
		return false, nil
	}
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "cgroup.procs"))
		if err != nil {
			return false, fmt.Errorf("%w: %w", ErrCgroup, err)
		}
		if !slices.Contains(strings.Fields(string(b)), strconv.Itoa(pid)) {
			return false, nil
		}
	}
	return true, nil
}

// Kill kills every process in the jail's cgroup (cgroup.kill where the
// cgroup2 hierarchy has it).
func (j *Jail) Kill() error { return j.Handle().Kill() }

// Cleanup removes the jail's cgroups and its root directory (with what
// the host or the process put there). The process must have exited.
func (j *Jail) Cleanup() error { return j.Handle().Remove() }

// Handle returns what finding the jail again takes, for a detached
// process whose parent is gone: a later process (a restarted server)
// keeps it (it marshals to JSON) and reads, kills and removes the jail
// through it.
func (j *Jail) Handle() Handle {
	h := Handle{Root: j.cfg.Root}
	if j.cgroups != nil {
		h.Memory, h.Pids, h.Unified = j.cgroups.memory, j.cgroups.pids, j.cgroups.unified
	}
	return h
}

// Handle names a jail's parts on the host: its root directory and its
// cgroup directories ("" for those not made).
type Handle struct {
	Root    string `json:"root"`
	Memory  string `json:"memory,omitempty"`
	Pids    string `json:"pids,omitempty"`
	Unified string `json:"unified,omitempty"`
}

func (h Handle) cgroups() *cgroups {
	return &cgroups{memory: h.Memory, pids: h.Pids, unified: h.Unified}
}

// check refuses a Handle (read back from a file) whose cgroups
// are not below the cgroup mounts or whose root is not a jail root.
func (h Handle) check() error {
	for _, d := range []string{h.Memory, h.Pids, h.Unified} {
		if d != "" && (!strings.HasPrefix(d, cgroupRoot+"/") || strings.Contains(d, "..")) {
			return fmt.Errorf("%w: cgroup %q is not below %s", ErrConfig, d, cgroupRoot)
		}
	}
	if h.Root != "" && (!filepath.IsAbs(h.Root) || filepath.Clean(h.Root) == "/" || strings.Contains(h.Root, "..")) {
		return fmt.Errorf("%w: root %q", ErrConfig, h.Root)
	}
	return nil
}

// Find returns the Handle of a jail made by this process's Apply with
// cgroup name and root, or by an earlier process in the same cgroups
// (a restarted server): the cgroup directories that exist.
func Find(root, cgroup string) (Handle, error) {
	h := Handle{Root: root}
	if cgroup == "" || strings.Contains(cgroup, "/") || strings.Contains(cgroup, "..") {
		return h, fmt.Errorf("%w: cgroup name %q", ErrConfig, cgroup)
	}
	for _, c := range []struct {
		mount, controller string
		dir               *string
	}{{"memory", "memory", &h.Memory}, {"pids", "pids", &h.Pids}, {"unified", "", &h.Unified}} {
		own, err := ownCgroup(c.controller)
		if err != nil {
			continue
		}
		d := filepath.Join(cgroupRoot, c.mount, own, cgroup)
		if _, err := os.Stat(d); err == nil {
			*c.dir = d
		}
	}
	return h, h.check()
}

// Empty reports whether no process is left in the jail's cgroups.
func (h Handle) Empty() (bool, error) {
	pids, err := h.cgroups().procs()
	if errors.Is(err, os.ErrNotExist) {
		return true, nil
	}
	return len(pids) == 0, err
}

// Kill kills every process in the jail's cgroups.
func (h Handle) Kill() error {
	if err := h.check(); err != nil {
		return err
	}
	return h.cgroups().kill()
}

// Remove deletes the jail's cgroups and root directory; its processes
// must have exited. What is gone already is no error.
func (h Handle) Remove() error {
	if err := h.check(); err != nil {
		return err
	}
	err := h.cgroups().remove()
	if h.Root != "" {
		if rerr := os.RemoveAll(h.Root); rerr != nil {
			err = errors.Join(err, fmt.Errorf("jailer: root: %w", rerr))
		}
	}
	return err
}

// MemoryUsage is what the jail's memory cgroup is charged, in bytes.
func (h Handle) MemoryUsage() (uint64, error) { return h.cgroups().memoryUsage() }

// OOMKills is how many processes the kernel's OOM killer ended in the
// jail's memory cgroup (the memory limit was hit).
func (h Handle) OOMKills() (uint64, error) { return h.cgroups().oomKills() }

// Root returns the host directory that is the jail's "/".
func (j *Jail) Root() string { return j.cfg.Root }

// HostPath maps a path inside the jail to the host.
func (j *Jail) HostPath(p string) string { return filepath.Join(j.cfg.Root, filepath.Clean("/"+p)) }

// EnterFromEnv enters the jail described by EnvVar, if set; it reports
// whether it did. A process started by Apply must call it before doing
// anything else.
func EnterFromEnv() (bool, error) {
	v, ok := os.LookupEnv(EnvVar)
	if !ok {
		return false, nil
	}
	os.Unsetenv(EnvVar)
	var c Config
	if err := json.Unmarshal([]byte(v), &c); err != nil {
		return false, fmt.Errorf("%w: %s: %w", ErrConfig, EnvVar, err)
	}
	return true, Enter(&c)
}

// Enter confines the calling process as c says (see the package comment).
// It must run in the namespaces Apply asked for.
func Enter(c *Config) error {
	if err := c.check(); err != nil {
		return err
	}
	if c.SyncFD > 0 {
		f := os.NewFile(uintptr(c.SyncFD), "jail-sync")
		var b [1]byte
		n, err := f.Read(b[:])
		f.Close()
		if n != 1 {
			return fmt.Errorf("%w: the parent did not release the process: %v", ErrEnter, err)
		}
	}
	if err := setupRoot(c); err != nil {
		return err
	}
	uid, gid := c.ids()
	// Go applies these to every thread; with all uids non-zero the kernel
	// clears every thread's permitted and effective capabilities.
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("%w: setgroups: %w", ErrEnter, err)
	}
	if err := syscall.Setresgid(gid, gid, gid); err != nil {
		return fmt.Errorf("%w: setresgid: %w", ErrEnter, err)
	}
	if err := syscall.Setresuid(uid, uid, uid); err != nil {
		return fmt.Errorf("%w: setresuid: %w", ErrEnter, err)
	}
	return installSeccomp()
}

// setupRoot builds the jail's filesystem and pivots into it.
func setupRoot(c *Config) error {
	fail := func(what string, err error) error { return fmt.Errorf("%w: %s: %w", ErrEnter, what, err) }
	root := filepath.Clean(c.Root)
	uid, gid := c.ids()
	// Nothing mounted here propagates back to the host.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fail("make / private", err)
	}
	if err := unix.Mount(root, root, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fail("bind root", err)
	}
	dev := filepath.Join(root, "dev")
	if err := os.MkdirAll(dev, 0o755); err != nil {
		return fail("mkdir /dev", err)
	}
	if err := unix.Mount("tmpfs", dev, "tmpfs", unix.MS_NOSUID|unix.MS_NOEXEC, "mode=0755,size=64k"); err != nil {
		return fail("tmpfs /dev", err)
	}
	nodes := []struct {
		path         string
		major, minor uint32
		mode         uint32
	}{
		{"kvm", kvmMajor, kvmMinor, 0o600},
		{"null", nullMajor, nullMinor, 0o666},
	}
	if c.Tun {
		if err := os.Mkdir(filepath.Join(dev, "net"), 0o755); err != nil {
			return fail("mkdir /dev/net", err)
		}
		nodes = append(nodes, struct {
			path         string
			major, minor uint32
			mode         uint32
		}{"net/tun", tunMajor, tunMinor, 0o600})
	}
	for _, n := range nodes {
		p := filepath.Join(dev, n.path)
		if err := unix.Mknod(p, unix.S_IFCHR|n.mode, int(unix.Mkdev(n.major, n.minor))); err != nil {
			return fail("mknod "+n.path, err)
		}
		if err := unix.Chmod(p, n.mode); err != nil { // mknod honours the umask
			return fail("chmod "+n.path, err)
		}
		if err := os.Chown(p, uid, gid); err != nil {
			return fail("chown "+n.path, err)
		}
	}
	for _, m := range c.Mounts {
		if err := bindMount(root, m); err != nil {
			return fail("mount "+m.Target, err)
		}
	}
	if err := unix.Chdir(root); err != nil {
		return fail("chdir root", err)
	}
	// pivot_root(".", ".") stacks the old root on top of the new one;
	// detaching it leaves only the jail.
	if err := unix.PivotRoot(".", "."); err != nil {
		return fail("pivot_root", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fail("detach old root", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fail("chdir /", err)
	}
	return nil
}

func bindMount(root string, m Mount) error {
	target := filepath.Join(root, filepath.Clean(m.Target))
	st, err := os.Stat(m.Source)
	if err != nil {
		return err
	}
	if st.IsDir() {
		err = os.MkdirAll(target, 0o755)
	} else {
		if err = os.MkdirAll(filepath.Dir(target), 0o755); err == nil {
			var f *os.File
			if f, err = os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o644); err == nil {
				f.Close()
			}
		}
	}
	if err != nil {
		return err
	}
	if err := unix.Mount(m.Source, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return err
	}
	if m.ReadOnly {
		flags := uintptr(unix.MS_BIND | unix.MS_REMOUNT | unix.MS_RDONLY | unix.MS_NOSUID | unix.MS_NODEV)
		if err := unix.Mount("", target, "", flags, ""); err != nil {
			return err
		}
	}
	return nil
}
