//go:build linux && amd64

// Package hostcheck finds out what this host can do for cubicle — KVM,
// eBPF, cgroups, loop devices, vsock, tun/tap, runsc, user namespaces —
// and, from that, which isolation backend `cubicle serve --isolation
// auto` uses (Backend). `cubicle doctor` prints its Report. It reads and
// tries; nothing it makes outlives the probe.
package hostcheck

import (
	"bufio"
	"debug/buildinfo"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/runtime/gvisor"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/linux"
)

// The backends Backend chooses between (the names `cubicle serve
// --isolation` takes).
const (
	MicroVM = "microvm"
	GVisor  = "gvisor"
)

// Status is an item's verdict.
type Status int

const (
	// OK: what cubicle uses it for works.
	OK Status = iota
	// Limited: present, with a limit the reason names (a PVM /dev/kvm, a
	// runsc of another version, no loop devices).
	Limited
	// Missing: absent or unusable.
	Missing
)

func (s Status) String() string {
	switch s {
	case OK:
		return "ok"
	case Limited:
		return "limited"
	default:
		return "missing"
	}
}

// Item is one thing the host can or cannot do.
type Item struct {
	Name   string // "kvm", "bpf", ...
	Status Status
	// Detail is one line: what was found and why it matters.
	Detail string
}

// Options are what serve is given that the checks depend on.
type Options struct {
	// Runsc is serve's --runsc ("" for $CUBICLE_RUNSC, the pinned build
	// under CacheDir, then $PATH: gvisor.FindRunsc).
	Runsc string
	// CacheDir is serve's --cache-dir ("" for the default).
	CacheDir string
}

// Report is every item and the backend serve would pick.
type Report struct {
	Items []Item
	// Backend is MicroVM, GVisor, or "" when neither can run here.
	Backend string
	// Reason says why Backend was picked (or why none could be).
	Reason string
}

// Item returns the item called name.
func (r Report) Item(name string) (Item, bool) {
	i := slices.IndexFunc(r.Items, func(it Item) bool { return it.Name == name })
	if i < 0 {
		return Item{}, false
	}
	return r.Items[i], true
}

// Backend is the isolation backend `cubicle serve --isolation auto` uses
// on this host, and why: GVisor where runsc is (saying whether microVMs
// could run: where /dev/kvm has hardware virtualization, a Linux guest
// boots on it, and the rest a microVM needs is there), else MicroVM where
// one can run; "" when neither can. microVMs become auto's first choice
// once that backend passes the E2B end-to-end suite.
func Backend(o Options) (name, reason string) {
	r := Check(o)
	return r.Backend, r.Reason
}

// Check probes the host.
func Check(o Options) Report {
	kvmKind, kvmItem := checkKVM()
	bpf := checkBPF()
	cg, jailerCgroups := checkCgroups()
	tun := checkTun()
	runsc := checkRunsc(o)
	r := Report{Items: []Item{kvmItem, bpf, cg, checkLoop(), checkVsock(), tun, runsc, checkUserns()}}

	// Both backends confine egress with eBPF and limit sandboxes with
	// cgroups.
	var common []string
	for _, it := range []Item{bpf, cg} {
		if it.Status == Missing {
			common = append(common, it.Name+": "+it.Detail)
		}
	}
	var noVM []string
	if kvmKind != KVMReal {
		noVM = append(noVM, kvmItem.Detail)
	}
	if tun.Status == Missing {
		noVM = append(noVM, tun.Detail)
	}
	if jailerCgroups != "" {
		noVM = append(noVM, jailerCgroups)
	}
	var noGVisor []string
	if runsc.Status == Missing {
		noGVisor = append(noGVisor, runsc.Detail)
	}
	switch {
	case len(common) > 0:
		r.Reason = "neither backend can run: " + strings.Join(common, "; ")
	case len(noVM) == 0 && len(noGVisor) == 0:
		// Until the microVM backend passes the E2B end-to-end suite, auto
		// keeps gVisor where both can run (cmd/cubicle: chooseIsolation).
		r.Backend = GVisor
		r.Reason = "sandboxes run under gVisor; microVMs can run here too (" + kvmItem.Detail +
			"): --isolation microvm, not yet auto's choice"
	case len(noVM) == 0:
		r.Backend = MicroVM
		r.Reason = "sandboxes are KVM microVMs: " + kvmItem.Detail
	case len(noGVisor) == 0:
		r.Backend = GVisor
		r.Reason = "sandboxes run under gVisor, as no microVM can run here: " + strings.Join(noVM, "; ")
	default:
		r.Reason = "neither backend can run: microvm: " + strings.Join(noVM, "; ") +
			"; gvisor: " + strings.Join(noGVisor, "; ")
	}
	return r
}

// KVMKind is what /dev/kvm offers.
type KVMKind string

const (
	// KVMReal is KVM with hardware virtualization (VT-x or AMD-V): Linux
	// guests boot.
	KVMReal KVMKind = "real"
	// KVMPVM is PVM, KVM without VT-x/AMD-V (guest kernel code runs in an
	// emulator): the freestanding test guest runs, Linux does not.
	KVMPVM KVMKind = "pvm"
	// KVMNone is no usable /dev/kvm.
	KVMNone KVMKind = "none"
)

// KVM says what this host's /dev/kvm is and why.
func KVM() (KVMKind, string) {
	k, it := checkKVM()
	return k, it.Detail
}

func checkKVM() (KVMKind, Item) {
	it := Item{Name: "kvm", Status: Missing}
	sys, err := kvm.Open()
	if err != nil {
		var errno syscall.Errno
		switch {
		case errors.Is(err, kvm.ErrNoKVM):
			it.Detail = "none: no " + kvm.DevicePath + " (no hardware virtualization, or the kvm module is not loaded)"
		case errors.As(err, &errno) && errno == unix.ENODEV:
			it.Detail = "none: " + kvm.DevicePath + " has no driver behind it (ENODEV: the kvm module is not loaded, or this kernel is itself a PVM guest)"
		default:
			it.Detail = fmt.Sprintf("none: %v", err)
		}
		return KVMNone, it
	}
	pvm := sys.PVM()
	sys.Close()
	if pvm {
		it.Status = Limited
		it.Detail = "PVM: " + kvm.DevicePath + " works without VT-x/AMD-V (CPUID 0x40000002 EBX says PVM): the VMM runs, but a Linux guest cannot boot"
		return KVMPVM, it
	}
	if ok, why := linux.CanBoot(); !ok {
		it.Status = Limited
		it.Detail = "no hardware virtualization: " + why
		return KVMNone, it
	}
	it.Status = OK
	it.Detail = "real (" + virtFlag() + "): Linux guests boot on " + kvm.DevicePath
	return KVMReal, it
}

// virtFlag names the hardware virtualization /proc/cpuinfo shows.
func virtFlag() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "flags" {
			f := strings.Fields(v)
			switch {
			case slices.Contains(f, "svm"):
				return "AMD-V"
			case slices.Contains(f, "vmx"):
				return "VT-x"
			}
		}
	}
	return "VT-x/AMD-V"
}

// bpfFS is where serve pins its eBPF maps (network/policy's pin root is
// below it); bpfFSMagic is BPF_FS_MAGIC from <linux/magic.h>.
const (
	bpfFS      = "/sys/fs/bpf"
	bpfFSMagic = 0xcafe4a11
)

// checkBPF loads a TC (sched_cls) program, the kind network/policy
// attaches to every sandbox device, and pins it under /sys/fs/bpf.
func checkBPF() Item {
	it := Item{Name: "bpf", Status: Missing}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "cubicle_doctor",
		Type: ebpf.SchedCLS,
		Instructions: asm.Instructions{
			asm.Mov.Imm(asm.R0, 0), // TC_ACT_OK
			asm.Return(),
		},
		License: "Apache-2.0",
	})
	if err != nil {
		it.Detail = fmt.Sprintf("cannot load a TC (sched_cls) program, as egress enforcement needs: %v", err)
		return it
	}
	defer prog.Close()
	var st unix.Statfs_t
	if err := unix.Statfs(bpfFS, &st); err != nil || st.Type != bpfFSMagic {
		it.Status = OK
		it.Detail = "loads a TC (sched_cls) program; " + bpfFS + " is not a bpf file system yet: serve mounts it at start"
		return it
	}
	// bpffs refuses names with a dot.
	pin := filepath.Join(bpfFS, fmt.Sprintf("cubicle_doctor_%d", os.Getpid()))
	if err := prog.Pin(pin); err != nil {
		it.Detail = fmt.Sprintf("loads a TC (sched_cls) program but cannot pin under %s, as serve does to keep policies across restarts: %v", bpfFS, err)
		return it
	}
	if err := prog.Unpin(); err != nil {
		it.Detail = fmt.Sprintf("pinned %s but cannot remove it: %v", pin, err)
		return it
	}
	it.Status = OK
	it.Detail = "loads a TC (sched_cls) program and pins under " + bpfFS
	return it
}

// checkCgroups reads the cgroup mounts: runsc limits each gVisor sandbox
// with the cpu, memory and pids controllers (v1 hierarchies or cgroup v2),
// and the microVM jailer (vmm/jailer) puts each VMM process in v1 memory
// and pids hierarchies at /sys/fs/cgroup/{memory,pids}. jailer is why a
// microVM cannot be jailed here, or "".
func checkCgroups() (it Item, jailer string) {
	it = Item{Name: "cgroups", Status: Missing}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		it.Detail = fmt.Sprintf("cannot read the mounts: %v", err)
		return it, it.Detail
	}
	v1, unified := cgroupMounts(string(b))
	want := []string{"cpu", "memory", "pids"}
	var have, lack []string
	layout := "v1"
	if v1["memory"] == "" && unified != "" {
		layout = "v2"
		c, err := os.ReadFile(filepath.Join(unified, "cgroup.controllers"))
		if err != nil {
			it.Detail = fmt.Sprintf("cgroup v2 at %s: %v", unified, err)
			return it, it.Detail
		}
		have = strings.Fields(string(c))
	} else {
		for c := range v1 {
			have = append(have, c)
		}
		if unified != "" {
			layout = "v1 (hybrid: cgroup2 at " + unified + " too)"
		}
	}
	slices.Sort(have)
	for _, c := range want {
		if !slices.Contains(have, c) {
			lack = append(lack, c)
		}
	}
	if len(have) == 0 && layout == "v1" {
		it.Detail = "no cgroup hierarchy is mounted"
		return it, it.Detail
	}
	it.Detail = fmt.Sprintf("%s, controllers: %s", layout, strings.Join(have, " "))
	if len(lack) > 0 {
		it.Detail += "; lacks " + strings.Join(lack, ", ") + " (sandbox limits need cpu, memory and pids)"
		return it, it.Detail
	}
	it.Status = OK
	for _, c := range []string{"memory", "pids"} {
		if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", c, "cgroup.procs")); err != nil {
			jailer = "the microVM jailer (vmm/jailer) needs cgroup v1 memory and pids hierarchies at /sys/fs/cgroup/{memory,pids}"
			it.Status = Limited
			it.Detail += "; " + jailer
			break
		}
	}
	return it, jailer
}

// cgroupMounts maps each v1 controller to its hierarchy's mount point
// and returns the cgroup2 mount ("" if none), from mountinfo's text.
func cgroupMounts(mountinfo string) (v1 map[string]string, unified string) {
	v1 = make(map[string]string)
	sc := bufio.NewScanner(strings.NewReader(mountinfo))
	for sc.Scan() {
		// "36 35 98:0 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory"
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 || f[3] != "/" {
			continue
		}
		switch g[0] {
		case "cgroup2":
			if unified == "" {
				unified = f[4]
			}
		case "cgroup":
			for _, opt := range strings.Split(g[2], ",") {
				switch opt {
				case "rw", "ro", "relatime", "noexec", "nosuid", "nodev", "clone_children", "xattr":
				default:
					if !strings.Contains(opt, "=") && v1[opt] == "" {
						v1[opt] = f[4]
					}
				}
			}
		}
	}
	return v1, unified
}

// checkLoop: gVisor sandboxes' disks are ext4 images on loop devices,
// which is what makes their size limits hold.
func checkLoop() Item {
	f, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return Item{Name: "loop", Status: Limited,
			Detail: fmt.Sprintf("no loop devices (%v): gVisor sandboxes run without disk size limits", err)}
	}
	f.Close()
	return Item{Name: "loop", Status: OK, Detail: "/dev/loop-control: gVisor sandboxes' disks have their size limits"}
}

// checkVsock: nothing to check, and the line says why.
func checkVsock() Item {
	return Item{Name: "vsock", Status: OK,
		Detail: "nothing needed on the host: the VMM's virtio-vsock is userspace (a Unix socket per VM), no vhost_vsock"}
}

// checkTun: each microVM's network is a tap device.
func checkTun() Item {
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return Item{Name: "tun", Status: Missing, Detail: fmt.Sprintf("no tap devices for microVMs: /dev/net/tun: %v", err)}
	}
	f.Close()
	return Item{Name: "tun", Status: OK, Detail: "/dev/net/tun: tap devices for microVMs"}
}

// checkRunsc finds runsc as serve does and compares the gVisor version it
// was built from with the pinned one (runtime/gvisor/runsc.version).
func checkRunsc(o Options) Item {
	it := Item{Name: "runsc", Status: Missing}
	p, err := gvisor.FindRunsc(o.Runsc, o.CacheDir)
	if err != nil {
		it.Detail = strings.TrimPrefix(err.Error(), "gvisor: ")
		return it
	}
	bi, err := buildinfo.ReadFile(p)
	if err != nil {
		it.Status = Limited
		it.Detail = fmt.Sprintf("%s: cannot read the gVisor version it was built from (%v); cubicle is tested with %s", p, err, gvisor.RunscVersion)
		return it
	}
	v := bi.Main.Version
	if bi.Main.Path != "gvisor.dev/gvisor" || v != gvisor.RunscVersion {
		it.Status = Limited
		it.Detail = fmt.Sprintf("%s is %s %s, not the pinned %s (scripts/deps.sh builds that one): serve runs it, untested",
			p, bi.Main.Path, v, gvisor.RunscVersion)
		return it
	}
	it.Status = OK
	it.Detail = fmt.Sprintf("%s, gVisor %s (the pinned version)", p, v)
	return it
}

// checkUserns tries to start a process in a new user namespace. Neither
// backend needs one today, which the line says: runsc starts sandboxes in
// the host's user namespace (its default, directfs), and the jailer uses
// mount, pid, network, IPC and UTS namespaces.
func checkUserns() Item {
	const needed = "; neither backend needs them (runsc with directfs and the microVM jailer use the host's user namespace)"
	it := Item{Name: "userns", Status: Limited}
	max := "?"
	if b, err := os.ReadFile("/proc/sys/user/max_user_namespaces"); err == nil {
		max = strings.TrimSpace(string(b))
	}
	tr, err := exec.LookPath("true")
	if err != nil {
		if n, err := strconv.Atoi(max); err == nil && n > 0 {
			it.Status = OK
		}
		it.Detail = "user.max_user_namespaces=" + max + needed
		return it
	}
	cmd := exec.Command(tr)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWUSER}
	if err := cmd.Run(); err != nil {
		it.Detail = fmt.Sprintf("cannot make one (%v; user.max_user_namespaces=%s)%s", err, max, needed)
		return it
	}
	it.Status = OK
	it.Detail = "can be made (user.max_user_namespaces=" + max + ")" + needed
	return it
}
