//go:build linux && amd64

package control

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/testguest"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

// vmmEnv makes the test binary a VMM process (see TestMain).
const vmmEnv = "CONTROL_TEST_VMM"

// waitTimeout bounds every wait on a guest or a process.
const waitTimeout = 30 * time.Second

func TestMain(m *testing.M) {
	if os.Getenv(vmmEnv) != "" {
		log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		if err := Main(context.Background(), MainConfig{ControlFD: ControlFD, Logger: log}); err != nil {
			fmt.Fprintln(os.Stderr, "vmm:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// spawnConfig makes this test binary the VMM process.
func spawnConfig(jail *jailer.Config) SpawnConfig {
	return SpawnConfig{
		Path:   os.Args[0],
		Env:    append(os.Environ(), vmmEnv+"=1", "GORACE=atexit_sleep_ms=0"),
		Jail:   jail,
		Stderr: os.Stderr,
	}
}

// waitFile waits until the file at path contains s.
func waitFile(t testing.TB, path, s string) string {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), s) {
			return string(b)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in %s after %v; it holds:\n%s", s, path, waitTimeout, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// typeOn sends s to the guest's serial port through the process.
func typeOn(t testing.TB, c *Client, s string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	for s != "" {
		n, err := c.Serial(ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		s = s[n:]
		if s != "" {
			time.Sleep(time.Millisecond)
		}
	}
}

// vsockEcho connects to guest port 1234 through the Unix socket uds and
// checks that msg comes back.
func vsockEcho(t testing.TB, uds, msg string) {
	t.Helper()
	c, err := net.DialTimeout("unix", uds, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(waitTimeout))
	r := bufio.NewReader(c)
	fmt.Fprintf(c, "CONNECT 1234\n")
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "OK ") {
		t.Fatalf("CONNECT: %q, %v", line, err)
	}
	io.WriteString(c, msg)
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(r, got); err != nil || string(got) != msg {
		t.Fatalf("echo: %q, %v", got, err)
	}
}

// guestDevices are the devices of the test guests here; the disk is the
// request's descriptor 0.
func guestDevices(cid uint64, uds string) []Device {
	zero := 0
	return []Device{
		{Kind: KindBlock, Name: "vda", FD: &zero, Serial: "ctl"},
		{Kind: KindRNG, Name: "rng0"},
		{Kind: KindVsock, Name: "vsock0", CID: cid, UDS: uds},
	}
}

func newDisk(t testing.TB, dir, name, tag string) *os.File {
	t.Helper()
	b := make([]byte, 64*blk.SectorSize)
	copy(b, "sector 0 "+tag+"|")
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestProcessLifecycle drives a VMM process through the whole protocol:
// configure (boot the test guest with a disk passed as a descriptor, an
// entropy device and vsock), start, use the devices, pause, snapshot,
// stop; then a second process restores the snapshot cold, and the guest
// carries on with new devices.
func TestProcessLifecycle(t *testing.T) {
	testenv.RequireKVM(t)
	imgs, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
	defer cancel()

	p, err := Spawn(spawnConfig(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	console := filepath.Join(dir, "console1")
	uds := filepath.Join(dir, "v1.sock")
	err = p.Configure(ctx, Machine{MemoryMiB: 32, VCPUs: 1, Kernel: imgs.ELF,
		Cmdline: "console=ttyS0 cubicle.mem=33554432 cubicle.mode=idle"},
		guestDevices(3, uds), console, newDisk(t, dir, "d1.img", "first"))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(ctx, true); err != nil {
		t.Fatal(err)
	}
	waitFile(t, console, "ready\n")
	typeOn(t, p.Client, "0R")
	waitFile(t, console, "head=sector 0 first|")
	vsockEcho(t, uds, "hello process\n")
	m, err := p.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if m.State != "running" || m.MemoryBytes != 32<<20 || len(m.Devices) != 3 || m.Devices[0].Counters["Reads"] != 1 ||
		m.Devices[2].Counters["ConnsOpened"] != 1 || m.GuestMemoryAddr == 0 {
		t.Errorf("metrics: %+v", m)
	}
	snap := Snapshot{State: filepath.Join(dir, "vm.state"), Memory: filepath.Join(dir, "vm.mem")}
	if err := p.Snapshot(ctx, snap); !errors.Is(err, vmm.ErrState) {
		t.Errorf("snapshot of a running VM = %v, want vmm.ErrState", err)
	}
	if err := p.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.Snapshot(ctx, snap); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("VMM process after stop: %v", err)
	}

	q, err := Spawn(spawnConfig(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Kill()
	console2, uds2 := filepath.Join(dir, "console2"), filepath.Join(dir, "v2.sock")
	prepared, err := q.Restore(ctx, snap, RestoreOptions{Devices: guestDevices(7, uds2), Console: console2,
		WaitRunning: true, Files: []*os.File{newDisk(t, dir, "d2.img", "second")}})
	if err != nil || prepared {
		t.Fatalf("restore: prepared=%v, %v", prepared, err)
	}
	waitFile(t, console2, "vsock reset cid=7\n")
	typeOn(t, q.Client, "p0R")
	waitFile(t, console2, "head=sector 0 second|")
	waitFile(t, console2, "pong ")
	vsockEcho(t, uds2, "hello restored process\n")
	if err := q.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
}

// makeTemplate snapshots a test guest with a disk, entropy and vsock into
// dir (world-readable, for jailed VMMs).
func makeTemplate(t testing.TB, dir string) Snapshot {
	t.Helper()
	imgs, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	vm, err := vmm.New(vmm.Config{MemoryBytes: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	disk := newDisk(t, t.TempDir(), "template.img", "template")
	if _, err := vm.AddBlock("vda", blk.Config{File: disk, Serial: "ctl"}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AddVsock("vsock0", vsock.Config{GuestCID: 3, UDSPath: filepath.Join(t.TempDir(), "t.sock")}); err != nil {
		t.Fatal(err)
	}
	con := &consoleBuf{ch: make(chan struct{}, 1)}
	vm.SetConsole(con)
	if err := vm.LoadKernelFile(imgs.ELF, "console=ttyS0 cubicle.mem=33554432 cubicle.mode=idle", 0); err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	con.wait(t, "ready\n")
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	snap := Snapshot{State: filepath.Join(dir, "vm.state"), Memory: filepath.Join(dir, "vm.mem")}
	if err := vm.Snapshot(snap.State, snap.Memory); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{snap.State, snap.Memory} {
		if err := os.Chmod(f, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return snap
}

// consoleBuf collects guest output for makeTemplate.
type consoleBuf struct {
	mu  sync.Mutex
	buf strings.Builder
	ch  chan struct{}
}

func (c *consoleBuf) Write(p []byte) (int, error) {
	c.mu.Lock()
	n, err := c.buf.Write(p)
	c.mu.Unlock()
	select {
	case c.ch <- struct{}{}:
	default:
	}
	return n, err
}

func (c *consoleBuf) wait(t testing.TB, s string) {
	t.Helper()
	deadline := time.After(waitTimeout)
	for {
		c.mu.Lock()
		out := c.buf.String()
		c.mu.Unlock()
		if strings.Contains(out, s) {
			return
		}
		select {
		case <-c.ch:
		case <-deadline:
			t.Fatalf("no %q from the guest", s)
		}
	}
}

// TestJailedPool: a pool of jailed VMM processes, each with the template
// prepared; two sandboxes are taken from it and restored — the disk
// passed as a descriptor, the console and the vsock socket inside the
// jail — and run their guests. The processes are confined (seccomp on,
// no capabilities) while they do so.
func TestJailedPool(t *testing.T) {
	testenv.RequireKVM(t)
	testenv.RequireRoot(t, "jails the VMM: namespaces, chroot, mknod")
	dir := t.TempDir()
	tmplDir := filepath.Join(dir, "template")
	if err := os.Mkdir(tmplDir, 0o755); err != nil {
		t.Fatal(err)
	}
	snap := makeTemplate(t, tmplDir)
	inJail := Snapshot{State: "/template/vm.state", Memory: "/template/vm.mem"}
	pool, err := NewPool(PoolConfig{
		Size:     2,
		Snapshot: inJail,
		Spawn: spawnConfig(&jailer.Config{
			Root:      filepath.Join(dir, "jails"),
			Cgroup:    fmt.Sprintf("cubicle-control-test-%d", os.Getpid()),
			Mounts:    []jailer.Mount{{Source: filepath.Dir(snap.State), Target: "/template", ReadOnly: true}},
			PidsLimit: 256,
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
	defer cancel()
	for i := range 2 {
		p, err := pool.Get(ctx)
		if err != nil {
			t.Fatal(err)
		}
		j := p.Jail()
		prepared, err := p.Restore(ctx, inJail, RestoreOptions{Devices: guestDevices(uint64(10+i), "/v.sock"),
			Console: "/console", WaitRunning: true, Files: []*os.File{newDisk(t, dir, fmt.Sprintf("d%d.img", i), fmt.Sprintf("jail%d", i))}})
		if err != nil || !prepared {
			p.Kill()
			t.Fatalf("restore: prepared=%v, %v", prepared, err)
		}
		console := j.HostPath("/console")
		waitFile(t, console, fmt.Sprintf("vsock reset cid=%d\n", 10+i))
		typeOn(t, p.Client, "0RG")
		waitFile(t, console, fmt.Sprintf("head=sector 0 jail%d|", i))
		waitFile(t, console, "rng 32 ")
		vsockEcho(t, j.HostPath("/v.sock"), fmt.Sprintf("hello jail %d\n", i))
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.Pid()))
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"CapEff:\t0000000000000000", "Seccomp:\t2", "Uid:\t65534"} {
			if !strings.Contains(string(status), want) {
				t.Errorf("jailed VMM status lacks %q:\n%s", want, status)
			}
		}
		if err := p.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	}
	if err := pool.Close(); err != nil {
		t.Errorf("pool close: %v", err)
	}
	left, _ := filepath.Glob(fmt.Sprintf("/sys/fs/cgroup/pids/cubicle-control-test-%d-*", os.Getpid()))
	if len(left) > 0 {
		t.Errorf("cgroups left behind: %v", left)
	}
}

// TestProtocolErrors: malformed and out-of-order requests get errors in
// the protocol's shape, mapped back to the VMM's sentinels, and the
// server carries on.
func TestProtocolErrors(t *testing.T) {
	testenv.RequireKVM(t)
	sys, err := kvm.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "s")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	srv, cli := conn(fds[0]), conn(fds[1])
	s := NewServer(ServerConfig{KVM: sys})
	done := make(chan error, 1)
	go func() { done <- s.ServeConn(context.Background(), srv) }()
	c := NewClient(cli)
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()

	if err := c.Start(ctx, false); !errors.Is(err, vmm.ErrState) {
		t.Errorf("start without a VM = %v, want vmm.ErrState", err)
	}
	if _, err := c.Do(ctx, Request{Op: "explode"}); !errors.Is(err, ErrBadRequest) {
		t.Errorf("unknown op = %v, want ErrBadRequest", err)
	}
	if err := c.Configure(ctx, Machine{MemoryMiB: 1}, nil, ""); !errors.Is(err, ErrBadRequest) {
		t.Errorf("1 MiB machine = %v, want ErrBadRequest", err)
	}
	if _, err := c.Restore(ctx, Snapshot{State: "/nonexistent", Memory: "/nonexistent"}, RestoreOptions{}); err == nil {
		t.Error("restore of missing files succeeded")
	}
	one := 1
	err = c.Configure(ctx, Machine{MemoryMiB: 16, Kernel: "/nonexistent"}, []Device{{Kind: KindNet, Name: "n", FD: &one}}, "")
	if !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), "descriptor 1") {
		t.Errorf("device with a missing descriptor = %v", err)
	}
	// Garbage that is not JSON, then a request that still works.
	if _, err := cli.Write([]byte("{not json\n")); err != nil {
		t.Fatal(err)
	}
	line, err := c.r.ReadString('\n')
	if err != nil || !strings.Contains(line, `"code":"invalid"`) {
		t.Errorf("answer to garbage: %q, %v", line, err)
	}
	if m, err := c.Metrics(ctx); err != nil || m.State != "none" {
		t.Errorf("metrics after errors: %+v, %v", m, err)
	}
	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("ServeConn after stop: %v", err)
	}
	c.Close()
}

// TestBoundedConsole: a guest flooding its serial console fills its log
// up to the limit and no further, with one note saying output was
// dropped, and never sees a failed write.
func TestBoundedConsole(t *testing.T) {
	var buf bytes.Buffer
	w := &boundedWriter{w: &buf, left: 100}
	for range 50 {
		if n, err := w.Write([]byte("0123456789")); n != 10 || err != nil {
			t.Fatalf("write: %d, %v", n, err)
		}
	}
	out := buf.String()
	if !strings.HasPrefix(out, strings.Repeat("0123456789", 10)+"\n[cubicle: console log limit reached") || strings.Count(out, "limit reached") != 1 {
		t.Fatalf("log of %d bytes: %q", len(out), out)
	}
}

// TestListenDetach: a VMM process detached by a listen request outlives
// the connection that spawned it (as a sandbox's VMM outlives a restart
// of the server), serves new connections on its socket, and exits by
// itself when its VM ends.
func TestListenDetach(t *testing.T) {
	testenv.RequireKVM(t)
	snap := makeTemplate(t, t.TempDir())
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
	defer cancel()
	cfg := spawnConfig(nil)
	cfg.Detach = true
	p, err := Spawn(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	console, uds, sock := filepath.Join(dir, "console"), filepath.Join(dir, "v.sock"), filepath.Join(dir, "vmm.sock")
	if _, err := p.Restore(ctx, snap, RestoreOptions{Devices: guestDevices(3, uds), Console: console, ConsoleLimit: 1 << 16,
		WaitRunning: true, Files: []*os.File{newDisk(t, dir, "d.img", "detached")}}); err != nil {
		t.Fatal(err)
	}
	if err := p.Listen(ctx, sock); err != nil {
		t.Fatal(err)
	}
	if err := p.Listen(ctx, sock); !errors.Is(err, vmm.ErrState) {
		t.Errorf("a second listen: %v, want vmm.ErrState", err)
	}
	p.Client.Close() // the spawner's connection goes, as when the server exits
	select {
	case <-p.Done():
		t.Fatalf("the detached VMM exited with its spawner's connection: %v", p.Wait(ctx))
	case <-time.After(300 * time.Millisecond):
	}
	c, err := Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if m, err := c.Metrics(ctx); err != nil || m.State != "running" {
		t.Fatalf("metrics over the socket: %+v, %v", m, err)
	}
	typeOn(t, c, "p")
	waitFile(t, console, "pong ")
	vsockEcho(t, uds, "still here\n")
	typeOn(t, c, "q") // the guest resets: the VM ends, and the process with it
	if err := p.Wait(ctx); err != nil {
		t.Fatalf("VMM process after its VM ended: %v", err)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
}

// TestConsoleLimit: a guest that prints without end fills its console
// file up to the request's ConsoleLimit, then one note, and no more; the
// guest runs on unharmed.
func TestConsoleLimit(t *testing.T) {
	testenv.RequireKVM(t)
	snap := makeTemplate(t, t.TempDir())
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*waitTimeout)
	defer cancel()
	p, err := Spawn(spawnConfig(nil))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Kill()
	console := filepath.Join(dir, "console")
	const limit = 200
	if _, err := p.Restore(ctx, snap, RestoreOptions{Devices: guestDevices(3, filepath.Join(dir, "v.sock")), Console: console,
		ConsoleLimit: limit, WaitRunning: true, Files: []*os.File{newDisk(t, dir, "d.img", "flood")}}); err != nil {
		t.Fatal(err)
	}
	for range 100 { // "pong <n>\n" a hundred times: far over the limit
		typeOn(t, p.Client, "p")
	}
	waitFile(t, console, "console log limit reached")
	vsockEcho(t, filepath.Join(dir, "v.sock"), "alive\n")
	b, _ := os.ReadFile(console)
	if note := "\n[cubicle: console log limit reached; further guest output dropped]\n"; len(b) != limit+len(note) {
		t.Fatalf("console of %d bytes, want %d + the note:\n%s", len(b), limit, b)
	}
}
