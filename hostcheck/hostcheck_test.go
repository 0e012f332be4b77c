//go:build linux && amd64

package hostcheck

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/linux"
)

// TestCheck: every item is reported with a reason, and the backend agrees
// with the items, whatever this host has.
func TestCheck(t *testing.T) {
	r := Check(Options{})
	want := []string{"kvm", "bpf", "cgroups", "loop", "vsock", "tun", "runsc", "userns"}
	if len(r.Items) != len(want) {
		t.Fatalf("%d items, want %v", len(r.Items), want)
	}
	for i, it := range r.Items {
		t.Logf("%-8s %-8s %s", it.Name, it.Status, it.Detail)
		if it.Name != want[i] || it.Detail == "" {
			t.Errorf("item %d: %+v, want %s with a reason", i, it, want[i])
		}
	}
	t.Logf("backend %q: %s", r.Backend, r.Reason)
	item := func(name string) Item {
		it, ok := r.Item(name)
		if !ok {
			t.Fatalf("no item %s", name)
		}
		return it
	}
	switch r.Backend {
	case MicroVM:
		if item("kvm").Status != OK || item("tun").Status != OK {
			t.Errorf("microvm picked without real KVM and tun")
		}
		if item("runsc").Status != Missing {
			t.Errorf("microvm picked where gVisor, still auto's first choice, can run")
		}
	case GVisor:
		if item("runsc").Status == Missing {
			t.Errorf("gvisor picked without runsc")
		}
		if item("kvm").Status == OK && item("tun").Status == OK && item("cgroups").Status == OK &&
			!strings.Contains(r.Reason, "--isolation microvm") {
			t.Errorf("gvisor picked where a microVM can run, and the reason does not say so: %s", r.Reason)
		}
	case "":
		if !strings.HasPrefix(r.Reason, "neither backend can run") {
			t.Errorf("no backend, reason %q", r.Reason)
		}
	default:
		t.Errorf("backend %q", r.Backend)
	}
	if r.Backend != "" && (item("bpf").Status == Missing || item("cgroups").Status == Missing) {
		t.Errorf("a backend picked without eBPF or cgroups")
	}
	if name, reason := Backend(Options{}); name != r.Backend || reason == "" {
		t.Errorf("Backend() = %q, %q; Check picked %q", name, reason, r.Backend)
	}
}

// TestKVM: the kind agrees with what the VMM itself finds.
func TestKVM(t *testing.T) {
	kind, why := KVM()
	t.Logf("%s: %s", kind, why)
	boots, _ := linux.CanBoot()
	if (kind == KVMReal) != boots {
		t.Errorf("kind %s, but linux.CanBoot says %v", kind, boots)
	}
	sys, err := kvm.Open()
	if err != nil {
		if kind != KVMNone {
			t.Errorf("kind %s, but kvm.Open: %v", kind, err)
		}
		return
	}
	defer sys.Close()
	if (kind == KVMPVM) != sys.PVM() {
		t.Errorf("kind %s, but System.PVM says %v", kind, sys.PVM())
	}
}

// TestRunsc: a runsc that is not there means no gVisor backend; a binary
// that is not the pinned gVisor is reported as limited; the pinned build,
// where this host has it, is OK.
func TestRunsc(t *testing.T) {
	missing := checkRunsc(Options{Runsc: filepath.Join(t.TempDir(), "runsc")})
	if missing.Status != Missing {
		t.Errorf("no runsc: %+v", missing)
	}
	r := Check(Options{Runsc: filepath.Join(t.TempDir(), "runsc")})
	if r.Backend == GVisor {
		t.Errorf("gvisor picked without runsc: %s", r.Reason)
	}
	if r.Backend == "" && !strings.Contains(r.Reason, "runsc") {
		t.Errorf("no backend, and the reason does not name runsc: %s", r.Reason)
	}

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	other := checkRunsc(Options{Runsc: self})
	if other.Status != Limited || !strings.Contains(other.Detail, "not the pinned "+gvisor.RunscVersion) {
		t.Errorf("this test binary as runsc: %+v", other)
	}

	p, err := gvisor.FindRunsc("", "")
	if err != nil {
		t.Skipf("the rest needs the pinned runsc: %v", err)
	}
	if it := checkRunsc(Options{Runsc: p}); it.Status != OK && strings.Contains(p, gvisor.RunscVersion) {
		t.Errorf("the pinned build %s: %+v", p, it)
	}
}

// TestBPFLeavesNothing: the probe's pin is gone afterwards.
func TestBPFLeavesNothing(t *testing.T) {
	testenv.RequireRoot(t, "loads an eBPF program")
	it := checkBPF()
	t.Logf("%s: %s", it.Status, it.Detail)
	left, _ := filepath.Glob(filepath.Join(bpfFS, "cubicle_doctor_*"))
	if len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}

func TestCgroupMounts(t *testing.T) {
	for _, tc := range []struct {
		name, mountinfo string
		v1              map[string]string
		unified         string
	}{
		{
			name: "hybrid",
			mountinfo: `30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
38 30 0:30 /sub /mnt/memsub rw - cgroup cgroup rw,memory`,
			v1: map[string]string{"memory": "/sys/fs/cgroup/memory", "cpu": "/sys/fs/cgroup/cpu,cpuacct",
				"cpuacct": "/sys/fs/cgroup/cpu,cpuacct", "pids": "/sys/fs/cgroup/pids"},
			unified: "/sys/fs/cgroup/unified",
		},
		{
			name:      "v2",
			mountinfo: "29 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate",
			v1:        map[string]string{},
			unified:   "/sys/fs/cgroup",
		},
		{name: "none", mountinfo: "22 1 8:1 / / rw - ext4 /dev/sda1 rw", v1: map[string]string{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v1, unified := cgroupMounts(tc.mountinfo)
			if unified != tc.unified || len(v1) != len(tc.v1) {
				t.Fatalf("got %v %q, want %v %q", v1, unified, tc.v1, tc.unified)
			}
			for k, v := range tc.v1 {
				if v1[k] != v {
					t.Errorf("%s at %q, want %q", k, v1[k], v)
				}
			}
		})
	}
}
