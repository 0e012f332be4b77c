//go:build linux && amd64

package jailer

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// cgroupRoot is where the cgroup hierarchies are mounted (one directory
// per v1 controller, "unified" for the cgroup2 hierarchy beside them).
const cgroupRoot = "/sys/fs/cgroup"

// ErrCgroup is wrapped by cgroup errors.
var ErrCgroup = errors.New("jailer: cgroup")

// cgroups is one jailed process's cgroup in each hierarchy.
type cgroups struct {
	memory, pids string // the v1 directories
	unified      string // the cgroup2 directory, "" if none
}

// dirs lists the directories made, the v1 memory one first.
func (cg *cgroups) dirs() []string {
	var d []string
	for _, s := range []string{cg.memory, cg.pids, cg.unified} {
		if s != "" {
			d = append(d, s)
		}
	}
	return d
}

// ownCgroup returns the calling process's cgroup path in the hierarchy
// whose /proc/self/cgroup line matches (controller name, or "" for the
// cgroup2 line "0::path").
func ownCgroup(controller string) (string, error) {
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if controller == "" && parts[0] == "0" && parts[1] == "" {
			return parts[2], nil
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == controller && controller != "" {
				return parts[2], nil
			}
		}
	}
	return "", fmt.Errorf("%w: no %q hierarchy in /proc/self/cgroup", ErrCgroup, controller)
}

// newCgroups creates name below this process's own cgroup in the memory
// and pids hierarchies (with the limits) and in the cgroup2 hierarchy
// when mounted.
func newCgroups(name string, memLimit, pidsLimit int64) (_ *cgroups, err error) {
	if name == "" || strings.Contains(name, "..") || strings.HasPrefix(name, "/") {
		return nil, fmt.Errorf("%w: bad name %q", ErrCgroup, name)
	}
	cg := &cgroups{}
	defer func() {
		if err != nil {
			cg.remove()
		}
	}()
	type hierarchy struct {
		mount, controller, limitFile string
		limit                        int64
	}
	for _, h := range []hierarchy{
		{"memory", "memory", "memory.limit_in_bytes", memLimit},
		{"pids", "pids", "pids.max", pidsLimit},
		{"unified", "", "", 0},
	} {
		mount := filepath.Join(cgroupRoot, h.mount)
		if _, err := os.Stat(filepath.Join(mount, "cgroup.procs")); err != nil {
			if h.controller == "" {
				continue // no cgroup2 hierarchy: optional
			}
			return nil, fmt.Errorf("%w: %s hierarchy: %w", ErrCgroup, h.mount, err)
		}
		own, err := ownCgroup(h.controller)
		if err != nil {
			return nil, err
		}
		dir := filepath.Join(mount, own, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCgroup, err)
		}
		switch h.mount {
		case "memory":
			cg.memory = dir
		case "pids":
			cg.pids = dir
		default:
			cg.unified = dir
		}
		if h.limit > 0 {
			if err := os.WriteFile(filepath.Join(dir, h.limitFile), []byte(strconv.FormatInt(h.limit, 10)), 0); err != nil {
				return nil, fmt.Errorf("%w: %s: %w", ErrCgroup, h.limitFile, err)
			}
		}
	}
	return cg, nil
}

// add moves pid (all its threads) into every cgroup.
func (cg *cgroups) add(pid int) error {
	for _, d := range cg.dirs() {
		if err := os.WriteFile(filepath.Join(d, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
			return fmt.Errorf("%w: add %d to %s: %w", ErrCgroup, pid, d, err)
		}
	}
	return nil
}

// procs returns the processes in the first cgroup.
func (cg *cgroups) procs() ([]int, error) {
	dirs := cg.dirs()
	if len(dirs) == 0 {
		return nil, nil
	}
	b, err := os.ReadFile(filepath.Join(dirs[0], "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if p, err := strconv.Atoi(f); err == nil {
			pids = append(pids, p)
		}
	}
	return pids, nil
}

// kill ends every process in the cgroups: cgroup.kill when the cgroup2
// hierarchy is there, SIGKILL to each listed process otherwise.
func (cg *cgroups) kill() error {
	if cg.unified != "" {
		if err := os.WriteFile(filepath.Join(cg.unified, "cgroup.kill"), []byte("1"), 0); err == nil {
			return nil
		}
	}
	pids, err := cg.procs()
	if errors.Is(err, os.ErrNotExist) {
		return nil // removed already: nothing left to kill
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCgroup, err)
	}
	for _, p := range pids {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	return nil
}

// remove deletes the cgroup directories. A cgroup stays busy for a short
// while after its last process was reaped, so rmdir is retried for up to a
// second.
func (cg *cgroups) remove() error {
	var errs []error
	for _, d := range cg.dirs() {
		var err error
		for range 100 {
			if err = os.Remove(d); err == nil || errors.Is(err, os.ErrNotExist) {
				err = nil
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%w: %w", ErrCgroup, err))
		}
	}
	if len(errs) == 0 {
		*cg = cgroups{}
	}
	return errors.Join(errs...)
}

// memoryUsage is the memory cgroup's charge in bytes
// (memory.usage_in_bytes: the process's anonymous memory and the page
// cache it brought in).
func (cg *cgroups) memoryUsage() (uint64, error) {
	if cg.memory == "" {
		return 0, fmt.Errorf("%w: no memory cgroup", ErrCgroup)
	}
	b, err := os.ReadFile(filepath.Join(cg.memory, "memory.usage_in_bytes"))
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrCgroup, err)
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

// oomKills is how many processes the kernel OOM-killed in the memory
// cgroup: "oom_kill" in memory.oom_control (Linux 4.13 and later).
func (cg *cgroups) oomKills() (uint64, error) {
	if cg.memory == "" {
		return 0, fmt.Errorf("%w: no memory cgroup", ErrCgroup)
	}
	b, err := os.ReadFile(filepath.Join(cg.memory, "memory.oom_control"))
	if err != nil {
		return 0, fmt.Errorf("%w: %w", ErrCgroup, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "oom_kill" {
			return strconv.ParseUint(f[1], 10, 64)
		}
	}
	return 0, fmt.Errorf("%w: memory.oom_control has no oom_kill count (Linux before 4.13)", ErrCgroup)
}

// Check says why this host cannot jail a process, or nil: it needs root
// (namespaces, mknod, pivot_root, cgroups) and the cgroup v1 memory and
// pids hierarchies at /sys/fs/cgroup/{memory,pids} with this process's
// cgroup in them writable, where the jails' cgroups are made.
func Check() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: jailing needs root", ErrCgroup)
	}
	for _, c := range []string{"memory", "pids"} {
		mount := filepath.Join(cgroupRoot, c)
		if _, err := os.Stat(filepath.Join(mount, "cgroup.procs")); err != nil {
			return fmt.Errorf("%w: the cgroup v1 %s hierarchy is not mounted at %s (cgroup v2 only hosts are not supported yet)", ErrCgroup, c, mount)
		}
		own, err := ownCgroup(c)
		if err != nil {
			return err
		}
		if err := unix.Access(filepath.Join(mount, own), unix.W_OK); err != nil {
			return fmt.Errorf("%w: cannot make cgroups in %s: %w", ErrCgroup, filepath.Join(mount, own), err)
		}
	}
	return nil
}
