package gvisor

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestDiskMounts makes disks in parallel, as concurrent Creates do (they
// race for free loop devices), and checks each is its own ext4 of the
// size asked for, and that unmounting frees its loop device.
// requireDisks skips a test of sandbox disks on a host that cannot make
// them: the runtime then runs sandboxes without a size limit (diskSupport),
// which every other test covers.
func requireDisks(t *testing.T) {
	t.Helper()
	if why := diskSupport(); why != "" {
		t.Skipf("sandbox disks are not supported on this host: %s", why)
	}
}

func TestDiskMounts(t *testing.T) {
	requireRunsc(t) // root
	requireDisks(t)
	r := &Runtime{stateDir: t.TempDir(), log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	const n, sizeMB = 8, 64
	dirs := make([]string, n)
	disks := make([]*disk, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		dirs[i] = filepath.Join(r.stateDir, fmt.Sprintf("sb%d", i))
		if err := os.Mkdir(dirs[i], 0o700); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() { defer wg.Done(); disks[i], errs[i] = r.setupDisk(dirs[i], sizeMB, "") }()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, d := range dirs {
			unmountDisk(d)
		}
	})
	devs := map[uint64]bool{}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("disk %d: %v", i, err)
		}
		target := filepath.Join(dirs[i], diskMount)
		var fs unix.Statfs_t
		if err := unix.Statfs(target, &fs); err != nil || fs.Type != unix.EXT4_SUPER_MAGIC {
			t.Fatalf("disk %d: statfs type %#x, err %v; want ext4", i, fs.Type, err)
		}
		if total := fs.Blocks * uint64(fs.Bsize); total > sizeMB<<20 || total < sizeMB<<20*9/10 {
			t.Errorf("disk %d: %d bytes, want about %d MiB", i, total, sizeMB)
		}
		// ext4 keeps 2% (at most 4096 blocks) for its own metadata; -m 0
		// leaves nothing reserved for root on top.
		if fs.Bfree-fs.Bavail > sizeMB<<20/uint64(fs.Bsize)/50+1 {
			t.Errorf("disk %d: blocks reserved for root (%d free, %d available)", i, fs.Bfree, fs.Bavail)
		}
		if disks[i].BaseUsed == 0 || disks[i].BaseUsed > 1<<20 {
			t.Errorf("disk %d: fresh filesystem uses %d bytes", i, disks[i].BaseUsed)
		}
		var st unix.Stat_t
		unix.Stat(target, &st)
		if devs[st.Dev] {
			t.Errorf("disk %d shares a device with another", i)
		}
		devs[st.Dev] = true
		// The whole disk is reserved on the host (reserveImage).
		if alloc := allocated(t, filepath.Join(dirs[i], diskImage)); alloc < sizeMB<<20 || alloc > sizeMB<<20+1<<20 {
			t.Errorf("disk %d: image allocates %d bytes, want the disk's %d MiB", i, alloc, sizeMB)
		}
	}
	if got := len(loopDevicesUnder(r.stateDir)); got != n {
		t.Errorf("%d loop devices for %d disks", got, n)
	}
	for _, d := range dirs {
		if err := unmountDisk(d); err != nil {
			t.Fatal(err)
		}
	}
	if left := loopDevicesUnder(r.stateDir); len(left) > 0 {
		t.Fatalf("loop devices left after unmounting: %v", left)
	}
	if left := mountsUnder(t, r.stateDir); len(left) > 0 {
		t.Fatalf("mounts left: %v", left)
	}
}

// TestDiskLimit checks that DiskSizeMB is enforced and measured: a sandbox
// cannot write past its disk (in /tmp, bound from the overlay, nor
// elsewhere), the host's data dir grows by no more than the image, Stats
// follows what is written, and a restarted runtime still measures and
// kills the sandbox.
func TestDiskLimit(t *testing.T) {
	requireDisks(t)
	e := newEnv(t, "100.88.252.64/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	cfg := config(testID("disk"), tmpl)
	cfg.DiskSizeMB = 64
	// The image cache is made once per size; count it out of the growth.
	if _, err := e.rt.cachedImage(cfg.DiskSizeMB); err != nil {
		t.Fatal(err)
	}
	hostBefore := allocated(t, e.stateDir)
	sb, err := e.create(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, sb, 10*time.Second)
	dir := e.rt.sandboxDir(sb.ID)
	if devs := loopDevicesUnder(dir); len(devs) != 1 {
		t.Fatalf("loop devices of the sandbox: %v, want one", devs)
	}

	for _, path := range []string{"/tmp/fill", "/root/fill"} {
		code, body := post(t, sb, "/dd?mb=100&path="+path)
		t.Logf("dd 100 MiB to %s: %d %s", path, code, body)
		if code == 200 || !strings.Contains(body, "no space left on device") {
			t.Fatalf("dd 100 MiB to %s on a 64 MiB disk: %d %s, want ENOSPC", path, code, body)
		}
		// The disk took what fits, and the host no more than the disk,
		// once the disk's dirty pages are written into the image.
		syncDisk(t, dir)
		img, grown := allocated(t, filepath.Join(dir, diskImage)), allocated(t, e.stateDir)-hostBefore
		t.Logf("image allocates %d bytes, the state dir grew by %d", img, grown)
		if img < 50<<20 || img > 65<<20 {
			t.Errorf("image allocates %d bytes after filling it, want about 64 MiB", img)
		}
		if grown > 66<<20 {
			t.Errorf("the state dir grew by %d bytes, more than the 64 MiB disk", grown)
		}
		if code, body := post(t, sb, "/remove?path="+path); code != 200 {
			t.Fatalf("remove %s: %d %s", path, code, body)
		}
	}

	s0, err := e.rt.Stats(ctx, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	if code, body := post(t, sb, "/dd?mb=10&path=/root/ten"); code != 200 {
		t.Fatalf("dd 10 MiB: %d %s", code, body)
	}
	s1, err := e.rt.Stats(ctx, sb.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("DiskUsed %d before writing 10 MiB, %d after; DiskTotal %d", s0.DiskUsed, s1.DiskUsed, s1.DiskTotal)
	if s0.DiskUsed > 1<<20 {
		t.Errorf("DiskUsed %d with the fills removed, want under 1 MiB", s0.DiskUsed)
	}
	if grew := s1.DiskUsed - s0.DiskUsed; s1.DiskUsed < s0.DiskUsed || grew < 10<<20 || grew > 11<<20 {
		t.Errorf("DiskUsed grew from %d to %d writing 10 MiB", s0.DiskUsed, s1.DiskUsed)
	}
	if s1.DiskTotal != 64<<20 {
		t.Errorf("DiskTotal %d, want 64 MiB", s1.DiskTotal)
	}

	// A server restart: the disk stays mounted, the new runtime finds it.
	e.pool, e.rt = e.restart()
	s2, err := e.rt.Stats(ctx, sb.ID)
	if err != nil {
		t.Fatalf("Stats after restart: %v", err)
	}
	if s2.DiskUsed != s1.DiskUsed || s2.DiskTotal != s1.DiskTotal {
		t.Errorf("Stats after restart: DiskUsed %d, DiskTotal %d; before %d, %d", s2.DiskUsed, s2.DiskTotal, s1.DiskUsed, s1.DiskTotal)
	}
	if err := e.kill(ctx, sb.ID); err != nil {
		t.Fatalf("Kill after restart: %v", err)
	}
	// Kill leaves no loop device, mount or file (the cache aside).
	e.checkNoLeaks()
}

// TestDiskOldLayout checks sandboxes without a disk of their own: one with
// DiskSizeMB 0, and one as made before disks were enforced (upper/ in the
// sandbox dir, a DiskSizeMB recorded but no disk), which a restarted
// runtime must still measure and kill.
func TestDiskOldLayout(t *testing.T) {
	e := newEnv(t, "100.88.252.80/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	for _, name := range []string{"nodisk", "olddisk"} {
		t.Run(name, func(t *testing.T) {
			cfg := config(testID(name), tmpl)
			cfg.DiskSizeMB = 0
			sb, err := e.create(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			waitHealthy(t, sb, 10*time.Second)
			dir := e.rt.sandboxDir(sb.ID)
			for _, p := range []string{diskImage, diskMount} {
				if _, err := os.Stat(filepath.Join(dir, p)); err == nil {
					t.Fatalf("DiskSizeMB 0 made %s", p)
				}
			}
			if len(loopDevicesUnder(dir)) != 0 {
				t.Fatal("DiskSizeMB 0 attached a loop device")
			}
			wantTotal := uint64(0)
			if name == "olddisk" {
				// What the code before disks wrote: a size, and no disk.
				rec, err := e.rt.readRecord(sb.ID)
				if err != nil {
					t.Fatal(err)
				}
				rec.Config.DiskSizeMB, wantTotal = 1024, 1024<<20
				if err := writeJSON(filepath.Join(dir, recordFile), rec); err != nil {
					t.Fatal(err)
				}
				e.pool, e.rt = e.restart()
			}
			if code, body := post(t, sb, "/dd?mb=10&path=/root/ten"); code != 200 {
				t.Fatalf("dd 10 MiB: %d %s", code, body)
			}
			s, err := e.rt.Stats(ctx, sb.ID)
			if err != nil {
				t.Fatal(err)
			}
			if s.DiskUsed < 10<<20 || s.DiskUsed > 11<<20 || s.DiskTotal != wantTotal {
				t.Errorf("Stats: DiskUsed %d, DiskTotal %d; want about 10 MiB and %d", s.DiskUsed, s.DiskTotal, wantTotal)
			}
			if err := e.kill(ctx, sb.ID); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(dir); err == nil {
				t.Fatal("Kill left the sandbox dir")
			}
		})
	}
}

// TestDiskFailureCleansUp makes the disk's mount fail (a damaged cached
// image) and checks that Create leaves no loop device, mount or file, and
// that the next Create of that size formats a new image and works.
func TestDiskFailureCleansUp(t *testing.T) {
	requireDisks(t)
	e := newEnv(t, "100.88.252.96/28")
	ctx := context.Background()
	tmpl := makeTemplate(t)
	cfg := config(testID("dmg"), tmpl)
	cfg.DiskSizeMB = 32
	cached, err := e.rt.cachedImage(cfg.DiskSizeMB)
	if err != nil {
		t.Fatal(err)
	}
	zeros := make([]byte, 64<<10) // the superblocks and group descriptors
	if err := os.WriteFile(cached, zeros, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(cached, 32<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := e.create(ctx, cfg); err == nil || !strings.Contains(err.Error(), "mount") {
		t.Fatalf("Create over a damaged image: err %v, want a mount error", err)
	}
	e.checkNoLeaks()
	if _, err := os.Stat(cached); err == nil {
		t.Fatal("the damaged image is still cached")
	}
	cfg.ID = testID("dmg")
	sb, err := e.create(ctx, cfg)
	if err != nil {
		t.Fatalf("Create after the damaged image: %v", err)
	}
	waitHealthy(t, sb, 10*time.Second)
	if err := e.kill(ctx, sb.ID); err != nil {
		t.Fatal(err)
	}
}

// syncDisk writes the dirty pages of the sandbox's disk into its image.
func syncDisk(t *testing.T, dir string) {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, diskMount))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		t.Fatal(err)
	}
}

// allocated is the disk space the files under path take on its own
// filesystem (du -x): mounts below it (a sandbox's disk and overlay) are
// counted through the image that holds them, not a second time.
func allocated(tb testing.TB, path string) uint64 {
	tb.Helper()
	var total uint64
	var dev uint64
	err := filepath.Walk(path, func(p string, fi os.FileInfo, err error) error {
		if os.IsNotExist(err) {
			return nil // removed while walking (a log, a temp file)
		}
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		if p == path {
			dev = st.Dev
		} else if st.Dev != dev {
			return filepath.SkipDir
		}
		total += uint64(st.Blocks) * 512
		return nil
	})
	if err != nil {
		tb.Fatal(err)
	}
	return total
}
