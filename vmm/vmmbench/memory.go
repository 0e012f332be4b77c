//go:build linux && amd64

package vmmbench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
	"github.com/cubicle-dev/cubicle/vmm/testguest"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

// Sizes of the memory figures' guests.
const (
	// DeviceGuestMemory is the RAM of the guest whose VMM process is
	// measured.
	DeviceGuestMemory = 128 << 20
	// CloneMemory is the RAM of each clone in the clones run.
	CloneMemory = 64 << 20
	// diskSectors is the size of the measured guest's disk.
	diskSectors = 2048
)

// waitWriter is a console that reports when the guest printed a string.
type waitWriter struct {
	mu   sync.Mutex
	buf  []byte
	want string
	ch   chan struct{}
	once sync.Once
}

func newWaitWriter(want string) *waitWriter { return &waitWriter{want: want, ch: make(chan struct{})} }

func (w *waitWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	if len(w.buf) > 4096 {
		w.buf = w.buf[len(w.buf)-4096:]
	}
	if strings.Contains(string(w.buf), w.want) {
		w.once.Do(func() { close(w.ch) })
	}
	return len(p), nil
}

// wait waits for the string or the VM's end.
func (w *waitWriter) wait(vm *vmm.VM) error {
	select {
	case <-w.ch:
		return nil
	case <-vm.Done():
		return fmt.Errorf("vmmbench: guest stopped: %w", vm.Wait(context.Background()))
	case <-time.After(runTimeout):
		w.mu.Lock()
		defer w.mu.Unlock()
		return fmt.Errorf("vmmbench: no %q from the guest; it said:\n%s", w.want, w.buf)
	}
}

// MakeIdleSnapshot boots the test guest (idle, waiting for serial
// commands) with memBytes of RAM and snapshots it into dir.
func MakeIdleSnapshot(dir string, memBytes uint64) (statePath, memPath string, err error) {
	return makeGuestSnapshot(dir, memBytes, nil)
}

// MakeDeviceSnapshot is MakeIdleSnapshot with the devices of a sandbox:
// a disk (DeviceDisk's size, named vda), an entropy device (rng0) and
// vsock (vsock0, CID 3).
func MakeDeviceSnapshot(dir string, memBytes uint64) (statePath, memPath string, err error) {
	disk := filepath.Join(dir, "template.img")
	if err := os.WriteFile(disk, make([]byte, diskSectors*blk.SectorSize), 0o644); err != nil {
		return "", "", err
	}
	return makeGuestSnapshot(dir, memBytes, func(vm *vmm.VM) error {
		if _, err := vm.AddBlock("vda", blk.Config{Path: disk}); err != nil {
			return err
		}
		if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
			return err
		}
		_, err := vm.AddVsock("vsock0", vsock.Config{GuestCID: 3, UDSPath: filepath.Join(dir, "template.sock")})
		return err
	})
}

func makeGuestSnapshot(dir string, memBytes uint64, devices func(*vmm.VM) error) (statePath, memPath string, err error) {
	imgs, err := testguest.Build()
	if err != nil {
		return "", "", err
	}
	con := newWaitWriter("ready\n")
	vm, err := vmm.New(vmm.Config{MemoryBytes: memBytes, Console: con})
	if err != nil {
		return "", "", err
	}
	defer vm.Close()
	if devices != nil {
		if err := devices(vm); err != nil {
			return "", "", err
		}
	}
	cmdline := fmt.Sprintf("console=ttyS0 cubicle.mem=%d cubicle.mode=idle", memBytes)
	if err := vm.LoadKernelFile(imgs.ELF, cmdline, 0); err != nil {
		return "", "", err
	}
	if err := vm.Start(); err != nil {
		return "", "", err
	}
	if err := con.wait(vm); err != nil {
		return "", "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), runTimeout)
	defer cancel()
	if err := vm.Pause(ctx); err != nil {
		return "", "", err
	}
	statePath, memPath = filepath.Join(dir, "guest.state"), filepath.Join(dir, "guest.mem")
	if err := vm.Snapshot(statePath, memPath); err != nil {
		return "", "", err
	}
	for _, p := range []string{dir, statePath, memPath} {
		if err := os.Chmod(p, 0o755); err != nil { // readable by jailed VMMs
			return "", "", err
		}
	}
	return statePath, memPath, nil
}

// MemoryFigure is the private memory of a VMM process.
type MemoryFigure struct {
	// Total is Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup.
	Total uint64
	// Guest is Private_Clean + Private_Dirty of the guest-RAM mapping
	// alone (its /proc/<pid>/smaps entry, found by the address the VMM
	// reports in its metrics): the pages the guest touched.
	Guest uint64
	// VMM is Total - Guest: what the VMM itself costs.
	VMM uint64
}

// VMMPrivateMemory starts two VMM processes (so that, as in production,
// the binary's pages are shared and not counted as one process's private
// memory), restores the device snapshot (MakeDeviceSnapshot) in each with
// its own disk, entropy and vsock, exercises every device, and measures
// the second process.
func VMMPrivateMemory(ctx context.Context, c ProcessConfig, dir string) (MemoryFigure, error) {
	var fig MemoryFigure
	var procs []*control.Process
	defer func() {
		for _, p := range procs {
			p.Kill()
		}
	}()
	for i := range 2 {
		sc, snap := c.jailed(1000 + i)
		p, err := control.Spawn(sc)
		if err != nil {
			return fig, err
		}
		procs = append(procs, p)
		disk, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("disk%d.img", i)), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return fig, err
		}
		err = disk.Truncate(diskSectors * blk.SectorSize)
		if err == nil {
			inside, host := processPaths(p, filepath.Join(dir, fmt.Sprintf("p%d", i)))
			zero := 0
			devs := []control.Device{
				{Kind: control.KindBlock, Name: "vda", FD: &zero},
				{Kind: control.KindRNG, Name: "rng0"},
				{Kind: control.KindVsock, Name: "vsock0", CID: uint64(10 + i), UDS: inside("v.sock")},
			}
			_, err = p.Restore(ctx, snap, control.RestoreOptions{Devices: devs, Console: inside("console"),
				WaitRunning: true, Files: []*os.File{disk}})
			if err == nil {
				err = exercise(ctx, p, host("console"), host("v.sock"))
			}
		}
		disk.Close()
		if err != nil {
			return fig, err
		}
	}
	p := procs[1]
	m, err := p.Metrics(ctx)
	if err != nil {
		return fig, err
	}
	if fig.Total, err = smapsRollupPrivate(p.Pid()); err != nil {
		return fig, err
	}
	if fig.Guest, err = mappingPrivate(p.Pid(), m.GuestMemoryAddr); err != nil {
		return fig, err
	}
	fig.VMM = fig.Total - fig.Guest
	return fig, nil
}

// processPaths returns how the VMM process and this one name a file of
// the sandbox: inside a jail's root, or under dir for an unjailed process.
func processPaths(p *control.Process, dir string) (inside, host func(string) string) {
	if j := p.Jail(); j != nil {
		return func(n string) string { return "/" + n }, func(n string) string { return j.HostPath(n) }
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		dir = os.TempDir()
	}
	same := func(n string) string { return filepath.Join(dir, n) }
	return same, same
}

// exercise uses every device of a restored test guest: a disk read, an
// entropy request and a vsock echo.
func exercise(ctx context.Context, p *control.Process, console, uds string) error {
	if err := waitFileFor(console, "vsock reset cid="); err != nil {
		return err
	}
	if _, err := p.Serial(ctx, "0RG"); err != nil {
		return err
	}
	if err := waitFileFor(console, "rng 32 "); err != nil {
		return err
	}
	c, err := net.DialTimeout("unix", uds, runTimeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(runTimeout))
	r := bufio.NewReader(c)
	if _, err := io.WriteString(c, "CONNECT 1234\n"); err != nil {
		return err
	}
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "OK ") {
		return fmt.Errorf("vmmbench: vsock CONNECT: %q, %v", line, err)
	}
	msg := "memory figure\n"
	io.WriteString(c, msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(r, got); err != nil || string(got) != msg {
		return fmt.Errorf("vmmbench: vsock echo: %q, %v", got, err)
	}
	return nil
}

func waitFileFor(path, s string) error {
	deadline := time.Now().Add(runTimeout)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), s) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("vmmbench: no %q in %s; it holds:\n%s", s, path, b)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// smapsRollupPrivate is Private_Clean + Private_Dirty of a process.
func smapsRollupPrivate(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	f := smapsFields(string(b))
	return f["Private_Clean"] + f["Private_Dirty"], nil
}

// mappingPrivate is Private_Clean + Private_Dirty of the mapping that
// starts at addr in /proc/<pid>/smaps.
func mappingPrivate(pid int, addr uint64) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, err
	}
	prefix := strconv.FormatUint(addr, 16) + "-"
	var entry []string
	for _, line := range strings.Split(string(b), "\n") {
		// A mapping's header starts "start-end perms ..."; its fields are
		// "Key: value" lines.
		fs := strings.Fields(line)
		if len(fs) > 0 && strings.Contains(fs[0], "-") && !strings.HasSuffix(fs[0], ":") {
			if entry != nil {
				break
			}
			if strings.HasPrefix(line, prefix) {
				entry = []string{}
			}
			continue
		}
		if entry != nil {
			entry = append(entry, line)
		}
	}
	if entry == nil {
		return 0, fmt.Errorf("vmmbench: no mapping at %#x in /proc/%d/smaps", addr, pid)
	}
	f := smapsFields(strings.Join(entry, "\n"))
	return f["Private_Clean"] + f["Private_Dirty"], nil
}

// smapsFields parses "Key:   N kB" lines into bytes.
func smapsFields(s string) map[string]uint64 {
	out := map[string]uint64{}
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		fs := strings.Fields(v)
		if !ok || len(fs) != 2 || fs[1] != "kB" {
			continue
		}
		if n, err := strconv.ParseUint(fs[0], 10, 64); err == nil {
			out[k] += n << 10
		}
	}
	return out
}

// CloneFigure is the memory cost of clones of one snapshot kept alive.
type CloneFigure struct {
	N int
	// Source says what was measured: the memory cgroup's usage (kernel
	// memory included) or, without one, MemTotal - MemAvailable.
	Source string
	// Growth is the total growth with N clones alive; Slope the
	// least-squares slope of memory against the number of clones.
	Growth, Slope float64 // bytes, bytes per clone
	// RSSGrowth is this process's resident set growth.
	RSSGrowth float64
}

// Clones restores n clones of the idle snapshot in this process and keeps
// them all alive, each answering a serial ping, sampling memory every
// n/10 clones. It returns once they are all closed again.
func Clones(ctx context.Context, statePath, memPath string, n int, progress io.Writer) (CloneFigure, error) {
	fig := CloneFigure{N: n}
	sys, err := kvm.Open()
	if err != nil {
		return fig, err
	}
	defer sys.Close()
	st, err := snapshot.ReadFile(statePath)
	if err != nil {
		return fig, err
	}
	measure, source := memoryMeter()
	fig.Source = source
	base, err := measure()
	if err != nil {
		return fig, err
	}
	rss0 := rss()
	vms := make([]*vmm.VM, 0, n)
	defer func() { closeAll(vms) }()
	var xs, ys []float64
	step := max(n/10, 1)
	for i := range n {
		if err := ctx.Err(); err != nil {
			return fig, err
		}
		con := newWaitWriter("pong 1\n")
		vm, err := vmm.RestoreState(vmm.Config{Console: con, KVM: sys}, st, memPath)
		if err != nil {
			return fig, fmt.Errorf("clone %d: %w", i, err)
		}
		vms = append(vms, vm)
		if err := vm.Start(); err != nil {
			return fig, fmt.Errorf("clone %d: %w", i, err)
		}
		if vm.SerialInput([]byte("p")) != 1 {
			return fig, fmt.Errorf("clone %d: serial input refused", i)
		}
		if err := con.wait(vm); err != nil {
			return fig, fmt.Errorf("clone %d: %w", i, err)
		}
		if (i+1)%step == 0 || i+1 == n {
			m, err := measure()
			if err != nil {
				return fig, err
			}
			xs, ys = append(xs, float64(i+1)), append(ys, float64(m)-float64(base))
			if progress != nil {
				fmt.Fprintf(progress, "clones: %d alive, +%.0f MiB\n", i+1, ys[len(ys)-1]/(1<<20))
			}
		}
	}
	fig.Growth = ys[len(ys)-1]
	fig.Slope = slope(xs, ys)
	fig.RSSGrowth = float64(rss()) - float64(rss0)
	return fig, nil
}

// slope is the least-squares slope of ys against xs.
func slope(xs, ys []float64) float64 {
	if len(xs) < 2 {
		if len(xs) == 1 && xs[0] != 0 {
			return ys[0] / xs[0]
		}
		return 0
	}
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx += xs[i]
		sy += ys[i]
		sxx += xs[i] * xs[i]
		sxy += xs[i] * ys[i]
	}
	k := float64(len(xs))
	return (k*sxy - sx*sy) / (k*sxx - sx*sx)
}

// memoryMeter returns a function reading this process's memory cgroup
// usage (v1 memory.usage_in_bytes: pages and kernel memory charged to
// it), or MemTotal - MemAvailable when there is none.
func memoryMeter() (func() (uint64, error), string) {
	if b, err := os.ReadFile("/proc/self/cgroup"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) == 3 && parts[1] == "memory" {
				p := filepath.Join("/sys/fs/cgroup/memory", parts[2], "memory.usage_in_bytes")
				if _, err := os.Stat(p); err == nil {
					return func() (uint64, error) {
						b, err := os.ReadFile(p)
						if err != nil {
							return 0, err
						}
						return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
					}, "memory cgroup usage, kernel memory included"
				}
			}
		}
	}
	return func() (uint64, error) {
		b, err := os.ReadFile("/proc/meminfo")
		if err != nil {
			return 0, err
		}
		f := smapsFields(string(b))
		if f["MemTotal"] == 0 {
			return 0, errors.New("vmmbench: no MemTotal in /proc/meminfo")
		}
		return f["MemTotal"] - f["MemAvailable"], nil
	}, "MemTotal - MemAvailable, system-wide"
}

// rss is this process's resident set size.
func rss() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	return smapsFields(string(b))["VmRSS"]
}
