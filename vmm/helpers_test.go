//go:build linux && amd64

package vmm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/testguest"
)

// waitTimeout bounds every wait on a guest. The guest's CPL0 code is
// emulated on PVM hosts (a few million instructions per second), so this is
// generous; a test that hits it fails with the console output.
const waitTimeout = 30 * time.Second

// guestImages builds (or fetches from the cache) the test guest.
func guestImages(t testing.TB) *testguest.Images {
	t.Helper()
	imgs, err := testguest.Build()
	if err != nil {
		t.Fatal(err)
	}
	return imgs
}

// console is a goroutine-safe io.Writer that records guest output and lets
// tests wait for text in it.
type console struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

func newConsole() *console { return &console{changed: make(chan struct{})} }

func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.buf.Write(p)
	close(c.changed)
	c.changed = make(chan struct{})
	return len(p), nil
}

func (c *console) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// waitFor waits until the output contains s and returns the output.
func (c *console) waitFor(t testing.TB, s string) string {
	t.Helper()
	out, err := c.waitForErr(s, waitTimeout)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func (c *console) waitForErr(s string, timeout time.Duration) (string, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		out, ch := c.buf.String(), c.changed
		c.mu.Unlock()
		if strings.Contains(out, s) {
			return out, nil
		}
		select {
		case <-ch:
		case <-deadline.C:
			return out, fmt.Errorf("no %q in guest output after %v; output:\n%s", s, timeout, out)
		}
	}
}

// guestOpts describes a test guest boot.
type guestOpts struct {
	mem      uint64
	vcpus    int
	mode     string
	tick     int
	token    string
	protocol boot.Protocol
	kernel   string // path; default the ELF
	sys      *kvm.System
	track    bool // Config.TrackDirty
	// devices adds devices (virtio ones) before the kernel is loaded.
	devices func(t testing.TB, vm *VM)
}

func (o guestOpts) cmdline() string {
	s := fmt.Sprintf("console=ttyS0 cubicle.mem=%d cubicle.cpus=%d cubicle.mode=%s", o.mem, o.vcpus, o.mode)
	if o.tick > 0 {
		s += fmt.Sprintf(" cubicle.tick=%d", o.tick)
	}
	if o.token != "" {
		s += " cubicle.token=" + o.token
	}
	return s
}

// bootGuest creates and starts a VM running the test guest. The VM is
// closed when the test ends.
func bootGuest(t testing.TB, o guestOpts) (*VM, *console) {
	t.Helper()
	testenv.RequireKVM(t)
	if o.mem == 0 {
		o.mem = 64 << 20
	}
	if o.vcpus == 0 {
		o.vcpus = 1
	}
	if o.mode == "" {
		o.mode = "idle"
	}
	if o.kernel == "" {
		o.kernel = guestImages(t).ELF
	}
	con := newConsole()
	vm, err := New(Config{MemoryBytes: o.mem, VCPUs: o.vcpus, Console: con, KVM: o.sys, TrackDirty: o.track})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	if o.devices != nil {
		o.devices(t, vm)
	}
	if err := vm.LoadKernelFile(o.kernel, o.cmdline(), o.protocol); err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	return vm, con
}

// send types s on the guest's serial port, one byte at a time (the guest
// drains its FIFO from the interrupt handler).
func send(t testing.TB, vm *VM, s string) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for i := 0; i < len(s); {
		if vm.SerialInput([]byte{s[i]}) == 1 {
			i++
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("guest does not drain its serial input")
		}
		time.Sleep(time.Millisecond)
	}
}

// waitExit waits for the VM to stop and returns Wait's result; on timeout
// it stops the VM and fails.
func waitExit(t testing.TB, vm *VM, con *console) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	err := vm.Wait(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		vm.Stop()
		t.Fatalf("VM did not stop within %v; output:\n%s", waitTimeout, con)
	}
	return err
}

// mustClean fails unless the guest ended with a clean reset.
func mustClean(t testing.TB, vm *VM, con *console) {
	t.Helper()
	if err := waitExit(t, vm, con); err != nil {
		t.Fatalf("VM ended with %v; output:\n%s", err, con)
	}
	if out := con.String(); strings.Contains(out, "PANIC") || strings.Contains(out, " bad") {
		t.Fatalf("guest reported a problem:\n%s", out)
	}
}
