//go:build linux && amd64

package jailer

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/testenv"
)

// modeEnv makes the test binary a jailed child (see child).
const modeEnv = "JAILER_TEST_MODE"

func TestMain(m *testing.M) {
	if mode := os.Getenv(modeEnv); mode != "" {
		os.Exit(child(mode))
	}
	os.Exit(m.Run())
}

// child enters the jail and does what mode says. Modes that make a
// forbidden system call print "survived" if they live on.
func child(mode string) int {
	ok, err := EnterFromEnv()
	if err != nil || !ok {
		fmt.Fprintln(os.Stderr, "enter:", ok, err)
		return 2
	}
	switch mode {
	case "wait": // for inspection from outside, until stdin closes
		fmt.Println("ready")
		_, _ = io.Copy(io.Discard, os.Stdin)
		return 0
	case "allowed":
		return allowed()
	case "alloc": // touches 256 MiB: more than the OOM test's limit
		b := make([]byte, 256<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		fmt.Println("survived: allocated", len(b))
		return 0
	case "socket-inet":
		_, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	case "exec":
		err = syscall.Exec("/bin/true", []string{"true"}, nil)
	case "mount":
		err = unix.Mount("none", "/", "tmpfs", 0, "")
	case "fork":
		// clone without CLONE_THREAD: a new process.
		r, _, errno := unix.RawSyscall6(unix.SYS_CLONE, uintptr(syscall.SIGCHLD), 0, 0, 0, 0, 0)
		if errno == 0 && r == 0 {
			unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0) // the forked child
		}
		err = errno
	case "ptrace":
		err = unix.PtraceAttach(1)
	case "setuid":
		err = syscall.Setuid(0)
	default:
		fmt.Fprintln(os.Stderr, "unknown mode", mode)
		return 2
	}
	fmt.Println("survived:", err)
	return 0
}

// allowed does what a jailed VMM does and prints "ok".
func allowed() int {
	fail := func(what string, err error) int {
		fmt.Println("failed:", what, err)
		return 1
	}
	kvm, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail("open /dev/kvm", err)
	}
	// KVM_GET_API_VERSION (linux/kvm.h: _IO(KVMIO, 0x00)) is 12.
	if v, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(kvm), 0xae00, 0); errno != 0 || v != 12 {
		return fail("KVM_GET_API_VERSION", errno)
	}
	ln, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fail("unix socket", err)
	}
	if err := unix.Bind(ln, &unix.SockaddrUnix{Name: "/s.sock"}); err != nil {
		return fail("bind", err)
	}
	if err := os.WriteFile("/file", []byte("x"), 0o600); err != nil {
		return fail("write a file", err)
	}
	if err := os.Rename("/file", "/file2"); err != nil {
		return fail("rename", err)
	}
	if _, err := unix.Eventfd(0, unix.EFD_CLOEXEC); err != nil {
		return fail("eventfd", err)
	}
	// glibc's pthread_create tries clone3 first: it gets ENOSYS.
	if _, _, errno := unix.Syscall(unix.SYS_CLONE3, 0, 0, 0); errno != unix.ENOSYS {
		return fail("clone3 answered", errno)
	}
	// Threads still start (the runtime's clone carries CLONE_THREAD).
	done := make(chan struct{})
	for range 4 {
		go func() {
			time.Sleep(time.Millisecond)
			done <- struct{}{}
		}()
	}
	for range 4 {
		<-done
	}
	fmt.Println("ok")
	return 0
}

// jailed starts the test binary as a jailed child in mode.
func jailed(t *testing.T, mode string) (*exec.Cmd, *Jail, *bufio.Reader, io.WriteCloser) {
	t.Helper()
	return jailedLimit(t, mode, 512<<20)
}

// jailedLimit is jailed with the memory cgroup's limit memLimit.
func jailedLimit(t *testing.T, mode string, memLimit int64) (*exec.Cmd, *Jail, *bufio.Reader, io.WriteCloser) {
	t.Helper()
	testenv.RequireRoot(t, "jails a process: namespaces, chroot, mknod")
	root := filepath.Join(t.TempDir(), "root")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), modeEnv+"="+mode, "GORACE=atexit_sleep_ms=0")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{
		Root:        root,
		Cgroup:      fmt.Sprintf("cubicle-jailer-test-%d-%s", os.Getpid(), mode),
		MemoryLimit: memLimit,
		PidsLimit:   128,
		Mounts:      []Mount{{Source: "/etc/hostname", Target: "/etc/hostname", ReadOnly: true}},
	}
	j, err := cfg.Apply(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		j.Abort()
		t.Fatal(err)
	}
	if err := j.Started(cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		in.Close()
		_ = j.Kill()
		cmd.Wait()
		if err := j.Cleanup(); err != nil {
			t.Errorf("cgroup cleanup: %v", err)
		}
	})
	return cmd, j, bufio.NewReader(out), in
}

// statusField returns a field of /proc/<pid>/task/<tid>/status.
func statusFields(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return m
}

// TestJailConfinement inspects a jailed process from outside: every
// thread has uid/gid 65534, no capabilities, no_new_privs and a seccomp
// filter; it is PID 1 of its own PID namespace, in its own mount,
// network, IPC and UTS namespaces and in its own cgroups, and its "/" holds
// only the jail.
func TestJailConfinement(t *testing.T) {
	cmd, j, out, in := jailed(t, "wait")
	if line, err := out.ReadString('\n'); line != "ready\n" {
		t.Fatalf("child said %q, %v", line, err)
	}
	pid := cmd.Process.Pid
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil || len(tasks) < 2 {
		t.Fatalf("threads of the child: %v, %v", tasks, err)
	}
	for _, task := range tasks {
		f := statusFields(t, fmt.Sprintf("/proc/%d/task/%s/status", pid, task.Name()))
		want := map[string]string{
			"Uid": "65534 65534 65534 65534", "Gid": "65534 65534 65534 65534",
			"CapEff": "0000000000000000", "CapPrm": "0000000000000000", "CapAmb": "0000000000000000",
			"NoNewPrivs": "1", "Seccomp": "2",
		}
		for k, v := range want {
			if f[k] != v {
				t.Errorf("thread %s: %s is %q, want %q", task.Name(), k, f[k], v)
			}
		}
		if task.Name() == fmt.Sprint(pid) && !strings.HasSuffix(f["NSpid"], " 1") {
			t.Errorf("thread %s: NSpid %q: not PID 1 of a new PID namespace", task.Name(), f["NSpid"])
		}
	}
	for _, ns := range []string{"mnt", "pid", "net", "ipc", "uts"} {
		mine, _ := os.Readlink("/proc/self/ns/" + ns)
		theirs, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", pid, ns))
		if err != nil || theirs == mine {
			t.Errorf("%s namespace %q shared with the parent (%v)", ns, theirs, err)
		}
	}
	cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"memory", "pids"} {
		if !strings.Contains(string(cg), ":"+c+":") || !strings.Contains(string(cg), j.cfg.Cgroup) {
			t.Errorf("not in its own %s cgroup:\n%s", c, cg)
		}
	}
	var names []string
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/root", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"dev", "etc"}) {
		t.Errorf("the jail's / holds %v, want [dev etc]", names)
	}
	devs, _ := os.ReadDir(fmt.Sprintf("/proc/%d/root/dev", pid))
	if len(devs) != 2 || devs[0].Name() != "kvm" || devs[1].Name() != "null" {
		t.Errorf("the jail's /dev holds %v, want kvm and null", devs)
	}
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/root/etc/hostname", pid), []byte("x"), 0); !errors.Is(err, unix.EROFS) {
		t.Errorf("writing a read-only mount from outside: %v, want EROFS", err)
	}
	in.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("child: %v", err)
	}
}

// TestSeccompKills: each forbidden call kills the jailed process with
// SIGSYS before it returns.
func TestSeccompKills(t *testing.T) {
	for _, mode := range []string{"socket-inet", "exec", "mount", "fork", "ptrace", "setuid"} {
		t.Run(mode, func(t *testing.T) {
			cmd, _, out, _ := jailed(t, mode)
			said, _ := io.ReadAll(out)
			err := cmd.Wait()
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("child ended with %v; said %q", err, said)
			}
			ws := ee.Sys().(syscall.WaitStatus)
			if !ws.Signaled() || ws.Signal() != syscall.SIGSYS {
				t.Fatalf("child ended with %v, want death by SIGSYS; said %q", ws, said)
			}
		})
	}
}

// TestSeccompAllows: what a VMM needs still works in the jail.
func TestSeccompAllows(t *testing.T) {
	// The jail makes its own /dev/kvm node; what is behind it is the host's.
	testenv.RequireKVM(t)
	cmd, _, out, _ := jailed(t, "allowed")
	said, _ := io.ReadAll(out)
	if err := cmd.Wait(); err != nil || string(said) != "ok\n" {
		t.Fatalf("child: %v; said %q", err, said)
	}
}

// TestFilterShape checks the program's invariants: it starts with the
// architecture check, every jump lands inside the program, and it ends by
// killing.
func TestFilterShape(t *testing.T) {
	p, err := filter(rules())
	if err != nil {
		t.Fatal(err)
	}
	if p[0].Code != bpfLdWAbs || p[0].K != offArch || p[1].K != unix.AUDIT_ARCH_X86_64 {
		t.Errorf("program does not start with the architecture check")
	}
	for i, ins := range p {
		if ins.Code&0x07 == unix.BPF_JMP && (i+1+int(ins.Jt) >= len(p) || i+1+int(ins.Jf) >= len(p)) {
			t.Errorf("instruction %d jumps out of the program", i)
		}
	}
	if last := p[len(p)-1]; last.Code != bpfRetK || last.K != unix.SECCOMP_RET_KILL_PROCESS {
		t.Errorf("program does not end by killing")
	}
	if unsafe.Sizeof(unix.SockFilter{}) != 8 {
		t.Errorf("struct sock_filter is 8 bytes")
	}
}

// TestConfigRejected: unusable configurations never start a process.
func TestConfigRejected(t *testing.T) {
	for _, c := range []Config{
		{Root: "relative"},
		{Root: "/"},
		{Root: "/tmp/x", Mounts: []Mount{{Source: "/etc", Target: "../etc"}}},
		{Root: "/tmp/x", UID: -1},
	} {
		if _, err := c.Apply(exec.Command("true")); !errors.Is(err, ErrConfig) {
			t.Errorf("Apply(%+v) = %v, want ErrConfig", c, err)
		}
	}
}

// TestOOMKill: a jailed process that touches more memory than its
// memory cgroup's limit is killed by the kernel, and the jail's Handle
// counts the OOM kill (what runtime/microvm's Wait reports as ExitOOM);
// Remove then takes the cgroups and the root away.
func TestOOMKill(t *testing.T) {
	cmd, j, out, in := jailedLimit(t, "alloc", 64<<20)
	defer in.Close()
	h := j.Handle()
	if h.Memory == "" || h.Pids == "" || h.Root == "" {
		t.Fatalf("handle %+v lacks the root or a cgroup", h)
	}
	rest, _ := io.ReadAll(out)
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child over its memory limit: %v, said %q; want killed by SIGKILL", err, rest)
	}
	if n, err := h.OOMKills(); err != nil || n != 1 {
		t.Errorf("OOM kills: %d, %v; want 1", n, err)
	}
	if err := h.Remove(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{h.Root, h.Memory, h.Pids, h.Unified} {
		if _, err := os.Stat(p); p != "" && !os.IsNotExist(err) {
			t.Errorf("%s left behind: %v", p, err)
		}
	}
}

// TestDetach: a detached jail's process gets no parent-death signal (it
// outlives its parent); an attached one does.
func TestDetach(t *testing.T) {
	for _, detach := range []bool{false, true} {
		cmd := exec.Command("/bin/true")
		j, err := Config{Root: filepath.Join(t.TempDir(), "root"), Detach: detach}.Apply(cmd)
		if err != nil {
			t.Fatal(err)
		}
		j.Abort()
		if got := cmd.SysProcAttr.Pdeathsig != 0; got == detach {
			t.Errorf("detach %v: parent-death signal %v", detach, cmd.SysProcAttr.Pdeathsig)
		}
	}
}

// TestHandleRejected: a Handle read back from a file cannot point Kill
// or Remove outside the cgroup mounts, or at "/".
func TestHandleRejected(t *testing.T) {
	for _, h := range []Handle{
		{Root: "/"},
		{Root: "relative"},
		{Root: "/tmp/x/../.."},
		{Memory: "/etc"},
		{Pids: "/sys/fs/cgroup/pids/../../../etc"},
	} {
		if err := h.Remove(); !errors.Is(err, ErrConfig) {
			t.Errorf("Remove(%+v): %v, want ErrConfig", h, err)
		}
		if err := h.Kill(); !errors.Is(err, ErrConfig) {
			t.Errorf("Kill(%+v): %v, want ErrConfig", h, err)
		}
	}
}
