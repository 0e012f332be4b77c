package gvisor

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/runtime"
)

// runsc itself creates each sandbox's cgroups (from the spec's cgroupsPath)
// and writes the limits; this file finds them again to read figures and to
// remove what a crashed runsc left. Hosts come in two layouts:
//
//   - cgroup v1 (including the hybrid layout of the development machines,
//     where memory, cpu, cpuacct, pids ... are v1 hierarchies and the
//     cgroup2 mount has no controllers): one directory per controller,
//     <mount of controller>/<cgroupsPath>. runsc uses v1 here.
//   - cgroup v2 (unified): one directory, <cgroup2 mount>/<cgroupsPath>.

// cgroupLayout is where the host's cgroup hierarchies are mounted.
type cgroupLayout struct {
	// v1 maps a v1 controller (memory, cpuacct, ...) to its mount point.
	v1 map[string]string
	// hierarchies are the mount points of all v1 hierarchies, named ones
	// without controllers (name=systemd) included: runsc makes the
	// sandbox's cgroup in each of them.
	hierarchies []string
	// unified is the cgroup2 mount point ("" if none).
	unified string
}

// v2 reports whether runsc will use cgroup v2: only when no v1 memory
// controller exists, as in the hybrid layout v1 wins.
func (l cgroupLayout) v2() bool { return l.v1["memory"] == "" && l.unified != "" }

// parseMountinfo reads the cgroup mounts out of /proc/self/mountinfo.
func parseMountinfo(data string) cgroupLayout {
	l := cgroupLayout{v1: make(map[string]string)}
	for _, line := range strings.Split(data, "\n") {
		// "36 35 98:0 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory"
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 || f[3] != "/" {
			continue // a bind mount of a sub-hierarchy is not a hierarchy root
		}
		switch g[0] {
		case "cgroup2":
			if l.unified == "" {
				l.unified = f[4]
			}
		case "cgroup":
			if !contains(l.hierarchies, f[4]) {
				l.hierarchies = append(l.hierarchies, f[4])
			}
			for _, opt := range strings.Split(g[2], ",") {
				switch opt {
				case "rw", "ro", "relatime", "noexec", "nosuid", "nodev", "clone_children", "xattr":
				default:
					if !strings.Contains(opt, "=") && l.v1[opt] == "" {
						l.v1[opt] = f[4]
					}
				}
			}
		}
	}
	return l
}

func hostCgroups() (cgroupLayout, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return cgroupLayout{}, fmt.Errorf("gvisor: read mountinfo: %w", err)
	}
	return parseMountinfo(string(b)), nil
}

// cgroupPath is the cgroupsPath of sandbox id in its OCI spec.
func (r *Runtime) cgroupPath(id string) string {
	return filepath.Join(r.cgroupParent, id)
}

// dirs are the sandbox's cgroup directories, one per hierarchy.
func (l cgroupLayout) dirs(path string) []string {
	if l.v2() {
		return []string{filepath.Join(l.unified, path)}
	}
	out := make([]string, 0, len(l.hierarchies))
	for _, mnt := range l.hierarchies {
		out = append(out, filepath.Join(mnt, path))
	}
	return out
}

// dir is the directory of controller ctrl for cgroup path; under v2 all
// controllers share one.
func (l cgroupLayout) dir(ctrl, path string) (string, error) {
	if l.v2() {
		return filepath.Join(l.unified, path), nil
	}
	mnt, ok := l.v1[ctrl]
	if !ok {
		return "", fmt.Errorf("gvisor: no cgroup v1 %s controller mounted", ctrl)
	}
	return filepath.Join(mnt, path), nil
}

// cgroupStats reads the CPU and memory figures of cgroup path.
func (l cgroupLayout) stats(path string) (runtime.Stats, error) {
	var s runtime.Stats
	if l.v2() {
		dir := filepath.Join(l.unified, path)
		cpu, err := readKeyed(filepath.Join(dir, "cpu.stat"), "usage_usec")
		if err != nil {
			return s, err
		}
		s.CPUUsage = time.Duration(cpu) * time.Microsecond
		if s.MemUsed, err = readUint(filepath.Join(dir, "memory.current")); err != nil {
			return s, err
		}
		if s.MemCache, err = pageCache(filepath.Join(dir, "memory.stat"), "file", "shmem"); err != nil {
			return s, err
		}
		if s.MemLimit, err = readUint(filepath.Join(dir, "memory.max")); err != nil {
			return s, err
		}
	} else {
		cpuDir, err := l.dir("cpuacct", path)
		if err != nil {
			return s, err
		}
		memDir, err := l.dir("memory", path)
		if err != nil {
			return s, err
		}
		cpu, err := readUint(filepath.Join(cpuDir, "cpuacct.usage"))
		if err != nil {
			return s, err
		}
		s.CPUUsage = time.Duration(cpu) // nanoseconds
		if s.MemUsed, err = readUint(filepath.Join(memDir, "memory.usage_in_bytes")); err != nil {
			return s, err
		}
		// The total_ figures count child cgroups too, as usage_in_bytes
		// does; runsc makes none, but they are the matching figures.
		if s.MemCache, err = pageCache(filepath.Join(memDir, "memory.stat"), "total_cache", "total_shmem"); err != nil {
			return s, err
		}
		if s.MemLimit, err = readUint(filepath.Join(memDir, "memory.limit_in_bytes")); err != nil {
			return s, err
		}
	}
	// Page cache can be dropped under pressure: it is not memory the
	// sandbox's processes hold.
	if s.MemCache > s.MemUsed {
		s.MemCache = s.MemUsed
	}
	s.MemUsed -= s.MemCache
	return s, nil
}

// pageCache reads the reclaimable page cache from a memory.stat file: the
// cache figure less shared memory. The subtraction matters under gVisor:
// the sentry keeps all of the sandbox's application memory in a memfd,
// which the kernel counts as shmem and therefore as cache; taken as cache,
// a sandbox using 64 MiB would report almost nothing used.
func pageCache(path, cacheKey, shmemKey string) (uint64, error) {
	cache, err := readKeyed(path, cacheKey)
	if err != nil {
		return 0, err
	}
	shmem, err := readKeyed(path, shmemKey)
	if err != nil {
		return 0, err
	}
	if shmem > cache {
		return 0, nil
	}
	return cache - shmem, nil
}

// procs lists the host PIDs in cgroup path (runsc's sandbox and gofer).
func (l cgroupLayout) procs(path string) ([]int, error) {
	dir, err := l.dir("pids", path)
	if err != nil {
		if dir, err = l.dir("memory", path); err != nil {
			return nil, err
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// remove kills whatever is left in cgroup path and removes its
// directories. It is what Kill falls back on when runsc could not clean up.
func (l cgroupLayout) remove(path string) error {
	var errs []error
	for i := 0; i < 50; i++ {
		pids, err := l.procs(path)
		if err != nil || len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, dir := range l.dirs(path) {
		// A cgroup directory is removed with rmdir(2) even though it
		// holds files; they are not real files.
		var err error
		for i := 0; i < 50; i++ {
			if err = unix.Rmdir(dir); err == nil || errors.Is(err, unix.ENOENT) {
				err = nil
				break
			}
			if !errors.Is(err, unix.EBUSY) {
				break
			}
			time.Sleep(10 * time.Millisecond) // tasks still exiting
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// readUint reads a file holding one number; "max" (v2, no limit) reads as
// the largest uint64.
func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return ^uint64(0), nil
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse %s: %w", path, err)
	}
	return n, nil
}

// readKeyed reads the value of key in a "key value" per line file such as
// memory.stat or cpu.stat.
func readKeyed(path, key string) (uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if ok && k == key {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("parse %s in %s: %w", key, path, err)
			}
			return n, nil
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no %s in %s", key, path)
}
