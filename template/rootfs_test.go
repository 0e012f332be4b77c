package template

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRecipeKey checks that every input of the rootfs changes the cache key
// and that nothing else does.
func TestRecipeKey(t *testing.T) {
	opts, err := BuildOptions{DataDir: "/unused"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	base, err := baseRecipe(opts)
	if err != nil {
		t.Fatal(err)
	}
	key := base.key()
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(key) {
		t.Fatalf("key %q is not 32 hex digits", key)
	}
	// Same inputs, other data and cache dirs, progress, force: same key.
	opts2, _ := BuildOptions{DataDir: "/elsewhere", CacheDir: "/c", Progress: os.Stderr, Force: true}.withDefaults()
	if r2, _ := baseRecipe(opts2); r2.key() != key {
		t.Errorf("key depends on something that is not an input of the rootfs")
	}

	changes := map[string]func(r *recipe){
		"version":         func(r *recipe) { r.Version++ },
		"suite":           func(r *recipe) { r.Suite = "trixie" },
		"variant":         func(r *recipe) { r.Variant = "buildd" },
		"arch":            func(r *recipe) { r.Arch = "arm64" },
		"mirror":          func(r *recipe) { r.Mirror = "http://mirror.example/debian" },
		"security mirror": func(r *recipe) { r.SecurityMirror = NoSecurityMirror },
		"package added":   func(r *recipe) { r.Packages = append(append([]string{}, r.Packages...), "htop") },
		"package removed": func(r *recipe) { r.Packages = r.Packages[1:] },
		"script":          func(r *recipe) { r.Script += "\ntrue\n" },
	}
	seen := map[string]string{key: "unchanged"}
	for name, change := range changes {
		r := base
		change(&r)
		k := r.key()
		if other, dup := seen[k]; dup {
			t.Errorf("changing %s gives the key of %s", name, other)
		}
		seen[k] = name
	}
	if base.key() != key {
		t.Error("changes leaked into the base recipe")
	}

	id := buildIDFor(key, DefaultEnvdVersion)
	if !regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`).MatchString(id) {
		t.Errorf("buildID %q is not in UUID form", id)
	}
	if buildIDFor(key, "9.9.9") == id {
		t.Error("buildID ignores the envd version")
	}
}

func TestDiskSizeMB(t *testing.T) {
	// Check the rule itself rather than hand-computed numbers: enough room
	// for the rootfs plus 1 GiB and 10%, a multiple of 256, at least the
	// default, and no more than 256 MiB above the need.
	for _, used := range []int64{0, 1, 350 << 20, 900 << 20, 2000 << 20, 10 << 30} {
		got := diskSizeMB(used)
		need := float64(used>>20+1024) * 1.1
		if got%256 != 0 || got < DefaultDiskSizeMB || float64(got) < need-1 || (got > DefaultDiskSizeMB && float64(got) > need+256) {
			t.Errorf("diskSizeMB(%d MiB) = %d; need %.0f", used>>20, got, need)
		}
	}
}

// TestLineWriter: a tool's output is split into lines (on \n and \r),
// blank ones dropped, into the build's log, not onto the screen.
func TestLineWriter(t *testing.T) {
	var out bytes.Buffer
	p := newProgress(&out, "x")
	p.logTo(filepath.Join(t.TempDir(), "logs"), "x")
	logPath := p.logFile()
	w := p.lines("tool")
	for _, chunk := range []string{"first li", "ne\nsecond\r\n", "\n  \n", "50%\r100%\r", "no newline"} {
		if _, err := w.Write([]byte(chunk)); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	b, err := os.ReadFile(logPath)
	p.close()
	want := "tool: first line\ntool: second\ntool: 50%\ntool: 100%\ntool: no newline\n"
	if err != nil || string(b) != want {
		t.Errorf("log: %v\n%s\nwant:\n%s", err, b, want)
	}
	if _, err := os.Stat(logPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the log of a build without a failure was kept: %v", err)
	}
	if out.Len() != 0 {
		t.Errorf("the tool's output reached the screen:\n%s", out.String())
	}
}

// TestProgressStages: not on a terminal, a stage is a line when it starts
// and one when it ends, its tool's output hidden; a failing stage shows
// its last lines and the log's path, and runLogged's error names the log.
func TestProgressStages(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("runLogged unshares a mount namespace, which needs root")
	}
	var out bytes.Buffer
	p := newProgress(&out, "base")
	p.logTo(t.TempDir(), "base")
	logPath := p.logFile()
	if err := p.stage("debootstrap")(runLogged(exec.CommandContext(context.Background(), "/bin/sh", "-c", "echo I: Retrieving; echo I: Validating"), p, "debootstrap", "")); err != nil {
		t.Fatal(err)
	}
	err := p.stage("configure")(runLogged(exec.CommandContext(context.Background(), "/bin/sh", "-c", "echo E: unable to locate package; exit 100"), p, "configure", ""))
	p.close()
	if err == nil || !strings.Contains(err.Error(), "exit status 100 (its output is in "+logPath+")") {
		t.Errorf("error: %v", err)
	}
	got := out.String()
	for _, re := range []string{
		`(?m)^\[template base\] debootstrap$`,
		`(?m)^\[template base\] debootstrap done in \d+\.\ds$`,
		`(?m)^\[template base\] configure failed after \d+\.\ds\n.*\n  E: unable to locate package\n\[template base\] the whole output is in ` + regexp.QuoteMeta(logPath) + `$`,
	} {
		if !regexp.MustCompile(re).MatchString(got) {
			t.Errorf("output does not match %s:\n%s", re, got)
		}
	}
	if strings.Contains(got, "Retrieving") || strings.ContainsAny(got, "\x1b\r") {
		t.Errorf("a tool's output or escape codes on a pipe:\n%q", got)
	}
	if b, _ := os.ReadFile(logPath); !strings.Contains(string(b), "debootstrap: I: Retrieving\n") || !strings.Contains(string(b), "configure: E: unable") {
		t.Errorf("log:\n%s", b)
	}
}

// TestCacheLock checks that a second builder waits for the first, says so,
// and gives up when its context ends. flock locks belong to open file
// descriptions, so two opens in one process exclude each other as two
// processes would.
func TestCacheLock(t *testing.T) {
	dir := t.TempDir()
	var out1, out2 bytes.Buffer
	c1 := cache{dir: dir, p: newProgress(&out1, BaseID)}
	c2 := cache{dir: dir, p: newProgress(&out2, BaseID)}
	unlock1, err := c1.lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, err := c2.lock(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second lock while held = %v, want deadline exceeded", err)
	}
	if !strings.Contains(out2.String(), "waiting for") {
		t.Errorf("waiting builder said nothing: %q", out2.String())
	}

	got := make(chan error, 1)
	go func() {
		unlock2, err := c2.lock(context.Background())
		if err == nil {
			unlock2()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("second lock returned %v while the first was held", err)
	case <-time.After(300 * time.Millisecond):
	}
	unlock1()
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("second lock not granted after the first was released")
	}
}

// TestBuildBaseFromSeededCache runs BuildBase against a cache that already
// holds a (tiny) rootfs for the current recipe: no debootstrap, so it runs
// in -short mode, and it exercises extraction, install and the up-to-date
// check.
func TestBuildBaseFromSeededCache(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("BuildBase needs root")
	}
	cacheDir := t.TempDir()
	opts, _ := BuildOptions{DataDir: "/unused", CacheDir: cacheDir}.withDefaults()
	rec, err := baseRecipe(opts)
	if err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	mustMkdir(t, filepath.Join(src, "etc"))
	mustWrite(t, filepath.Join(src, "etc", "hostname"), "seeded\n")
	mustMkdir(t, filepath.Join(src, "home", "user"))
	if err := os.Chown(filepath.Join(src, "home", "user"), 1000, 1000); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, filepath.Join(src, "suid"), "")
	if err := os.Chmod(filepath.Join(src, "suid"), 0o755|os.ModeSetuid); err != nil {
		t.Fatal(err)
	}
	mustMkdir(t, filepath.Join(cacheDir, "rootfs"))
	if err := writeArchive(context.Background(), src, filepath.Join(cacheDir, "rootfs", rec.key()+".tar"), newProgress(nil, "x")); err != nil {
		t.Fatal(err)
	}

	dataDir := t.TempDir()
	var out bytes.Buffer
	tmpl, outcome, err := buildBase(context.Background(), BuildOptions{DataDir: dataDir, CacheDir: cacheDir, Progress: &out})
	if err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	if outcome != outcomeCacheHit || !strings.Contains(out.String(), "[template base] cache hit: ") {
		t.Errorf("outcome %s, want cache hit; progress:\n%s", outcome, out.String())
	}
	reg, _ := Open(dataDir)
	root := reg.RootFS(tmpl)
	if b, err := os.ReadFile(filepath.Join(root, "etc", "hostname")); err != nil || string(b) != "seeded\n" {
		t.Errorf("extracted hostname %q, %v", b, err)
	}
	if fi, err := os.Stat(filepath.Join(root, "home", "user")); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 1000 {
		t.Errorf("owner of /home/user not kept: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(root, "suid")); err != nil || fi.Mode()&os.ModeSetuid == 0 {
		t.Errorf("setuid bit not kept: %v", err)
	}
	if tmpl.TemplateID != BaseID || tmpl.BuildID != buildIDFor(rec.key(), DefaultEnvdVersion) || tmpl.DiskSizeMB != DefaultDiskSizeMB {
		t.Errorf("template = %+v", tmpl)
	}

	out.Reset()
	again, outcome, err := buildBase(context.Background(), BuildOptions{DataDir: dataDir, CacheDir: cacheDir, Progress: &out})
	if err != nil || outcome != outcomeUpToDate || !strings.Contains(out.String(), "up to date") {
		t.Errorf("second build: %s, %v; want up to date; progress:\n%s", outcome, err, out.String())
	}
	if !again.CreatedAt.Equal(tmpl.CreatedAt) {
		t.Errorf("CreatedAt changed: %v -> %v", tmpl.CreatedAt, again.CreatedAt)
	}

	// A template from an older recipe is replaced from the cache, keeping
	// its creation time.
	stale := tmpl
	stale.BuildID = "00000000-0000-0000-0000-000000000000"
	if err := reg.Put(stale); err != nil {
		t.Fatal(err)
	}
	replaced, outcome, err := buildBase(context.Background(), BuildOptions{DataDir: dataDir, CacheDir: cacheDir})
	if err != nil || outcome != outcomeCacheHit || replaced.BuildID != tmpl.BuildID || !replaced.CreatedAt.Equal(tmpl.CreatedAt) {
		t.Errorf("rebuild over a stale template: %s, %v, %+v", outcome, err, replaced)
	}
	assertNoWorkDirs(t, reg)

	// Builders running at once, two of them into one data dir, all succeed
	// and leave one whole template in each data dir.
	shared := t.TempDir()
	dirs := []string{shared, shared, t.TempDir(), t.TempDir()}
	errs := make(chan error, len(dirs))
	for _, d := range dirs {
		go func() {
			_, _, err := buildBase(context.Background(), BuildOptions{DataDir: d, CacheDir: cacheDir})
			errs <- err
		}()
	}
	for range dirs {
		if err := <-errs; err != nil {
			t.Errorf("concurrent build: %v", err)
		}
	}
	for _, d := range dirs[1:] {
		r, _ := Open(d)
		if list, err := r.List(); err != nil || len(list) != 1 || list[0].BuildID != tmpl.BuildID {
			t.Errorf("%s after concurrent builds: %+v, %v", d, list, err)
		}
		if _, err := os.Stat(filepath.Join(r.RootFS(tmpl), "etc", "hostname")); err != nil {
			t.Errorf("%s: %v", d, err)
		}
		assertNoWorkDirs(t, r)
	}
}

func TestBuildOptionsDefaults(t *testing.T) {
	if _, err := (BuildOptions{}).withDefaults(); err == nil {
		t.Error("missing DataDir accepted")
	}
	t.Setenv("CUBICLE_CACHE_DIR", "/tmp/x-cache")
	o, err := BuildOptions{DataDir: "d"}.withDefaults()
	if err != nil || o.CacheDir != "/tmp/x-cache" || o.Mirror != DefaultMirror || o.SecurityMirror != DefaultSecurityMirror {
		t.Errorf("defaults = %+v, %v", o, err)
	}
	t.Setenv("CUBICLE_CACHE_DIR", "")
	if got := DefaultCacheDir(); got != "/var/cache/cubicle" {
		t.Errorf("DefaultCacheDir() = %q", got)
	}
}

// TestRemoveTreesRefusesMounts checks the guard that keeps a cleanup from
// deleting through a mount (such as a bind mount of the host's /dev).
func TestRemoveTreesRefusesMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting needs root")
	}
	dir := t.TempDir()
	mnt := filepath.Join(dir, "with space", "dev")
	mustMkdir(t, mnt)
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("cannot mount a tmpfs here: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	mustWrite(t, filepath.Join(mnt, "precious"), "keep")

	for _, children := range []bool{false, true} {
		err := removeTrees(dir, children)
		if err == nil || !strings.Contains(err.Error(), "with space/dev") {
			t.Errorf("removeTrees(children=%v) = %v, want a refusal naming the mount", children, err)
		}
	}
	if _, err := os.Stat(filepath.Join(mnt, "precious")); err != nil {
		t.Errorf("file under the mount is gone: %v", err)
	}
	if err := syscall.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	if err := removeTrees(dir, true); err != nil {
		t.Errorf("removeTrees after unmount: %v", err)
	}
}

// TestRunLoggedCancel checks that cancelling a build step kills its whole
// process group, not just the direct child.
func TestRunLoggedCancel(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("runLogged unshares a mount namespace, which needs root")
	}
	ctx, cancel := context.WithCancel(context.Background())
	pidFile := filepath.Join(t.TempDir(), "pid")
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", "sleep 60 & echo $! > "+pidFile+"; echo started; wait")
	var out bytes.Buffer
	done := make(chan error, 1)
	go func() { done <- runLogged(cmd, newProgress(&out, "x"), "sh", "") }()
	deadline := time.Now().Add(5 * time.Second)
	var pid int
	for pid == 0 && time.Now().Before(deadline) {
		if b, err := os.ReadFile(pidFile); err == nil && len(bytes.TrimSpace(b)) > 0 {
			pid, _ = strconv.Atoi(strings.TrimSpace(string(b)))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if pid == 0 {
		t.Fatal("child never started")
	}
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Error("cancelled command reported success")
		}
	case <-time.After(15 * time.Second):
		t.Fatal("runLogged did not return after cancel")
	}
	// The grandchild is killed too (it may linger a moment as a zombie
	// until init reaps it, which Kill(pid, 0) still sees, so read its state).
	deadline = time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
		if err != nil || strings.Contains(string(b), ") Z ") {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("grandchild %d survived the cancel", pid)
}

func TestUnescapeMountinfo(t *testing.T) {
	for in, want := range map[string]string{
		`/plain`:              "/plain",
		`/with\040space`:      "/with space",
		`/tab\011and\134back`: "/tab\tand\\back",
		`/trailing\04`:        `/trailing\04`,
	} {
		if got := unescapeMountinfo(in); got != want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestBuildBaseRepairsDamagedTemplate checks that a base whose template.json
// is unreadable is rebuilt rather than blocking every later build.
func TestBuildBaseRepairsDamagedTemplate(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("BuildBase needs root")
	}
	cacheDir, dataDir := t.TempDir(), t.TempDir()
	opts, _ := BuildOptions{DataDir: dataDir, CacheDir: cacheDir}.withDefaults()
	rec, err := baseRecipe(opts)
	if err != nil {
		t.Fatal(err)
	}
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "f"), "x")
	mustMkdir(t, filepath.Join(cacheDir, "rootfs"))
	if err := writeArchive(context.Background(), src, filepath.Join(cacheDir, "rootfs", rec.key()+".tar"), newProgress(nil, "x")); err != nil {
		t.Fatal(err)
	}
	reg, _ := Open(dataDir)
	mustMkdir(t, filepath.Join(reg.dir, BaseID, rootfsDir))
	mustWrite(t, filepath.Join(reg.dir, BaseID, metadataFile), "{damaged")

	var out bytes.Buffer
	tmpl, outcome, err := buildBase(context.Background(), BuildOptions{DataDir: dataDir, CacheDir: cacheDir, Progress: &out})
	if err != nil || outcome != outcomeCacheHit {
		t.Fatalf("build over a damaged template: %s, %v\n%s", outcome, err, out.String())
	}
	if got, err := reg.Get(BaseID); err != nil || got.BuildID != tmpl.BuildID {
		t.Errorf("Get(base) = %+v, %v", got, err)
	}
	if !strings.Contains(out.String(), "replacing unreadable template") {
		t.Errorf("no word about the damaged template:\n%s", out.String())
	}
}
