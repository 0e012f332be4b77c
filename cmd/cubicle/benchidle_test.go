package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseMemInfo(t *testing.T) {
	for _, tc := range []struct {
		name, in     string
		total, avail uint64
		err          string
	}{
		{name: "proc", in: "MemTotal:       24683772 kB\nMemFree:        19689896 kB\nMemAvailable:   24081352 kB\nHugePages_Total:       0\n",
			total: 24683772 << 10, avail: 24081352 << 10},
		{name: "order does not matter", in: "MemAvailable: 2 kB\nMemTotal: 4 kB\n", total: 4 << 10, avail: 2 << 10},
		{name: "no MemAvailable (before Linux 3.14)", in: "MemTotal: 4 kB\nMemFree: 2 kB\n", err: "no MemAvailable"},
		{name: "not kB", in: "MemTotal: 4 MB\nMemAvailable: 2 kB\n", err: "is not \"N kB\""},
		{name: "not a number", in: "MemTotal: x kB\nMemAvailable: 2 kB\n", err: "is not a size"},
		{name: "negative", in: "MemTotal: -4 kB\nMemAvailable: 2 kB\n", err: "is not a size"},
		{name: "twice", in: "MemTotal: 4 kB\nMemTotal: 4 kB\nMemAvailable: 2 kB\n", err: "given twice"},
		{name: "empty", in: "", err: "no MemTotal"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			total, avail, err := parseMemInfo(strings.NewReader(tc.in))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want one saying %q", err, tc.err)
				}
				return
			}
			if err != nil || total != tc.total || avail != tc.avail {
				t.Fatalf("= %d, %d, %v; want %d, %d", total, avail, err, tc.total, tc.avail)
			}
		})
	}
	// And the host's own.
	total, avail, err := memInfo()
	if err != nil || total == 0 || avail > total {
		t.Fatalf("memInfo() = %d, %d, %v", total, avail, err)
	}
}

func TestMean(t *testing.T) {
	ms := time.Millisecond
	for _, tc := range []struct {
		in   []time.Duration
		want float64
	}{
		{nil, 0},
		{[]time.Duration{10 * ms}, 10},
		{[]time.Duration{10 * ms, 20 * ms, 60 * ms}, 30},
		{[]time.Duration{1500 * time.Microsecond, 2 * ms}, 1.75},
	} {
		if got := mean(tc.in); got != tc.want {
			t.Errorf("mean(%v) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

// start runs a process that lives until the test ends. Its stdin is a
// pipe held open, so that `sh -c 'read x'` waits without a child and keeps
// its command line.
func start(t *testing.T, name string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(name, args...)
	if _, err := cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

// TestSandboxPSS finds sandboxes' host processes the way `bench idle` does,
// on real processes laid out as the two backends lay theirs out: a
// process whose command line names a gVisor bundle (<data>/gvisor/<id>),
// with a child; a process whose pid a microVM record holds
// (<data>/microvm/<id>/sandbox.json); and it refuses a sum that would
// leave a sandbox out.
func TestSandboxPSS(t *testing.T) {
	if _, err := os.Stat("/proc/self/smaps_rollup"); err != nil {
		t.Skipf("no smaps_rollup (Linux 4.14 and later): %v", err)
	}
	data := t.TempDir()
	// The gVisor sentry names its bundle as --bundle=, the gofer as a
	// separate argument, both as --log=<bundle>/runsc.log.
	sentry := start(t, "sh", "-c", "sleep 300; true", "runsc-sandbox", "--root="+filepath.Join(data, "gvisor", "runsc"),
		"--log="+filepath.Join(data, "gvisor", "g1", "runsc.log"), "boot", "--bundle="+filepath.Join(data, "gvisor", "g1"))
	gofer := start(t, "sh", "-c", "read x", "runsc-gofer", "gofer", "--bundle", filepath.Join(data, "gvisor", "g1"))
	// A sandbox of another server: an ID that only prefixes ours.
	start(t, "sh", "-c", "read x", "runsc-sandbox", "--bundle="+filepath.Join(data, "gvisor", "g12"))
	vmm := start(t, "sleep", "300")
	rec := filepath.Join(data, "microvm", "m1", "sandbox.json")
	if err := os.MkdirAll(filepath.Dir(rec), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(rec, fmt.Appendf(nil, `{"config":{},"pid":%d,"pidStart":1}`, vmm.Process.Pid), 0o600); err != nil {
		t.Fatal(err)
	}

	// The sentry's shell forks its sleep (a command follows it).
	var by map[string][]int
	deadline := time.Now().Add(10 * time.Second)
	for {
		var err error
		if by, err = sandboxProcs("/proc", data, []string{"g1", "m1"}); err != nil {
			t.Fatal(err)
		}
		if len(by["g1"]) == 3 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if g := by["g1"]; len(g) != 3 || !slices.Contains(g, sentry.Process.Pid) || !slices.Contains(g, gofer.Process.Pid) {
		t.Errorf("gVisor sandbox g1: pids %v, want the sentry %d, its child and the gofer %d", g, sentry.Process.Pid, gofer.Process.Pid)
	}
	if m := by["m1"]; !slices.Equal(m, []int{vmm.Process.Pid}) {
		t.Errorf("microVM sandbox m1: pids %v, want the VMM %d", m, vmm.Process.Pid)
	}

	pss, procs, err := sandboxPSS("/proc", data, []string{"g1", "m1"})
	if err != nil || procs != 4 || pss == 0 {
		t.Fatalf("sandboxPSS = %d bytes over %d processes, %v; want >0 over 4", pss, procs, err)
	}
	one, err := pssOf("/proc", vmm.Process.Pid)
	if err != nil || one == 0 || one > pss {
		t.Errorf("PSS of the VMM: %d, %v (sum %d)", one, err, pss)
	}

	// A sandbox with no process found: no figure rather than a low one.
	if _, _, err := sandboxPSS("/proc", data, []string{"g1", "m1", "gone"}); err == nil || !strings.Contains(err.Error(), "1 of 3") {
		t.Errorf("with a sandbox that has no process: %v, want it refused", err)
	}
	// A record whose process has ended counts as none.
	vmm.Process.Kill()
	vmm.Wait()
	if _, _, err := sandboxPSS("/proc", data, []string{"m1"}); err == nil {
		t.Errorf("a dead VMM's record gave a figure")
	}
	if _, _, err := sandboxPSS("/proc", "", []string{"g1"}); err == nil {
		t.Errorf("no data dir gave a figure")
	}
}
