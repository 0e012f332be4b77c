//go:build linux && amd64

package control

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
)

// spawnerEnv makes the test binary a spawner (see spawnDetached): it
// starts a jailed, detached VMM, restores the template into it, detaches
// it and exits, as a server that made a sandbox and then went away.
const spawnerEnv = "CONTROL_TEST_SPAWNER"

// spawnerArgs travel in spawnerEnv.
type spawnerArgs struct {
	Jail     jailer.Config
	Snapshot Snapshot // inside the jail
	Disk     string
	Log      string
}

// spawnerResult is the spawner's standard output.
type spawnerResult struct {
	Pid    int
	Handle jailer.Handle
}

func init() {
	v := os.Getenv(spawnerEnv)
	if v == "" {
		return
	}
	if err := spawnDetached(v); err != nil {
		fmt.Fprintln(os.Stderr, "spawner:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func spawnDetached(v string) error {
	var a spawnerArgs
	if err := json.Unmarshal([]byte(v), &a); err != nil {
		return err
	}
	logf, err := os.Create(a.Log)
	if err != nil {
		return err
	}
	defer logf.Close()
	disk, err := os.OpenFile(a.Disk, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer disk.Close()
	cfg := SpawnConfig{
		Path: os.Args[0],
		Env:  append(slicesWithout(os.Environ(), spawnerEnv+"="), vmmEnv+"=1", "GORACE=atexit_sleep_ms=0"),
		Jail: &a.Jail, Detach: true, Stdout: logf, Stderr: logf,
	}
	p, err := Spawn(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if _, err := p.Restore(ctx, a.Snapshot, RestoreOptions{Devices: guestDevices(7, "/v.sock"), Console: "/console",
		ConsoleLimit: 1 << 16, WaitRunning: true, Files: []*os.File{disk}}); err != nil {
		p.Kill()
		return err
	}
	if err := p.Listen(ctx, "/vmm.sock"); err != nil {
		p.Kill()
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(spawnerResult{Pid: p.Pid(), Handle: p.Jail().Handle()})
}

func slicesWithout(env []string, prefix string) []string {
	var out []string
	for _, e := range env {
		if !strings.HasPrefix(e, prefix) {
			out = append(out, e)
		}
	}
	return out
}

// TestJailedDetach: a jailed VMM that a listen request detached outlives
// the process that spawned it, confined (uid 65534, no capabilities,
// seccomp) in its cgroups with the memory and pids limits; its control
// socket, vsock socket and console are inside its jail's root, where the
// host reaches them; one control connection after another works; and
// through the jail's Handle alone (what a restarted server has) its memory
// is read, it is killed, and its cgroups and root are removed.
func TestJailedDetach(t *testing.T) {
	testenv.RequireKVM(t)
	testenv.RequireRoot(t, "jails the VMM: namespaces, chroot, mknod, cgroups")
	dir := t.TempDir()
	tmplDir := filepath.Join(dir, "template")
	if err := os.Mkdir(tmplDir, 0o755); err != nil {
		t.Fatal(err)
	}
	snap := makeTemplate(t, tmplDir)
	newDisk(t, dir, "d.img", "detached-jail")
	const memLimit = 256 << 20
	args := spawnerArgs{
		Jail: jailer.Config{
			Root:        filepath.Join(dir, "jail"),
			Cgroup:      fmt.Sprintf("cubicle-control-detach-%d", os.Getpid()),
			Mounts:      []jailer.Mount{{Source: filepath.Dir(snap.State), Target: "/template", ReadOnly: true}},
			MemoryLimit: memLimit,
			PidsLimit:   128,
		},
		Snapshot: Snapshot{State: "/template/vm.state", Memory: "/template/vm.mem"},
		Disk:     filepath.Join(dir, "d.img"),
		Log:      filepath.Join(dir, "spawner-vmm.log"),
	}
	enc, _ := json.Marshal(args)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), spawnerEnv+"="+string(enc))
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		log, _ := os.ReadFile(args.Log)
		t.Fatalf("spawner: %v\nVMM log:\n%s", err, log)
	}
	var res spawnerResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("spawner said %q: %v", out, err)
	}
	h := res.Handle
	pidfd, err := unix.PidfdOpen(res.Pid, 0)
	if err != nil {
		t.Fatalf("the detached VMM %d did not outlive its spawner: %v", res.Pid, err)
	}
	defer unix.Close(pidfd)
	killed := false
	defer func() {
		if !killed {
			h.Kill()
			waitFD(pidfd)
			h.Remove()
		}
	}()
	if waitFDFor(pidfd, 300*time.Millisecond) {
		t.Fatalf("the detached VMM exited with its spawner")
	}
	if h.Root != args.Jail.Root || h.Memory == "" || h.Pids == "" {
		t.Fatalf("handle %+v: want the root and the memory and pids cgroups", h)
	}

	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", res.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"CapEff:\t0000000000000000", "Seccomp:\t2", "Uid:\t65534\t65534\t65534\t65534"} {
		if !strings.Contains(string(status), want) {
			t.Errorf("jailed VMM status lacks %q:\n%s", want, status)
		}
	}
	if in, err := h.InCgroup(res.Pid); err != nil || !in {
		t.Errorf("VMM %d in its cgroups: %v, %v", res.Pid, in, err)
	}
	for file, want := range map[string]string{
		filepath.Join(h.Memory, "memory.limit_in_bytes"): fmt.Sprint(memLimit),
		filepath.Join(h.Pids, "pids.max"):                "128",
	} {
		if b, err := os.ReadFile(file); err != nil || strings.TrimSpace(string(b)) != want {
			t.Errorf("%s: %q, %v; want %s", file, b, err, want)
		}
	}
	if n, err := h.MemoryUsage(); err != nil || n == 0 {
		t.Errorf("memory usage from the cgroup: %d, %v", n, err)
	}
	if n, err := h.OOMKills(); err != nil || n != 0 {
		t.Errorf("OOM kills: %d, %v; want 0", n, err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	sock := filepath.Join(h.Root, "vmm.sock")
	for i := range 2 { // one connection after another
		c, err := Dial(sock)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		m, err := c.Metrics(ctx)
		if err != nil || m.State != "running" {
			t.Fatalf("connection %d: metrics %+v, %v", i, m, err)
		}
		typeOn(t, c, "p")
		c.Close()
	}
	waitFile(t, filepath.Join(h.Root, "console"), "pong ")
	vsockEcho(t, filepath.Join(h.Root, "v.sock"), "jailed and detached\n")

	if err := h.Kill(); err != nil {
		t.Fatal(err)
	}
	if !waitFDFor(pidfd, waitTimeout) {
		t.Fatal("the VMM outlived its jail's Kill")
	}
	killed = true
	if err := h.Remove(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{h.Root, h.Memory, h.Pids, h.Unified} {
		if p == "" {
			continue
		}
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
}

func waitFD(fd int) { waitFDFor(fd, waitTimeout) }

// waitFDFor reports whether the pidfd turned readable (its process
// exited) within d.
func waitFDFor(fd int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		ms := int(time.Until(deadline).Milliseconds())
		if ms < 0 {
			return false
		}
		n, err := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, ms)
		if err == nil && n > 0 {
			return true
		}
		if err != nil && err != unix.EINTR {
			return false
		}
	}
}
