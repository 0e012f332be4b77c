package gvisor

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/cubicle-dev/cubicle/runtime"
)

// EnvdPath is where the envd binary appears inside every sandbox.
const EnvdPath = "/.cubicle/envd"

const (
	// pidsLimit caps the tasks of one sandbox (its processes and threads,
	// and the sentry's and gofer's own threads, which share the cgroup).
	pidsLimit = 4096
	// cpuPeriod is the CFS period, in µs, that CPUCount is a quota of.
	cpuPeriod = 100_000
	// nofile is the open-file limit of envd and what it starts; gVisor
	// keeps file descriptors in the sentry, so a high limit costs the host
	// nothing per descriptor.
	nofile = 1 << 20
)

// capabilities are the capabilities of envd (root inside the sandbox):
// Docker's default set plus what root needs for the things users do with
// sudo in a sandbox (mount, ptrace, network admin, nice). They are checked
// by the sentry, which is the security boundary, and never reach the host
// kernel; capabilities that only matter to a real kernel (modules, raw I/O,
// clock, boot, BPF) are left out.
var capabilities = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
	"CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
	"CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN",
	"CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
	"CAP_AUDIT_WRITE", "CAP_SETFCAP",
}

// shmSizeKiB is the size of a sandbox's /dev/shm: half its memory, which is
// what Linux gives a tmpfs by default (and so what /dev/shm is in an E2B
// sandbox, a VM of that memory). A tmpfs under gVisor lives in the
// sentry's memory, charged to the sandbox's memory cgroup; without a size
// it advertises the host's memory, and filling it gets the whole sandbox
// OOM-killed instead of a write failing with ENOSPC. Docker's 64 MiB is
// famously too small for browsers and data loaders.
func shmSizeKiB(memoryMB int) int {
	return max(memoryMB, 1) << 10 / 2
}

// spec builds the OCI runtime spec of a sandbox whose bundle is dir.
func (r *Runtime) spec(cfg runtime.Config, dir string) *specs.Spec {
	memLimit := int64(cfg.MemoryMB) << 20
	cpuQuota := int64(cfg.CPUCount) * cpuPeriod
	period := uint64(cpuPeriod)
	caps := append([]string(nil), capabilities...)
	sp := &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			User: specs.User{UID: 0, GID: 0},
			Args: append([]string{EnvdPath}, cfg.EnvdArgs...),
			Env: []string{
				"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
				"HOME=/root",
			},
			Cwd: "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps, Effective: caps, Permitted: caps,
			},
			Rlimits: []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: nofile, Soft: nofile}},
		},
		Root:     &specs.Root{Path: filepath.Join(dir, "rootfs")},
		Hostname: cfg.ID,
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			// A devpts of its own gives the sandbox /dev/ptmx and /dev/pts/N
			// for the PTYs of envd's process API.
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "nodev", "mode=1777", fmt.Sprintf("size=%dk", shmSizeKiB(cfg.MemoryMB))}},
			// /tmp lives on the sandbox's disk, as in E2B sandboxes, so what
			// users write there counts as disk, not memory. runsc mounts a
			// tmpfs over an empty /tmp that the spec does not mount itself;
			// binding the overlay's own /tmp onto itself keeps it on disk.
			{Destination: "/tmp", Type: "bind", Source: filepath.Join(dir, "rootfs", "tmp"), Options: []string{"rbind", "rw", "nosuid", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			// The mount point is created in the overlay's upper layer, never
			// in the template.
			{Destination: EnvdPath, Type: "bind", Source: cfg.Envd, Options: []string{"rbind", "ro", "nosuid", "nodev"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: r.cgroupPath(cfg.ID),
			Resources: &specs.LinuxResources{
				CPU:    &specs.LinuxCPU{Quota: &cpuQuota, Period: &period},
				Memory: &specs.LinuxMemory{Limit: &memLimit},
				Pids:   &specs.LinuxPids{Limit: pidsLimit},
			},
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace},
				{Type: specs.MountNamespace},
				{Type: specs.NetworkNamespace, Path: cfg.Network.Netns},
			},
		},
	}
	if cfg.GatewayDNS {
		// The only resolver the policy lets through is cubicle's, on the
		// sandbox's gateway (written by writeResolvConf). Read-only: a
		// sandbox that points elsewhere would only find port 53 closed.
		sp.Mounts = append(sp.Mounts, specs.Mount{Destination: "/etc/resolv.conf", Type: "bind",
			Source: filepath.Join(dir, resolvConf), Options: []string{"rbind", "ro", "nosuid", "nodev", "noexec"}})
	}
	sp.Mounts = append(sp.Mounts, volumeMounts(cfg.Volumes)...) // volumes.go
	return sp
}

// writeJSON writes v to path atomically, so that a crash never leaves a
// half-written file for a later Runtime to trip over.
func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	return nil
}

// resolvConf is the bundle's resolver configuration, bound over the
// sandbox's /etc/resolv.conf.
const resolvConf = "resolv.conf"

// writeResolvConf points the sandbox at the resolver on its gateway.
// Lookups are answered locally, so short timeouts cost nothing; AAAA
// queries are answered empty at once (sandboxes have no IPv6).
func writeResolvConf(dir string, gateway netip.Addr) error {
	body := fmt.Sprintf("# cubicle: the sandbox's resolver enforces its network.allowOut domains\nnameserver %s\noptions timeout:2 attempts:2\n", gateway)
	return os.WriteFile(filepath.Join(dir, resolvConf), []byte(body), 0o644)
}
