package gvisor

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSetuidInsideOnly checks that a setuid-root binary of the template
// raises a sandbox process to euid 0 (what sudo needs, as E2B's user has
// passwordless sudo), while the host never honours that bit: the sandbox's
// mounts are nosuid on the host and its directory is closed to other
// users, so the same file run from the host as an unprivileged user gains
// nothing.
func TestSetuidInsideOnly(t *testing.T) {
	e := newEnv(t, "100.88.252.96/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	// t.TempDir is 0700; a template's root is 0755, or uid 1000 could not
	// reach anything in the sandbox.
	if err := os.Chmod(tmpl, 0o755); err != nil {
		t.Fatal(err)
	}
	// A setuid-root copy of the probe, which prints its effective uid.
	suid := filepath.Join(tmpl, "bin", "suidprobe")
	if err := os.MkdirAll(filepath.Dir(suid), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(probePath)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(suid, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(suid, 0o755|os.ModeSetuid); err != nil {
		t.Fatal(err)
	}
	sb, err := e.create(ctx, config(testID("suid"), tmpl))
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, sb, 10*time.Second)

	// Inside: uid 1000 runs the setuid binary and is root for it.
	code, body := get(t, sb, "/exec-as?uid=1000&path=/bin/suidprobe&arg=-euid")
	if code != 200 || body != "0" {
		t.Fatalf("setuid-root binary run as uid 1000 inside the sandbox: %d %q, want euid 0", code, body)
	}
	// And a plain binary does not raise it: the sandbox's uids hold.
	code, body = get(t, sb, "/exec-as?uid=1000&path=/.cubicle/envd&arg=-euid")
	if code != 200 || body != "1000" {
		t.Fatalf("plain binary run as uid 1000: %d %q, want euid 1000", code, body)
	}

	// Outside: every host mount of the sandbox is nosuid ...
	dir := e.rt.sandboxDir(sb.ID)
	for _, m := range []string{filepath.Join(dir, "rootfs"), filepath.Join(dir, diskMount)} {
		var fs unix.Statfs_t
		if err := unix.Statfs(m, &fs); err != nil {
			t.Fatal(err)
		}
		if fs.Flags&unix.ST_NOSUID == 0 {
			t.Errorf("host mount %s is not nosuid (flags %#x)", m, fs.Flags)
		}
	}
	// ... and the sandbox's directory is root's alone.
	for _, d := range []string{e.stateDir, dir} {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s is mode %v: other users can reach the sandbox's files", d, fi.Mode().Perm())
		}
	}
	// The file itself, seen through the sandbox's overlay on the host,
	// still has its setuid bit: only the mount flags keep it inert.
	hostPath := filepath.Join(dir, "rootfs", "bin", "suidprobe")
	if fi, err := os.Stat(hostPath); err != nil || fi.Mode()&os.ModeSetuid == 0 {
		t.Fatalf("the host does not see the setuid binary at %s: %v %v", hostPath, fi, err)
	}
	// Run from the host as uid 1000, it gains nothing (nosuid), and cannot
	// even be reached through the sandbox's directory.
	cmd := exec.Command(hostPath, "-euid")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1000, Gid: 1000}}
	out, err := cmd.CombinedOutput()
	if err == nil {
		t.Fatalf("uid 1000 on the host ran the sandbox's setuid binary: euid %s", out)
	}
	t.Logf("uid 1000 on the host running %s: %v", hostPath, err)
	// Given the file itself (an open descriptor, as a process that got
	// past the directories would have), uid 1000 still gains nothing: the
	// mount is nosuid.
	f, err := os.Open(hostPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd = exec.Command("/proc/self/fd/3", "-euid")
	cmd.ExtraFiles = []*os.File{f}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1000, Gid: 1000}}
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("uid 1000 running the sandbox's setuid binary from an open descriptor: %v: %s", err, out)
	}
	if got := strings.TrimSpace(string(out)); got != "1000" {
		t.Fatalf("uid 1000 on the host ran the sandbox's setuid binary with euid %s: the host honours its setuid bit", got)
	}
	if err := e.kill(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
}
