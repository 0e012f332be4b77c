//go:build linux && amd64

package microvm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
)

// A template snapshot is a template's guest booted once, with envd up,
// then synced, paused and saved: the VM state, its memory, and the
// sandbox disk as it was at that instant (the guest's page cache in the
// memory file and the disk agree). Every sandbox of the template restores
// it: the memory file is mapped MAP_PRIVATE (copy-on-write, shared page
// cache across sandboxes) and the disk is copied (reflink or sparse).
//
// It lives in CacheDir/microvm/<key>/ (state, memory, disk.img,
// meta.json), where key covers every input: the kernel's key, the
// template image's key, the VMM binary's hash, vCPUs, memory and disk
// size, and snapshotLayout. It is built in a temporary directory beside it
// and renamed into place, so a reader sees a whole snapshot or none; a
// lock file keeps two processes from building the same one at once.

// snapshotLayout versions the snapshot's files and boot parameters: bump
// it when either changes so that old snapshots are rebuilt.
const snapshotLayout = 1

// ErrSnapshot is wrapped by errors about an unusable template snapshot:
// truncated or corrupt files, or one built from other inputs (another
// kernel, image or VMM). The snapshot is moved aside, so the next create
// builds a new one.
var ErrSnapshot = errors.New("microvm: unusable template snapshot")

// Snapshot file names.
const (
	snapState  = "state"
	snapMemory = "memory"
	snapDisk   = "disk.img"
	snapMeta   = "meta.json"
)

// Device names, the same at the template's boot and at every restore
// (a restore attaches devices under their snapshot names).
const (
	devRootFS = "rootfs" // /dev/vda: the template image, read-only
	devDisk   = "disk"   // /dev/vdb: the sandbox's disk
	devRNG    = "rng0"
	devVsock  = "vsock0"
	devNet    = "eth0"
	guestCID  = 3
)

// snapMetaData is meta.json: the inputs the snapshot was made from, and
// what the runtime checks before it trusts the files.
type snapMetaData struct {
	Layout    int    `json:"layout"`
	Key       string `json:"key"`
	KernelKey string `json:"kernelKey"`
	ImageKey  string `json:"imageKey"`
	VMMHash   string `json:"vmmHash"`
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memoryMiB"`
	DiskMB    int    `json:"diskMB"`
	// MemorySHA256 is the memory file's hash, checked once per Runtime.
	MemorySHA256 string    `json:"memorySHA256"`
	Created      time.Time `json:"created"`
}

// templateSnapshot is a usable snapshot's files.
type templateSnapshot struct {
	Dir   string
	Image string // the template image it was booted from
	Meta  snapMetaData
}

func (s *templateSnapshot) files() control.Snapshot {
	return control.Snapshot{State: filepath.Join(s.Dir, snapState), Memory: filepath.Join(s.Dir, snapMemory)}
}

func (s *templateSnapshot) disk() string { return filepath.Join(s.Dir, snapDisk) }

// snapshotEntry serialises the loading (and building) of one key.
type snapshotEntry struct {
	mu   sync.Mutex
	snap *templateSnapshot // verified, once loaded
}

// cmdline is the kernel command line of every template boot (the
// contract in guest/init).
func cmdline(memoryMiB int) string {
	return fmt.Sprintf("console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro rootfstype=ext4 "+
		"init=/.cubicle/cubicle cubicle.ip=%s/%d cubicle.gw=%s cubicle.mem=%d -- init",
		network.GuestAddr, network.GuestSubnet.Bits(), network.GuestGateway, memoryMiB)
}

func (r *Runtime) snapshotRoot() string { return filepath.Join(r.opts.CacheDir, "microvm") }

// vmmHash is the VMM binary's SHA-256, computed once.
func (r *Runtime) vmmHash() (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.vmmSum != "" {
		return r.vmmSum, nil
	}
	sum, err := hashFile(r.opts.VMM)
	if err != nil {
		return "", fmt.Errorf("microvm: hash VMM binary: %w", err)
	}
	r.vmmSum = sum
	return sum, nil
}

func hashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// wantMeta is what the snapshot for cfg must have been made from.
func (r *Runtime) wantMeta(cfg runtime.Config, img Image) (snapMetaData, error) {
	vh, err := r.vmmHash()
	if err != nil {
		return snapMetaData{}, err
	}
	m := snapMetaData{Layout: snapshotLayout, KernelKey: r.opts.KernelKey, ImageKey: img.Key, VMMHash: vh,
		VCPUs: cfg.CPUCount, MemoryMiB: cfg.MemoryMB, DiskMB: cfg.DiskSizeMB}
	h := sha256.New()
	fmt.Fprintf(h, "layout %d\nkernel %s\nimage %s\nvmm %s\nvcpus %d\nmemory %d\ndisk %d\n",
		m.Layout, m.KernelKey, m.ImageKey, m.VMMHash, m.VCPUs, m.MemoryMiB, m.DiskMB)
	m.Key = hex.EncodeToString(h.Sum(nil))[:24]
	return m, nil
}

// snapshot returns the verified template snapshot for cfg, building it
// when there is none.
func (r *Runtime) snapshot(ctx context.Context, cfg runtime.Config) (*templateSnapshot, error) {
	img, err := r.opts.Image(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("microvm: template image: %w", err)
	}
	want, err := r.wantMeta(cfg, img)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	e := r.snaps[want.Key]
	if e == nil {
		e = &snapshotEntry{}
		r.snaps[want.Key] = e
	}
	r.mu.Unlock()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.snap != nil {
		return e.snap, nil
	}
	dir := filepath.Join(r.snapshotRoot(), want.Key)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		// The build outlives a caller that gives up (BootTimeout bounds
		// it): the next create would only have to start it again.
		if err := r.buildLocked(context.WithoutCancel(ctx), img, want); err != nil {
			return nil, err
		}
	}
	s, err := loadSnapshot(dir, img.Path, want)
	if err != nil {
		bad := fmt.Sprintf("%s.bad-%d", dir, time.Now().UnixNano())
		if rerr := os.Rename(dir, bad); rerr == nil {
			r.log.Error("template snapshot unusable; moved aside, the next create rebuilds it", "dir", bad, "err", err)
		}
		return nil, err
	}
	e.snap = s
	return s, nil
}

// loadSnapshot checks the snapshot in dir against want and returns it.
func loadSnapshot(dir, image string, want snapMetaData) (*templateSnapshot, error) {
	b, err := os.ReadFile(filepath.Join(dir, snapMeta))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrSnapshot, dir, err)
	}
	var m snapMetaData
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("%w: %s: meta.json: %w", ErrSnapshot, dir, err)
	}
	switch {
	case m.KernelKey != want.KernelKey:
		return nil, fmt.Errorf("%w: %s was made for guest kernel %s, this runtime boots %s", ErrSnapshot, dir, m.KernelKey, want.KernelKey)
	case m.ImageKey != want.ImageKey:
		return nil, fmt.Errorf("%w: %s was made from template image %s, not %s", ErrSnapshot, dir, m.ImageKey, want.ImageKey)
	case m.VMMHash != want.VMMHash:
		return nil, fmt.Errorf("%w: %s was made by another VMM binary", ErrSnapshot, dir)
	case m.Layout != want.Layout || m.VCPUs != want.VCPUs || m.MemoryMiB != want.MemoryMiB || m.DiskMB != want.DiskMB:
		return nil, fmt.Errorf("%w: %s is for layout %d, %d vCPUs, %d MiB, %d MB disk; want %d, %d, %d, %d", ErrSnapshot, dir,
			m.Layout, m.VCPUs, m.MemoryMiB, m.DiskMB, want.Layout, want.VCPUs, want.MemoryMiB, want.DiskMB)
	}
	st, err := snapshot.ReadFile(filepath.Join(dir, snapState))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrSnapshot, dir, err)
	}
	if len(st.VCPUs) != m.VCPUs {
		return nil, fmt.Errorf("%w: %s: state has %d vCPUs, meta.json %d", ErrSnapshot, dir, len(st.VCPUs), m.VCPUs)
	}
	mem := filepath.Join(dir, snapMemory)
	fi, err := os.Stat(mem)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrSnapshot, dir, err)
	}
	if uint64(fi.Size()) != st.MemSize {
		return nil, fmt.Errorf("%w: %s: memory file is %d bytes, the state says %d (truncated?)", ErrSnapshot, dir, fi.Size(), st.MemSize)
	}
	sum, err := hashFile(mem)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrSnapshot, dir, err)
	}
	if sum != m.MemorySHA256 {
		return nil, fmt.Errorf("%w: %s: memory file's hash %s, meta.json says %s (corrupt)", ErrSnapshot, dir, sum[:16], m.MemorySHA256[:min(16, len(m.MemorySHA256))])
	}
	di, err := os.Stat(filepath.Join(dir, snapDisk))
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrSnapshot, dir, err)
	}
	if di.Size() != int64(m.DiskMB)<<20 {
		return nil, fmt.Errorf("%w: %s: disk is %d bytes, want %d (truncated?)", ErrSnapshot, dir, di.Size(), int64(m.DiskMB)<<20)
	}
	// Jailed VMMs (uid 65534) read the state and memory files through a
	// read-only bind mount of dir; the cache root above stays 0700.
	for p, mode := range map[string]os.FileMode{dir: 0o755, filepath.Join(dir, snapState): 0o644, mem: 0o644} {
		if err := os.Chmod(p, mode); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrSnapshot, err)
		}
	}
	return &templateSnapshot{Dir: dir, Image: image, Meta: m}, nil
}

// buildLocked boots img once and snapshots it into the cache under
// want.Key, unless another process did meanwhile (lock file).
func (r *Runtime) buildLocked(ctx context.Context, img Image, want snapMetaData) (err error) {
	root := r.snapshotRoot()
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("microvm: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(root, want.Key+".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("microvm: %w", err)
	}
	defer lock.Close()
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("microvm: lock %s: %w", lock.Name(), err)
	}
	final := filepath.Join(root, want.Key)
	if _, err := os.Stat(final); err == nil {
		return nil // another process built it
	}
	tmp, err := os.MkdirTemp(root, ".build-"+want.Key+"-")
	if err != nil {
		return fmt.Errorf("microvm: %w", err)
	}
	defer os.RemoveAll(tmp) // gone after the rename; a failure's leftovers otherwise
	start := time.Now()
	r.log.Info("building template snapshot: booting the template once", "key", want.Key, "image", img.Path)
	if err := r.bootAndSnapshot(ctx, img, want, tmp); err != nil {
		return err
	}
	sum, err := hashFile(filepath.Join(tmp, snapMemory))
	if err != nil {
		return fmt.Errorf("microvm: %w", err)
	}
	m := want
	m.MemorySHA256, m.Created = sum, time.Now().UTC()
	b, _ := json.MarshalIndent(m, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, snapMeta), b, 0o600); err != nil {
		return fmt.Errorf("microvm: %w", err)
	}
	for _, name := range []string{snapState, snapMemory, snapDisk, snapMeta} {
		if err := syncPath(filepath.Join(tmp, name)); err != nil {
			return fmt.Errorf("microvm: sync %s: %w", name, err)
		}
	}
	for _, name := range []string{"console.log", "vsock.sock", "jail"} {
		os.RemoveAll(filepath.Join(tmp, name)) // a build's, not the snapshot's
	}
	if err := os.Rename(tmp, final); err != nil {
		return fmt.Errorf("microvm: %w", err)
	}
	syncPath(root)
	r.log.Info("template snapshot built", "key", want.Key, "took", time.Since(start))
	return nil
}

func syncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// bootAndSnapshot boots the template in a VMM process of its own with
// the contract's devices, waits for envd, syncs, pauses and saves the
// VM into dir (state, memory; disk.img is the disk it booted with).
func (r *Runtime) bootAndSnapshot(ctx context.Context, img Image, m snapMetaData, dir string) (err error) {
	ctx, cancel := context.WithTimeout(ctx, r.opts.BootTimeout)
	defer cancel()
	format := r.opts.FormatDisk
	if format == nil {
		format = makeDisk
	}
	if err := format(filepath.Join(dir, snapDisk), m.DiskMB); err != nil {
		return fmt.Errorf("microvm: template disk: %w", err)
	}
	// The build's network: a tap like any sandbox's, so that the
	// snapshot holds the same device state every clone restores into.
	netID := "tmpl-" + m.Key[:16] + "-" + randHex(4)
	att, err := r.opts.Network.Setup(ctx, netID)
	if err != nil {
		return fmt.Errorf("microvm: template network: %w", err)
	}
	defer func() {
		if terr := r.opts.Network.Teardown(context.WithoutCancel(ctx), netID); terr != nil {
			r.log.Warn("removing the template build's network", "err", terr)
		}
	}()
	tap, err := openTap(att)
	if err != nil {
		return err
	}
	defer tap.Close()
	image, err := os.Open(img.Path)
	if err != nil {
		return fmt.Errorf("microvm: template image: %w", err)
	}
	defer image.Close()
	disk, err := os.OpenFile(filepath.Join(dir, snapDisk), os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("microvm: template disk: %w", err)
	}
	defer disk.Close()
	// The paths as the VMM sees them (vmm*) and as the host does. A
	// jailed build VMM (jail.go) has its root in dir/jail, the kernel
	// mounted read-only, no memory limit (it writes the snapshot; the
	// template is the operator's), and the snapshot is moved out of its
	// root afterwards.
	sc := control.SpawnConfig{Path: r.opts.VMM, Args: []string{"vmm"}, Stderr: r.vmmLog()}
	kernel, uds, console := r.opts.Kernel, filepath.Join(dir, "vsock.sock"), filepath.Join(dir, "console.log")
	vmmUDS, vmmConsole := uds, console
	vmmSnap := control.Snapshot{State: filepath.Join(dir, snapState), Memory: filepath.Join(dir, snapMemory)}
	var jailRoot string
	if j := r.opts.Jail; j != nil {
		jailRoot = filepath.Join(dir, "jail")
		sc.Jail = &jailer.Config{
			Root:      jailRoot,
			UID:       j.UID,
			GID:       j.GID,
			Cgroup:    "cubicle-vmm-build-" + randHex(6),
			Mounts:    []jailer.Mount{{Source: r.opts.Kernel, Target: "/vmlinux", ReadOnly: true}},
			PidsLimit: orDefault(j.PidsLimit, DefaultPidsLimit),
		}
		kernel, vmmUDS, vmmConsole = "/vmlinux", jailVsock, jailConsole
		uds, console = filepath.Join(jailRoot, jailVsock), filepath.Join(jailRoot, jailConsole)
		vmmSnap = control.Snapshot{State: "/" + snapState, Memory: "/" + snapMemory}
	}
	proc, err := control.Spawn(sc)
	if err != nil {
		return fmt.Errorf("microvm: template VMM: %w", err)
	}
	defer proc.Kill()
	fail := func(what string, err error) error {
		return fmt.Errorf("microvm: template boot: %s: %w; console:\n%s", what, err, tail(console, 4096))
	}
	devs := []control.Device{
		{Kind: control.KindBlock, Name: devRootFS, FD: ptr(1), ReadOnly: true},
		{Kind: control.KindBlock, Name: devDisk, FD: ptr(2)},
		{Kind: control.KindRNG, Name: devRNG},
		{Kind: control.KindVsock, Name: devVsock, CID: guestCID, UDS: vmmUDS},
		{Kind: control.KindNet, Name: devNet, FD: ptr(0), MAC: GuestMAC.String()},
	}
	mach := control.Machine{MemoryMiB: uint64(m.MemoryMiB), VCPUs: m.VCPUs, Kernel: kernel, Cmdline: cmdline(m.MemoryMiB), Protocol: "pvh"}
	if _, err := proc.Do(ctx, control.Request{Op: control.OpConfigure, Machine: &mach, Devices: devs, Console: vmmConsole, ConsoleLimit: ConsoleLimit}, tap, image, disk); err != nil {
		return fail("configure", err)
	}
	if err := proc.Start(ctx, false); err != nil {
		return fail("start", err)
	}
	r.log.Debug("template VM started; waiting for envd", "console", console)
	vmEnded := func() bool {
		mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		m, err := proc.Metrics(mctx)
		return err == nil && m.State == "stopped"
	}
	if err := waitEnvd(ctx, uds, proc.Done(), vmEnded); err != nil {
		return fail("waiting for envd", err)
	}
	if err := withGuest(ctx, uds, func(g *guestConn) error {
		_, err := g.do(ctx, map[string]any{"op": "sync"})
		return err
	}); err != nil {
		return fail("sync", err)
	}
	r.log.Debug("template guest synced; pausing and saving it")
	if err := proc.Pause(ctx); err != nil {
		return fail("pause", err)
	}
	if err := proc.Snapshot(ctx, vmmSnap); err != nil {
		return fail("snapshot", err)
	}
	if jailRoot != "" {
		// Out of the jail, the jailed uid's no more (the files are
		// regular ones the VMM wrote: O_NOFOLLOW, checked).
		for _, name := range []string{snapState, snapMemory} {
			if err := adopt(filepath.Join(jailRoot, name), filepath.Join(dir, name)); err != nil {
				return fail("snapshot", err)
			}
		}
	}
	return nil
}

// adopt moves the regular file from (not a symbolic link) to to, owned
// by root, mode 0600.
func adopt(from, to string) error {
	f, err := os.OpenFile(from, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s: not a regular file", from)
	}
	if err := f.Chown(0, 0); err != nil {
		return err
	}
	if err := f.Chmod(0o600); err != nil {
		return err
	}
	return os.Rename(from, to)
}

func ptr[T any](v T) *T { return &v }

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// tail is the last n bytes of a file, for error messages. It reads a
// regular file only, not through a final symbolic link: a jailed VMM
// owns the directory of its console (jail.go).
func tail(path string, n int64) string {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK, 0)
	if err != nil {
		return "(no console: " + err.Error() + ")"
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return "(no console: not a regular file)"
	}
	off := max(fi.Size()-n, 0)
	b := make([]byte, fi.Size()-off)
	f.ReadAt(b, off)
	return strings.ToValidUTF8(string(bytes.TrimSpace(b)), "?")
}
