package template

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for the build's concurrent writes that
// also echoes into the test log when -v is given.
type syncBuffer struct {
	t   *testing.T
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	if testing.Verbose() {
		b.t.Logf("%s", bytes.TrimRight(p, "\n"))
	}
	return b.buf.Write(p)
}

// TestBuildBase runs the real debootstrap build into a temporary data dir,
// using the machine's shared cache, so it is slow only the first time on a
// machine. It checks the rootfs holds what the package promises and that
// repeated builds come from the cache.
func TestBuildBase(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a Debian rootfs with debootstrap (1-2 min the first time on a machine)")
	}
	if os.Geteuid() != 0 {
		t.Skip("debootstrap and chroot need root")
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		t.Skip("debootstrap is not installed (apt-get install debootstrap)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	dataDir := t.TempDir()
	var log1 syncBuffer
	log1.t = t
	start := time.Now()
	tmpl, outcome, err := buildBase(ctx, BuildOptions{DataDir: dataDir, Progress: &log1})
	if err != nil {
		t.Fatalf("first build: %v\n%s", err, log1.buf.String())
	}
	t.Logf("first build: %s in %s", outcome, time.Since(start).Round(time.Millisecond))
	if outcome == outcomeUpToDate {
		t.Fatalf("first build into an empty data dir says %s", outcome)
	}
	if !strings.Contains(log1.buf.String(), "[template base] ") {
		t.Errorf("progress lines lack the [template base] prefix:\n%s", log1.buf.String())
	}

	reg, err := Open(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := reg.Get(BaseID)
	if err != nil {
		t.Fatalf("Get(base) after build: %v", err)
	}
	if got.BuildID != tmpl.BuildID || !got.hasAlias(BaseID) || !got.Public ||
		got.CPUCount != DefaultCPUCount || got.MemoryMB != DefaultMemoryMB ||
		got.DiskSizeMB < DefaultDiskSizeMB || got.EnvdVersion != DefaultEnvdVersion || got.CreatedAt.IsZero() {
		t.Errorf("template.json = %+v, want base defaults with build %s", got, tmpl.BuildID)
	}
	root := reg.RootFS(got)
	checkRootfs(t, root)
	used, err := diskUsage(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("rootfs %s: %d MiB, diskSizeMB %d", root, used>>20, got.DiskSizeMB)

	// A fresh data dir with the same inputs must come from the cache.
	var log2 syncBuffer
	log2.t = t
	start = time.Now()
	tmpl2, outcome, err := buildBase(ctx, BuildOptions{DataDir: t.TempDir(), Progress: &log2})
	if err != nil {
		t.Fatalf("second build: %v\n%s", err, log2.buf.String())
	}
	t.Logf("second build: %s in %s", outcome, time.Since(start).Round(time.Millisecond))
	if outcome != outcomeCacheHit || !strings.Contains(log2.buf.String(), "cache hit: ") {
		t.Errorf("second build: outcome %s, want %s with a \"cache hit\" line:\n%s", outcome, outcomeCacheHit, log2.buf.String())
	}
	if strings.Contains(log2.buf.String(), "debootstrap") {
		t.Errorf("second build ran debootstrap:\n%s", log2.buf.String())
	}
	if tmpl2.BuildID != tmpl.BuildID {
		t.Errorf("same inputs, different buildIDs: %s vs %s", tmpl2.BuildID, tmpl.BuildID)
	}

	// The first data dir already has the current base: nothing to do.
	_, outcome, err = buildBase(ctx, BuildOptions{DataDir: dataDir})
	if err != nil || outcome != outcomeUpToDate {
		t.Errorf("rebuild into a current data dir: %s, %v; want %s", outcome, err, outcomeUpToDate)
	}
}

// checkRootfs checks the promises of the base template on a built rootfs.
func checkRootfs(t *testing.T, root string) {
	t.Helper()
	for _, bin := range []string{"bin/bash", "usr/bin/python3", "usr/bin/python", "usr/bin/pip3", "usr/bin/node",
		"usr/bin/git", "usr/bin/curl", "usr/bin/sudo", "usr/bin/ps", "usr/bin/less"} {
		fi, err := os.Stat(filepath.Join(root, bin))
		if err != nil {
			t.Errorf("rootfs lacks /%s: %v", bin, err)
		} else if fi.Mode()&0o111 == 0 {
			t.Errorf("/%s is not executable: %v", bin, fi.Mode())
		}
	}
	passwd := readFile(t, root, "etc/passwd")
	if !strings.Contains(passwd, "\nuser:x:1000:1000::/home/user:/bin/bash\n") {
		t.Errorf("/etc/passwd has no user uid 1000 with home /home/user and bash:\n%s", passwd)
	}
	if group := readFile(t, root, "etc/group"); !containsLine(group, func(l string) bool {
		return strings.HasPrefix(l, "sudo:") && strings.Contains(","+l[strings.LastIndex(l, ":")+1:]+",", ",user,")
	}) {
		t.Errorf("user is not in group sudo:\n%s", group)
	}
	sudoers := filepath.Join(root, "etc/sudoers.d/user")
	if fi, err := os.Stat(sudoers); err != nil || fi.Mode().Perm() != 0o440 {
		t.Errorf("/etc/sudoers.d/user: %v, %v; want mode 0440", fi, err)
	}
	if s := readFile(t, root, "etc/sudoers.d/user"); !strings.Contains(s, "user ALL=(ALL:ALL) NOPASSWD: ALL") {
		t.Errorf("/etc/sudoers.d/user = %q", s)
	}
	if fi, err := os.Stat(filepath.Join(root, "home/user")); err != nil {
		t.Errorf("no /home/user: %v", err)
	} else if st := fi.Sys().(*syscall.Stat_t); st.Uid != 1000 || st.Gid != 1000 {
		t.Errorf("/home/user owned by %d:%d, want 1000:1000", st.Uid, st.Gid)
	}
	if s := readFile(t, root, "etc/hostname"); strings.TrimSpace(s) == "" {
		t.Error("/etc/hostname is empty")
	}
	if s := readFile(t, root, "etc/resolv.conf"); !strings.Contains(s, "nameserver ") {
		t.Errorf("/etc/resolv.conf = %q", s)
	}
	if s := readFile(t, root, "usr/sbin/policy-rc.d"); !strings.Contains(s, "exit 101") {
		t.Errorf("/usr/sbin/policy-rc.d = %q", s)
	}
	if lists, _ := filepath.Glob(filepath.Join(root, "var/lib/apt/lists/*_Packages")); len(lists) > 0 {
		t.Errorf("apt lists left in the rootfs: %v", lists)
	}
	// Setuid survived the cache round trip; sudo is useless without it.
	if fi, err := os.Stat(filepath.Join(root, "usr/bin/sudo")); err == nil && fi.Mode()&os.ModeSetuid == 0 {
		t.Errorf("/usr/bin/sudo lost its setuid bit: %v", fi.Mode())
	}

	// The tools run, and user really gets root through sudo without a password.
	for _, c := range [][]string{
		{"/usr/bin/python3", "-c", "import ssl, sqlite3, venv; print(6*7)"},
		{"/usr/bin/node", "-e", "console.log(6*7)"},
		{"/usr/sbin/chroot", "--userspec=1000:1000", "/", "/usr/bin/sudo", "-n", "/bin/sh", "-c", "echo $((6*7)) $(id -u)"},
	} {
		cmd := exec.Command(c[0], c[1:]...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root}
		cmd.Dir = "/"
		cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"}
		out, err := cmd.CombinedOutput()
		want := "42"
		if strings.HasSuffix(c[0], "chroot") {
			want = "42 0"
		}
		if err != nil || !strings.Contains(string(out), want) {
			t.Errorf("in rootfs %q: %v, output %q; want %q", c, err, out, want)
		}
	}
}

func readFile(t *testing.T, root, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, rel))
	if err != nil {
		t.Errorf("read /%s: %v", rel, err)
	}
	return string(b)
}

func containsLine(s string, match func(string) bool) bool {
	for l := range strings.Lines(s) {
		if match(strings.TrimSuffix(l, "\n")) {
			return true
		}
	}
	return false
}
