//go:build linux && amd64

package vmm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/memory"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
)

// snapshotGuest pauses vm and snapshots it into a new temporary directory.
func snapshotGuest(t testing.TB, vm *VM) (statePath, memPath string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := vm.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	statePath, memPath = filepath.Join(dir, "vm.state"), filepath.Join(dir, "vm.mem")
	if err := vm.Snapshot(statePath, memPath); err != nil {
		t.Fatal(err)
	}
	return statePath, memPath
}

// restoreGuest restores a snapshot into a new VM, adds the devices and
// starts it.
func restoreGuest(t testing.TB, statePath, memPath string, sys *kvm.System, devices ...func(testing.TB, *VM)) (*VM, *console) {
	t.Helper()
	con := newConsole()
	vm, err := Restore(Config{Console: con, KVM: sys}, statePath, memPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { vm.Close() })
	for _, add := range devices {
		add(t, vm)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	return vm, con
}

var tickRE = regexp.MustCompile(`tick (\d+)\n`)

// checkTicks fails unless out holds "tick 1" .. "tick n" in order, each
// once, with n >= min.
func checkTicks(t *testing.T, out string, min int) {
	t.Helper()
	ms := tickRE.FindAllStringSubmatch(out, -1)
	for i, m := range ms {
		if n, _ := strconv.Atoi(m[1]); n != i+1 {
			t.Fatalf("tick %d where tick %d was due:\n%s", n, i+1, out)
		}
	}
	if len(ms) < min {
		t.Fatalf("%d ticks, want at least %d:\n%s", len(ms), min, out)
	}
}

// TestSnapshotRestoreMidRun snapshots a guest in the middle of its tick
// loop. The original carries on; a VM restored from the snapshot continues
// exactly where the snapshot was taken: its output, appended to the
// original's output at snapshot time, is one gapless tick sequence, and
// its counters in memory carry on.
func TestSnapshotRestoreMidRun(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mode: "tick", tick: 3000})
	con.waitFor(t, "tick 3\n")
	statePath, memPath := snapshotGuest(t, vm)
	before := con.String()
	ticks := strings.Count(before, "tick ")

	if err := vm.Resume(); err != nil {
		t.Fatal(err)
	}
	con.waitFor(t, fmt.Sprintf("tick %d\n", ticks+2))
	send(t, vm, "q")
	mustClean(t, vm, con)

	clone, ccon := restoreGuest(t, statePath, memPath, nil)
	ccon.waitFor(t, fmt.Sprintf("tick %d\n", ticks+2))
	checkTicks(t, before+ccon.String(), ticks+2)
	send(t, clone, "p")
	ccon.waitFor(t, "pong 1\n")
	send(t, clone, "q")
	mustClean(t, clone, ccon)
	checkOutput(t, ccon.String(), "bye 2\n")
}

// TestSnapshotChain restores a snapshot, snapshots the restored VM (whose
// memory is a copy-on-write mapping of the first memory file) and restores
// that: state survives two generations.
func TestSnapshotChain(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{vcpus: 2})
	con.waitFor(t, "ready\n")
	send(t, vm, "p")
	con.waitFor(t, "pong 1\n")
	s1, m1 := snapshotGuest(t, vm)
	vm.Close()

	gen1, con1 := restoreGuest(t, s1, m1, nil)
	send(t, gen1, "p")
	con1.waitFor(t, "pong 2\n")
	s2, m2 := snapshotGuest(t, gen1)
	gen1.Close()

	gen2, con2 := restoreGuest(t, s2, m2, nil)
	send(t, gen2, "pm")
	con2.waitFor(t, "mmio ok\n")
	send(t, gen2, "q")
	mustClean(t, gen2, con2)
	checkOutput(t, con2.String(), "pong 3\n", "bye 5\n")
}

// TestRestoreHundredClones restores 100 VMs (10 under emulation)
// concurrently from one snapshot; every clone answers from the same saved
// point.
func TestRestoreHundredClones(t *testing.T) {
	clones := testenv.Scale(100, 10) // see TestVirtioSnapshotClones
	vm, con := bootGuest(t, guestOpts{mem: 32 << 20})
	con.waitFor(t, "ready\n")
	send(t, vm, "pp")
	con.waitFor(t, "pong 2\n")
	statePath, memPath := snapshotGuest(t, vm)
	vm.Close()

	sys, err := kvm.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close()
	st, err := snapshot.ReadFile(statePath)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, clones)
	vms := make(chan *VM, clones)
	for i := range clones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- runClone(i, st, memPath, sys, vms)
		}()
	}
	wg.Wait()
	close(errs)
	close(vms)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	// Tear down in parallel: destroying a KVM VM takes tens of ms.
	var cwg sync.WaitGroup
	for v := range vms {
		cwg.Add(1)
		go func() { defer cwg.Done(); v.Close() }()
	}
	cwg.Wait()
}

func runClone(i int, st *snapshot.State, memPath string, sys *kvm.System, vms chan<- *VM) error {
	con := newConsole()
	vm, err := RestoreState(Config{Console: con, KVM: sys}, st, memPath)
	if err != nil {
		return fmt.Errorf("clone %d: %w", i, err)
	}
	vms <- vm
	if err := vm.Start(); err != nil {
		return fmt.Errorf("clone %d: %w", i, err)
	}
	for _, step := range []struct{ in, out string }{{"p", "pong 3\n"}, {"q", "bye 4\n"}} {
		if vm.SerialInput([]byte(step.in)) != 1 {
			return fmt.Errorf("clone %d: serial input refused", i)
		}
		if _, err := con.waitForErr(step.out, waitTimeout); err != nil {
			return fmt.Errorf("clone %d: %w", i, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := vm.Wait(ctx); err != nil {
		vm.Stop()
		return fmt.Errorf("clone %d: ended with %w; output:\n%s", i, err, con)
	}
	return nil
}

// TestRestoreRejectsBadFiles: malformed state files and memory files of
// the wrong size give clear errors, never a panic or a half-built VM.
func TestRestoreRejectsBadFiles(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mem: 16 << 20})
	con.waitFor(t, "ready\n")
	statePath, memPath := snapshotGuest(t, vm)
	good, err := os.ReadFile(statePath)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	flipped := append([]byte(nil), good...)
	flipped[len(flipped)/2] ^= 0x40
	shortMem := filepath.Join(dir, "short.mem")
	if err := os.WriteFile(shortMem, make([]byte, 8<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name            string
		state, mem      string
		want            error
		wantMsgContains string
	}{
		{"flipped bit", write("flipped", flipped), memPath, snapshot.ErrChecksum, "checksum"},
		{"truncated", write("truncated", good[:len(good)-20]), memPath, snapshot.ErrCorrupt, "length"},
		{"not a snapshot", write("garbage", []byte("hello world, not a snapshot")), memPath, snapshot.ErrNotSnapshot, "not a cubicle state file"},
		{"empty", write("empty", nil), memPath, snapshot.ErrNotSnapshot, ""},
		{"missing state", filepath.Join(dir, "nope"), memPath, os.ErrNotExist, ""},
		{"short memory file", statePath, shortMem, memory.ErrFileSize, "wrong size"},
		{"missing memory file", statePath, filepath.Join(dir, "nope.mem"), os.ErrNotExist, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			v, err := Restore(Config{}, c.state, c.mem)
			if err == nil {
				v.Close()
				t.Fatal("Restore succeeded")
			}
			if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.wantMsgContains) {
				t.Fatalf("Restore = %v, want %v", err, c.want)
			}
		})
	}

	// A snapshot with state for a device the new VM lacks refuses to start.
	st, err := snapshot.Decode(good)
	if err != nil {
		t.Fatal(err)
	}
	st.Devices = append(st.Devices, snapshot.DeviceState{Name: "virtio-blk0", Data: []byte{1}})
	v, err := RestoreState(Config{}, st, memPath)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.Start(); !errors.Is(err, ErrIncompatible) || !strings.Contains(err.Error(), "virtio-blk0") {
		t.Fatalf("Start = %v, want ErrIncompatible naming the device", err)
	}
}
