package template

// The rootfs cache. Layout of the cache directory:
//
//	lock                 flock held while a process looks up or builds a rootfs
//	debs/                debootstrap --cache-dir: downloaded .deb files, reused by rebuilds
//	rootfs/<key>.tar     a finished rootfs; present only when complete
//	rootfs/<key>.json    the recipe that made it, for people wondering what it holds
//	build/<key>-<rand>/  a rootfs being built; removed afterwards, or by the next build
//
// <key> is recipe.key(). A build holds the lock from the cache lookup until
// its tar is renamed into place, so two builders never debootstrap the same
// thing or see a half-written tar; extraction runs after the lock is released,
// from a file descriptor opened under it, which a later rebuild's rename
// cannot disturb.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// cacheKeep is how long an unused rootfs stays in the cache after a newer
// one is built; other checkouts on the machine may still want it.
const cacheKeep = 30 * 24 * time.Hour

// tarFlags make tar keep what a rootfs needs: numeric owners (the host's user
// names mean nothing here), permissions, and extended attributes, of which
// security.capability matters (ping is setcap'd rather than setuid).
var tarFlags = []string{"--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"}

type cache struct {
	dir string
	p   *progress
}

// populateFunc fills target, an empty directory, with a root filesystem.
// It runs with the cache lock held.
type populateFunc func(ctx context.Context, target string) error

// rootfs returns an open rootfs tar for key, making it with populate when the
// cache lacks it or force is set. meta, the recipe, is stored beside the tar
// for people wondering what it holds.
func (c cache) rootfs(ctx context.Context, key string, meta any, force bool, populate populateFunc) (*os.File, buildOutcome, error) {
	store := filepath.Join(c.dir, "rootfs")
	if err := os.MkdirAll(store, 0o755); err != nil {
		return nil, 0, fmt.Errorf("rootfs cache: %w", err)
	}
	unlock, err := c.lock(ctx)
	if err != nil {
		return nil, 0, err
	}
	defer unlock()

	path := filepath.Join(store, key+".tar")
	if !force {
		f, err := os.Open(path)
		if err == nil {
			now := time.Now()
			_ = os.Chtimes(path, now, now) // mtime = last use, for pruning
			c.p.printf("cache hit: %s", path)
			return f, outcomeCacheHit, nil
		}
		if !errNotExist(err) {
			return nil, 0, fmt.Errorf("rootfs cache: %w", err)
		}
		c.p.printf("cache miss: %s; building it (the first build on a machine takes a few minutes)", path)
	} else {
		c.p.printf("forced rebuild of %s", path)
	}
	if err := c.build(ctx, key, path, meta, populate); err != nil {
		return nil, 0, err
	}
	c.prune(store, key)
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, fmt.Errorf("rootfs cache: %w", err)
	}
	return f, outcomeBuilt, nil
}

// lock takes the cache's exclusive flock, waiting as long as ctx allows and
// saying once that it waits, so a second builder does not look hung.
func (c cache) lock(ctx context.Context) (unlock func(), err error) {
	path := filepath.Join(c.dir, "lock")
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("rootfs cache lock: %w", err)
	}
	// flock(2) cannot be cancelled, so poll without blocking instead.
	waiting := false
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			if waiting {
				c.p.printf("got cache lock")
			}
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("rootfs cache lock %s: %w", path, err)
		}
		if !waiting {
			c.p.printf("waiting for %s: another build holds it", path)
			waiting = true
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("rootfs cache lock %s: %w", path, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// build makes the rootfs tar for key at path: populate fills a fresh
// directory, which is then archived. Called with the lock held.
func (c cache) build(ctx context.Context, key, path string, meta any, populate populateFunc) error {
	buildDir := filepath.Join(c.dir, "build")
	if err := os.MkdirAll(buildDir, 0o755); err != nil {
		return fmt.Errorf("rootfs cache: %w", err)
	}
	// With the lock held nobody else builds, so anything here is a crashed
	// build's leftover.
	if err := removeTrees(buildDir, true); err != nil {
		return err
	}
	target, err := os.MkdirTemp(buildDir, key+"-")
	if err != nil {
		return fmt.Errorf("rootfs cache: %w", err)
	}
	defer func() {
		if err := removeTrees(target, false); err != nil {
			c.p.printf("warning: %v", err)
		}
	}()
	// debootstrap wants to create the target's top directory's contents
	// itself but is fine with an existing empty one; 0755 like any /.
	if err := os.Chmod(target, 0o755); err != nil {
		return fmt.Errorf("rootfs cache: %w", err)
	}
	if err := populate(ctx, target); err != nil {
		return err
	}

	tmp := filepath.Join(filepath.Dir(path), "."+key+".tar.tmp")
	if err := c.p.stage("archive")(writeArchive(ctx, target, tmp, c.p)); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := writeJSONAtomic(strings.TrimSuffix(path, ".tar")+".json", meta); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rootfs cache: %w", err)
	}
	return syncDir(filepath.Dir(path))
}

// debootstrap is the populateFunc of the base rootfs: debootstrap rec's
// suite and packages, then run its configure script chrooted.
func (c cache) debootstrap(rec recipe) populateFunc {
	return func(ctx context.Context, target string) error {
		if _, err := exec.LookPath("debootstrap"); err != nil {
			return fmt.Errorf("debootstrap is needed to build the rootfs (apt-get install debootstrap): %w", err)
		}
		debs := filepath.Join(c.dir, "debs")
		if err := os.MkdirAll(debs, 0o755); err != nil {
			return fmt.Errorf("rootfs cache: %w", err)
		}
		args := []string{
			"--variant=" + rec.Variant,
			"--arch=" + rec.Arch,
			"--components=main",
			"--include=" + strings.Join(rec.Packages, ","),
			"--cache-dir=" + debs,
			rec.Suite, target, rec.Mirror,
		}
		deb := exec.CommandContext(ctx, "debootstrap", args...)
		deb.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
		if err := c.p.stage("debootstrap")(runLogged(deb, c.p, "debootstrap", "")); err != nil {
			return err
		}
		return c.configure(ctx, target, rec.Script, rec.Suite, rec.Mirror, rec.SecurityMirror)
	}
}

// configure runs script as root chrooted in target, in a private mount
// namespace, with SUITE, MIRROR and SECURITY_MIRROR set.
func (c cache) configure(ctx context.Context, target, script, suite, mirror, securityMirror string) error {
	// The chroot's apt needs a working resolver; debootstrap copied the
	// host's /etc/resolv.conf, but a symlink into /run would dangle.
	if err := copyHostResolvConf(target); err != nil {
		return err
	}
	sh := exec.CommandContext(ctx, "/bin/sh", "-c", script)
	sh.Dir = "/"
	sh.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
		"LC_ALL=C.UTF-8",
		"DEBIAN_FRONTEND=noninteractive",
		"SUITE=" + suite,
		"MIRROR=" + mirror,
		"SECURITY_MIRROR=" + securityMirror,
	}
	return c.p.stage("configure")(runLogged(sh, c.p, "configure", target))
}

// prune removes cached rootfs tars other than key's that nobody has used for
// cacheKeep. Called with the lock held; failures only cost disk space.
func (c cache) prune(store, key string) {
	tars, _ := filepath.Glob(filepath.Join(store, "*.tar"))
	for _, t := range tars {
		if filepath.Base(t) == key+".tar" {
			continue
		}
		fi, err := os.Stat(t)
		if err != nil || time.Since(fi.ModTime()) < cacheKeep {
			continue
		}
		c.p.printf("pruning unused %s", t)
		os.Remove(t)
		os.Remove(strings.TrimSuffix(t, ".tar") + ".json")
	}
}

// runLogged runs cmd with its output streamed as progress lines tagged tag.
// It runs in its own process group, so cancelling kills debootstrap's dpkg
// and apt too, and in a private mount namespace, so the /proc and /dev mounts
// it makes inside the rootfs vanish with it, even if it is killed. A
// non-empty chroot runs it chrooted there.
func runLogged(cmd *exec.Cmd, p *progress, tag, chroot string) error {
	out := p.lines(tag)
	cmd.Stdout = out
	cmd.Stderr = out
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:      true,
		Unshareflags: syscall.CLONE_NEWNS, // Go also makes / rprivate in the child
		Chroot:       chroot,
	}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 10 * time.Second
	err := cmd.Run()
	out.Close()
	if err != nil {
		// The progress has shown the last lines; the error says where
		// the rest is.
		if path := p.logFile(); path != "" {
			return fmt.Errorf("%s: %w (its output is in %s)", tag, err, path)
		}
		return fmt.Errorf("%s: %w; last output:\n%s", tag, err, out.Tail())
	}
	return nil
}

// writeArchive tars the tree at root into file dst and fsyncs it.
func writeArchive(ctx context.Context, root, dst string, p *progress) error {
	args := append([]string{"--create", "--file=" + dst, "--one-file-system", "--directory=" + root}, tarFlags...)
	args = append(args, ".")
	if err := runLogged(exec.CommandContext(ctx, "tar", args...), p, "tar", ""); err != nil {
		return err
	}
	f, err := os.Open(dst)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dst, err)
	}
	return nil
}

// extractArchive unpacks the rootfs tar read from archive into dir.
func extractArchive(ctx context.Context, archive *os.File, dir string, p *progress) error {
	args := append([]string{"--extract", "--file=-", "--same-owner", "--same-permissions", "--directory=" + dir}, tarFlags...)
	cmd := exec.CommandContext(ctx, "tar", args...)
	cmd.Stdin = archive
	return runLogged(cmd, p, "tar", "")
}

// copyHostResolvConf replaces the rootfs's /etc/resolv.conf with the content
// of the host's, following symlinks.
func copyHostResolvConf(root string) error {
	b, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return fmt.Errorf("host resolver config: %w", err)
	}
	dst := filepath.Join(root, "etc", "resolv.conf")
	os.Remove(dst) // may be a symlink; never write through it
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		return fmt.Errorf("host resolver config: %w", err)
	}
	return nil
}

// removeTrees removes path, or with children set every entry in it, after
// making sure nothing is mounted beneath: RemoveAll on a tree with a bind
// mount of the host's /dev in it would delete the host's device nodes.
// runLogged's private mount namespaces should make that impossible; this
// is the check that it did.
func removeTrees(path string, children bool) error {
	mounts, err := mountsUnder(path)
	if err != nil {
		return err
	}
	if len(mounts) > 0 {
		return fmt.Errorf("refusing to remove %s: mounted beneath it: %s", path, strings.Join(mounts, ", "))
	}
	if !children {
		return os.RemoveAll(path)
	}
	entries, err := os.ReadDir(path)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(path, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

// mountsUnder lists this mount namespace's mount points at or below dir.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	dir = filepath.Clean(dir)
	var found []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Field 5 is the mount point, with spaces and such octal-escaped.
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			found = append(found, mp)
		}
	}
	return found, sc.Err()
}

// unescapeMountinfo undoes the kernel's \ooo escaping in mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
