package gvisor

import (
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"
)

// The development machines' hybrid layout: v1 controllers, a named
// systemd hierarchy, and a cgroup2 mount without controllers.
const hybridMountinfo = `22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /sys/fs/cgroup rw,relatime shared:6 - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:7 - cgroup cgroup rw,cpu
32 30 0:28 / /sys/fs/cgroup/cpuacct rw,relatime shared:8 - cgroup cgroup rw,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids
35 30 0:31 / /sys/fs/cgroup/systemd rw,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
36 30 0:32 / /sys/fs/cgroup/unified rw,relatime shared:12 - cgroup2 cgroup2 rw
37 22 0:29 /sub /mnt/memsub rw,relatime - cgroup cgroup rw,memory
`

// A distribution's combined cpu,cpuacct hierarchy.
const combinedMountinfo = `31 30 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
`

const unifiedMountinfo = `30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
`

func TestParseMountinfo(t *testing.T) {
	h := parseMountinfo(hybridMountinfo)
	if h.v2() {
		t.Fatal("hybrid layout read as cgroup v2")
	}
	for ctrl, want := range map[string]string{
		"cpu": "/sys/fs/cgroup/cpu", "cpuacct": "/sys/fs/cgroup/cpuacct",
		"memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids",
	} {
		if got := h.v1[ctrl]; got != want {
			t.Errorf("v1[%s] = %q, want %q", ctrl, got, want)
		}
	}
	dirs := h.dirs("/cubicle/x")
	sort.Strings(dirs)
	want := []string{"/sys/fs/cgroup/cpu/cubicle/x", "/sys/fs/cgroup/cpuacct/cubicle/x", "/sys/fs/cgroup/memory/cubicle/x",
		"/sys/fs/cgroup/pids/cubicle/x", "/sys/fs/cgroup/systemd/cubicle/x"}
	if len(dirs) != len(want) {
		t.Fatalf("dirs = %v, want %v (named hierarchies included, sub-mounts not)", dirs, want)
	}
	for i := range want {
		if dirs[i] != want[i] {
			t.Fatalf("dirs = %v, want %v", dirs, want)
		}
	}

	c := parseMountinfo(combinedMountinfo)
	if c.v1["cpu"] != c.v1["cpuacct"] || len(c.dirs("/x")) != 2 {
		t.Fatalf("combined cpu,cpuacct: %+v", c)
	}

	u := parseMountinfo(unifiedMountinfo)
	if !u.v2() || u.unified != "/sys/fs/cgroup" {
		t.Fatalf("unified layout: %+v", u)
	}
	if d, _ := u.dir("memory", "/cubicle/x"); d != "/sys/fs/cgroup/cubicle/x" {
		t.Fatalf("v2 dir = %s", d)
	}
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCgroupStats(t *testing.T) {
	root := t.TempDir()
	v1 := cgroupLayout{v1: map[string]string{
		"cpuacct": filepath.Join(root, "cpuacct"),
		"memory":  filepath.Join(root, "memory"),
	}}
	writeFiles(t, filepath.Join(root, "cpuacct/sb"), map[string]string{"cpuacct.usage": "1500000000\n"})
	writeFiles(t, filepath.Join(root, "memory/sb"), map[string]string{
		"memory.usage_in_bytes": "300000000\n",
		"memory.limit_in_bytes": "536870912\n",
		// 200 MB of cache of which 150 MB is the sentry's memfd.
		"memory.stat": "cache 1\nshmem 1\ntotal_cache 200000000\ntotal_rss 100000000\ntotal_shmem 150000000\n",
	})
	s, err := v1.stats("/sb")
	if err != nil {
		t.Fatal(err)
	}
	if s.CPUUsage != 1500*time.Millisecond || s.MemCache != 50_000_000 || s.MemUsed != 250_000_000 || s.MemLimit != 512<<20 {
		t.Fatalf("v1 stats = %+v", s)
	}

	v2 := cgroupLayout{unified: filepath.Join(root, "unified")}
	writeFiles(t, filepath.Join(root, "unified/sb"), map[string]string{
		"cpu.stat":       "usage_usec 2500\nuser_usec 2000\n",
		"memory.current": "1000\n",
		"memory.max":     "max\n",
		"memory.stat":    "anon 400\nfile 700\nshmem 300\n",
	})
	s, err = v2.stats("/sb")
	if err != nil {
		t.Fatal(err)
	}
	if s.CPUUsage != 2500*time.Microsecond || s.MemCache != 400 || s.MemUsed != 600 || s.MemLimit != ^uint64(0) {
		t.Fatalf("v2 stats = %+v", s)
	}

	if _, err := v1.stats("/missing"); !os.IsNotExist(err) {
		t.Fatalf("stats of a missing cgroup: %v, want not-exist", err)
	}
}

func TestLastError(t *testing.T) {
	p := filepath.Join(t.TempDir(), "runsc.log")
	os.WriteFile(p, []byte(`{"msg":"first","level":"error"}`+"\n"+`{"msg":"creating container: boom","level":"error"}`+"\n"), 0o644)
	if got := lastError(p); got != "creating container: boom" {
		t.Fatalf("lastError = %q", got)
	}
	os.WriteFile(p, []byte("not json\n"), 0o644)
	if got := lastError(p); got != "not json\n" {
		t.Fatalf("lastError on text = %q", got)
	}
}
