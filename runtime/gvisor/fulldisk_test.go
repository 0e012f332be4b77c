package gvisor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/runtime"
)

// smallFS mounts a fresh ext4 filesystem of sizeMB (on a loop device) for
// the test and returns where.
func smallFS(t *testing.T, sizeMB int) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "host.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	err = f.Truncate(int64(sizeMB) << 20)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	mnt := t.TempDir()
	loop, dev, err := attachLoop(img)
	if err != nil {
		t.Fatal(err)
	}
	defer loop.Close()
	if err := unix.Mount(dev, mnt, "ext4", 0, ""); err != nil {
		t.Fatalf("mount %s: %v", dev, err)
	}
	t.Cleanup(func() {
		if err := unmount(mnt); err != nil {
			t.Error(err)
		}
	})
	return mnt
}

// fillHost writes into path until its filesystem is full.
func fillHost(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{0xee}, 1<<20)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, unix.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	// Small writes take what whole MiBs could not.
	for _, err := f.Write(buf[:4096]); err == nil; _, err = f.Write(buf[:4096]) {
	}
	f.Sync()
}

// ddContent is what the probe's /dd writes: mb MiB of one pattern.
func ddContent(mb int) []byte {
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	return bytes.Repeat(buf, mb)
}

// dropCache evicts the clean pages of path from the host's page cache.
func dropCache(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}

// TestFullDataDir puts the runtime's state on a small filesystem and
// fills it from outside the sandboxes: every sandbox still gets all of
// the disk it was promised, and what it wrote and synced is there when
// read back from the device; a sandbox whose disk cannot be reserved is
// refused with ENOSPC, leaving nothing; and once space is freed, creates
// work again.
func TestFullDataDir(t *testing.T) {
	requireRunsc(t)
	requireDisks(t)
	mnt := smallFS(t, 320)
	e := newEnvAt(t, "100.88.252.112/28", filepath.Join(mnt, "state"))
	ctx := context.Background()
	tmpl := makeTemplate(t)
	const diskMB = 100

	var made []runtime.Sandbox
	var refusal error
	for i := 0; i < 5 && refusal == nil; i++ {
		cfg := config(testID(fmt.Sprintf("full%d", i)), tmpl)
		cfg.DiskSizeMB = diskMB
		sb, err := e.create(ctx, cfg)
		if err != nil {
			refusal = err
			if _, serr := os.Stat(e.rt.sandboxDir(cfg.ID)); serr == nil {
				t.Errorf("the refused sandbox left its directory")
			}
			break
		}
		waitHealthy(t, sb, 10*time.Second)
		made = append(made, sb)
	}
	t.Logf("%d sandboxes of %d MiB on a 320 MiB filesystem; then: %v", len(made), diskMB, refusal)
	if len(made) == 0 || len(made) >= 4 {
		t.Fatalf("%d sandboxes with %d MiB disks fit on 320 MiB: their disks are not reserved", len(made), diskMB)
	}
	if !errors.Is(refusal, unix.ENOSPC) || !strings.Contains(refusal.Error(), "reserve") {
		t.Fatalf("the create the host cannot back failed with %v, want ENOSPC from reserving its disk", refusal)
	}

	filler := filepath.Join(mnt, "filler")
	fillHost(t, filler)
	var fs unix.Statfs_t
	unix.Statfs(mnt, &fs)
	t.Logf("host filesystem full: %d blocks available", fs.Bavail)

	want := sha256.Sum256(ddContent(60))
	for _, s := range made {
		id := s.ID
		// All of the promised disk is there: 60 MiB fit and are synced ...
		if code, body := post(t, s, "/dd?mb=60&path=/root/data"); code != 200 {
			t.Fatalf("sandbox %s: writing 60 MiB of its %d MiB disk on a full host: %d %s", id, diskMB, code, body)
		}
		// ... and past the disk's size the sandbox is told so, clearly.
		code, body := post(t, s, "/dd?mb=100&path=/root/more")
		if code == 200 || !strings.Contains(body, "no space left on device") {
			t.Fatalf("sandbox %s: writing past its disk: %d %s, want ENOSPC", id, code, body)
		}
		// What was synced is on the device: flush, drop every cached
		// copy on the host, and read it back through the sandbox.
		dir := e.rt.sandboxDir(id)
		syncDisk(t, dir)
		dropCache(t, filepath.Join(dir, diskMount, "upper", "root", "data"))
		dropCache(t, filepath.Join(dir, diskImage))
		resp, err := client.Get(url(s, "/read?path=/root/data"))
		if err != nil {
			t.Fatal(err)
		}
		var got bytes.Buffer
		got.ReadFrom(resp.Body)
		resp.Body.Close()
		if sum := sha256.Sum256(got.Bytes()); resp.StatusCode != 200 || sum != want {
			t.Fatalf("sandbox %s: read back %d bytes (status %d) that differ from the 60 MiB it synced", id, got.Len(), resp.StatusCode)
		}
		var dfs unix.Statfs_t
		if err := unix.Statfs(filepath.Join(dir, diskMount), &dfs); err != nil || dfs.Flags&unix.ST_RDONLY != 0 {
			t.Fatalf("sandbox %s: its disk went read-only (an I/O error): %v", id, err)
		}
	}

	// Space freed: a create works again.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	for _, s := range made {
		if err := e.kill(ctx, s.ID); err != nil {
			t.Fatal(err)
		}
	}
	cfg := config(testID("fullagain"), tmpl)
	cfg.DiskSizeMB = diskMB
	sb, err := e.create(ctx, cfg)
	if err != nil {
		t.Fatalf("create after freeing space: %v", err)
	}
	waitHealthy(t, sb, 10*time.Second)
}
