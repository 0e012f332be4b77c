package gvisor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
)

// OnceConfig is one command run to its end in a sandbox of its own whose
// root filesystem is RootFS itself, written in place: the template
// builder's RUN steps (each step's changes are the directory's).
type OnceConfig struct {
	// ID names the run like a sandbox ID (validID), in runsc and cgroups.
	ID string
	// RootFS is the writable root filesystem directory.
	RootFS string
	// Args, Env ("K=V"), Cwd and User (a name or uid[:gid] from RootFS's
	// /etc/passwd and /etc/group) describe the process.
	Args []string
	Env  []string
	Cwd  string
	User string
	// CPUCount and MemoryMB are its limits.
	CPUCount int
	MemoryMB int
	// Network is the run's devices (claimed by the caller, under its
	// policy); GatewayDNS as in runtime.Config.
	Network    network.Attachment
	GatewayDNS bool
	// Output receives the process's stdout and stderr.
	Output io.Writer
}

// RunOnce runs cfg's command in a sandbox whose root is cfg.RootFS, writable,
// and returns its exit status once it ends; ctx's end kills it. It is a
// sandbox like any other (gVisor, its own namespaces, cgroup limits, the
// network it is given), but without an overlay or a disk of its own: what
// the command writes lands in RootFS, which is what a template build wants.
// Nothing of the run is left when it returns.
func (r *Runtime) RunOnce(ctx context.Context, cfg OnceConfig) (int, error) {
	if err := checkID(cfg.ID); err != nil {
		return -1, err
	}
	if len(cfg.Args) == 0 || cfg.CPUCount < 1 || cfg.MemoryMB < 1 {
		return -1, fmt.Errorf("%w: a run needs Args, CPUCount and MemoryMB", ErrInvalidConfig)
	}
	if n := cfg.Network; n.Netns == "" || !n.Addr.IsValid() || !n.Gateway.IsValid() {
		return -1, fmt.Errorf("%w: a run needs a network namespace, an address and a gateway", ErrInvalidConfig)
	}
	uid, gid, err := lookupUser(cfg.RootFS, cfg.User)
	if err != nil {
		return -1, fmt.Errorf("%w: user %q: %v", ErrInvalidConfig, cfg.User, err)
	}
	dir := r.sandboxDir(cfg.ID)
	if err := os.Mkdir(dir, 0o700); err != nil {
		return -1, fmt.Errorf("gvisor: run %s: %w", cfg.ID, err)
	}
	defer func() {
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killTimeout)
		defer cancel()
		r.runscCmd(kctx, "kill", cfg.ID, "KILL")
		if err := r.deleteContainer(kctx, cfg.ID); err != nil {
			r.log.Warn("deleting a run's container", "run", cfg.ID, "err", err)
		}
		if cg, err := hostCgroups(); err == nil {
			cg.remove(r.cgroupPath(cfg.ID))
		}
		os.RemoveAll(dir)
	}()
	for _, d := range []string{"proc", "dev", "sys", "tmp"} {
		// The mount points, in the image being built: an image may lack them.
		if err := os.Mkdir(filepath.Join(cfg.RootFS, d), 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return -1, fmt.Errorf("gvisor: run %s: %w", cfg.ID, err)
		}
	}
	if cfg.GatewayDNS {
		if err := writeResolvConf(dir, cfg.Network.Gateway); err != nil {
			return -1, err
		}
	}
	sp := r.onceSpec(cfg, dir, uid, gid)
	if err := writeJSON(filepath.Join(dir, "config.json"), sp); err != nil {
		return -1, err
	}
	logPath := filepath.Join(dir, "runsc.log")
	args := append(r.globalFlags(), "--log="+logPath, "run", "--bundle="+dir, cfg.ID)
	cmd := exec.Command(r.runsc, args...)
	out := cfg.Output
	if out == nil {
		out = io.Discard
	}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return -1, fmt.Errorf("gvisor: run %s: %w", cfg.ID, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		kctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), killTimeout)
		r.runscCmd(kctx, "kill", cfg.ID, "KILL")
		cancel()
		select {
		case <-done:
		case <-time.After(killTimeout):
			cmd.Process.Kill()
			<-done
		}
		return -1, ctx.Err()
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		// runsc run exits with the container's status; a failure of its
		// own leaves an error in its log.
		if msg := lastError(logPath); msg != "" && strings.Contains(msg, "error") {
			r.log.Debug("runsc run", "run", cfg.ID, "log", msg)
		}
		return ee.ExitCode(), nil
	}
	if err != nil {
		return -1, &RunscError{Args: []string{"run", cfg.ID}, Output: lastError(logPath), Err: err}
	}
	return 0, nil
}

// onceSpec is the OCI spec of a RunOnce sandbox.
func (r *Runtime) onceSpec(cfg OnceConfig, dir string, uid, gid uint32) *specs.Spec {
	sb := r.spec(runtimeConfigOf(cfg), dir)
	sb.Root = &specs.Root{Path: cfg.RootFS}
	sb.Hostname = "build"
	sb.Process.Args = cfg.Args
	sb.Process.Env = append([]string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}, cfg.Env...)
	sb.Process.Cwd = cfg.Cwd
	if sb.Process.Cwd == "" {
		sb.Process.Cwd = "/"
	}
	sb.Process.User = specs.User{UID: uid, GID: gid}
	// No envd, no /tmp bound from an overlay: the image's own /tmp.
	var mounts []specs.Mount
	for _, m := range sb.Mounts {
		if m.Destination == EnvdPath || m.Destination == "/tmp" {
			continue
		}
		mounts = append(mounts, m)
	}
	sb.Mounts = mounts
	return sb
}

// runtimeConfigOf is the part of a sandbox's configuration a run shares.
func runtimeConfigOf(cfg OnceConfig) runtime.Config {
	return runtime.Config{ID: cfg.ID, CPUCount: cfg.CPUCount, MemoryMB: cfg.MemoryMB,
		Network: cfg.Network, GatewayDNS: cfg.GatewayDNS}
}

// lookupUser resolves a user name or uid[:gid] with the image's own
// /etc/passwd and /etc/group, read through the root so that a symbolic
// link in the image cannot point the host at its own files.
func lookupUser(root, user string) (uid, gid uint32, err error) {
	if user == "" {
		return 0, 0, nil
	}
	name, group, _ := strings.Cut(user, ":")
	uid, gid, err = resolveID(root, "/etc/passwd", name, true)
	if err != nil {
		return 0, 0, err
	}
	if group != "" {
		if gid, _, err = resolveID(root, "/etc/group", group, false); err != nil {
			return 0, 0, err
		}
	}
	return uid, gid, nil
}

// resolveID finds name (or a number) in an /etc/passwd or /etc/group of
// root: the id, and for passwd the primary group.
func resolveID(root, file, name string, passwd bool) (id, group uint32, err error) {
	if n, err := strconv.ParseUint(name, 10, 32); err == nil {
		id = uint32(n)
		if !passwd {
			return id, 0, nil
		}
		group = id
	}
	rootFD, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(rootFD)
	fd, err := unix.Openat2(rootFD, strings.TrimPrefix(file, "/"), &unix.OpenHow{
		Flags: unix.O_RDONLY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS})
	if err != nil {
		if _, numeric := strconv.ParseUint(name, 10, 32); numeric == nil {
			return id, group, nil
		}
		return 0, 0, fmt.Errorf("no %s in the image: %w", file, err)
	}
	f := os.NewFile(uintptr(fd), file)
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 16<<20))
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 3 {
			continue
		}
		if fields[0] != name && fields[2] != name {
			continue
		}
		n, err := strconv.ParseUint(fields[2], 10, 32)
		if err != nil {
			continue
		}
		id = uint32(n)
		if passwd && len(fields) > 3 {
			if g, err := strconv.ParseUint(fields[3], 10, 32); err == nil {
				group = uint32(g)
			}
		}
		return id, group, nil
	}
	if _, numeric := strconv.ParseUint(name, 10, 32); numeric == nil {
		return id, group, nil
	}
	return 0, 0, fmt.Errorf("no %q in the image's %s", name, file)
}
