//go:build linux && amd64

package vmm

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"golang.org/x/sys/unix"
)

// checkOutput fails unless out contains every line in want.
func checkOutput(t *testing.T, out string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("guest output lacks %q:\n%s", w, out)
		}
	}
}

// cpuidLine is what the guest prints about the CPUID the VMM gave it.
func cpuidLine(vm *VM) string {
	if vm.PVM() {
		return "cpuid hv=0x40000002 pvm=0x4d5650 physbits=43 apic=0 hypervisor=1\n"
	}
	return " apic=0 hypervisor=1\n"
}

func TestBootSerial(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mode: "exit", token: "b00t-7oken"})
	mustClean(t, vm, con)
	checkOutput(t, con.String(),
		"boot linux64 header ok\n",
		"hello from guest\n",
		"cmdline [console=ttyS0 cubicle.mem=67108864 cubicle.cpus=1 cubicle.mode=exit cubicle.token=b00t-7oken]\n",
		"token=b00t-7oken\n",
		"e820 ok entries=3 ram=67108864\n",
		"mem ok\n",
		cpuidLine(vm),
		"bye 0\n")
}

func TestBootBzImage(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mode: "exit", kernel: guestImages(t).BzImage, token: "bz"})
	mustClean(t, vm, con)
	checkOutput(t, con.String(), "boot linux64 header ok\n", "token=bz\n", "e820 ok entries=3", "bye 0\n")
}

func TestBootPVH(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mode: "exit", protocol: boot.ProtocolPVH, token: "pvh"})
	mustClean(t, vm, con)
	checkOutput(t, con.String(), "boot pvh header ok\n", "token=pvh\n", "e820 ok entries=3 ram=67108864\n", "mem ok\n", "bye 0\n")
}

// TestBootMemoryAboveHole gives the guest 5 GiB: RAM is split around the
// 32-bit MMIO hole into two KVM slots, and the guest's e820 check sees
// [1 MiB, 3 GiB) and [4 GiB, 6 GiB).
func TestBootMemoryAboveHole(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mode: "exit", mem: 5 << 30})
	mustClean(t, vm, con)
	checkOutput(t, con.String(), fmt.Sprintf("e820 ok entries=4 ram=%d\n", uint64(5<<30)), "mem ok\n")
}

func TestBootMultiVCPU(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{vcpus: 3})
	con.waitFor(t, "ready\n")
	send(t, vm, "q")
	mustClean(t, vm, con)
	checkOutput(t, con.String(), "mp cpus=3 ok\n", "bye 1\n")
}

// TestSerialInterrupt types on the guest's serial port; the guest takes
// the receive interrupt through the IOAPIC and answers.
func TestSerialInterrupt(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{})
	con.waitFor(t, "ready\n")
	send(t, vm, "p")
	con.waitFor(t, "pong 1\n")
	send(t, vm, "pp")
	con.waitFor(t, "pong 3\n")
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// TestInterruptLineTrigger pulses GSI 10 through an irqfd (Trigger) and
// the guest counts the interrupts on IOAPIC pin 10.
func TestInterruptLineTrigger(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{})
	con.waitFor(t, "ready\n")
	line, err := vm.InterruptLine(10)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 2; i++ {
		if err := line.Trigger(); err != nil {
			t.Fatal(err)
		}
		// irqfd delivery is asynchronous (a kernel work item): ask
		// until the guest has counted the interrupt.
		want := fmt.Sprintf("irqs line10=%d\n", i)
		deadline := time.Now().Add(waitTimeout)
		for {
			send(t, vm, "r")
			if _, err := con.waitForErr(want, 200*time.Millisecond); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("guest never counted interrupt %d; output:\n%s", i, con)
			}
		}
	}
	if strings.Contains(con.String(), "irqs line10=3") {
		t.Errorf("more interrupts than triggers:\n%s", con)
	}
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// TestIOEventFD turns the guest's spin-loop writes to port 0x80 into
// eventfd signals.
func TestIOEventFD(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mode: "spin"})
	con.waitFor(t, "ready\n")
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	ev := &kvm.IOEventFD{FD: efd, Addr: 0x80, Len: 1, PIO: true}
	if err := vm.RegisterIOEventFD(ev); err != nil {
		t.Fatal(err)
	}
	var buf [8]byte
	deadline := time.Now().Add(waitTimeout)
	for {
		n, err := unix.Read(efd, buf[:])
		if n == 8 && binary.LittleEndian.Uint64(buf[:]) > 0 {
			break
		}
		if err != nil && !errors.Is(err, unix.EAGAIN) {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatal("ioeventfd never signalled")
		}
		time.Sleep(time.Millisecond)
	}
	if err := vm.UnregisterIOEventFD(ev); err != nil {
		t.Fatal(err)
	}
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// TestGarbageMMIO has the guest read and write unclaimed MMIO addresses
// (in the MMIO hole, beyond RAM) and ports: reads return all ones, writes
// vanish, and the VM carries on.
func TestGarbageMMIO(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{})
	con.waitFor(t, "ready\n")
	send(t, vm, "m")
	con.waitFor(t, "mmio ok\n")
	send(t, vm, "p")
	con.waitFor(t, "pong 2\n")
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// TestTripleFault: a guest that triple-faults stops the VM with an
// ExitError carrying KVM_EXIT_SHUTDOWN and the registers.
func TestTripleFault(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{})
	con.waitFor(t, "ready\n")
	send(t, vm, "x")
	err := waitExit(t, vm, con)
	var ee *ExitError
	if !errors.Is(err, ErrTripleFault) || !errors.As(err, &ee) {
		t.Fatalf("Wait = %v, want an ExitError wrapping ErrTripleFault; output:\n%s", err, con)
	}
	if ee.Regs == nil || ee.Sregs == nil || !strings.Contains(err.Error(), "rip=0x") || ee.Reason != kvm.ExitShutdown {
		t.Errorf("diagnostic lacks registers: %v", err)
	}
}

// TestEmulationFailure has the guest execute popcnt at CPL0. Under VT-x
// or SVM it simply runs; the PVM emulator refuses it, and the VM must stop
// with an ExitError for KVM_EXIT_INTERNAL_ERROR carrying the registers.
func TestEmulationFailure(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{})
	con.waitFor(t, "ready\n")
	send(t, vm, "e")
	if !vm.PVM() {
		con.waitFor(t, "popcnt 8\n")
		send(t, vm, "q")
		mustClean(t, vm, con)
		return
	}
	err := waitExit(t, vm, con)
	var ee *ExitError
	if !errors.Is(err, ErrInternal) || !errors.As(err, &ee) || ee.Reason != kvm.ExitInternalError || ee.Regs == nil {
		t.Fatalf("Wait = %v, want an ExitError wrapping ErrInternal; output:\n%s", err, con)
	}
	if !strings.Contains(err.Error(), "suberror") || !strings.Contains(err.Error(), "rip=0x") {
		t.Errorf("diagnostic lacks detail: %v", err)
	}
}

// TestGarbageKernelRejected feeds LoadKernel things that are not kernels.
func TestGarbageKernelRejected(t *testing.T) {
	testenv.RequireKVM(t)
	elfImg, err := os.ReadFile(guestImages(t).ELF)
	if err != nil {
		t.Fatal(err)
	}
	elf32 := bytes.Clone(elfImg)
	elf32[4] = 1 // ELFCLASS32
	arm := bytes.Clone(elfImg)
	binary.LittleEndian.PutUint16(arm[18:], 183) // EM_AARCH64
	for name, img := range map[string][]byte{
		"empty":     {},
		"random":    bytes.Repeat([]byte{0xde, 0xad, 0xbe, 0xef}, 1000),
		"truncated": elfImg[:100],
		"elf32":     elf32,
		"aarch64":   arm,
		"script":    []byte("#!/bin/sh\necho hi\n"),
	} {
		t.Run(name, func(t *testing.T) {
			vm, err := New(Config{MemoryBytes: 16 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer vm.Close()
			err = vm.LoadKernel(bytes.NewReader(img), int64(len(img)), "", boot.ProtocolLinux64)
			if !errors.Is(err, boot.ErrUnsupportedKernel) {
				t.Fatalf("LoadKernel = %v, want ErrUnsupportedKernel", err)
			}
			if err := vm.Start(); !errors.Is(err, ErrState) {
				t.Errorf("Start without a kernel = %v, want ErrState", err)
			}
		})
	}
}

// TestPauseResume pauses a ticking guest: no output while paused, ticks
// continue after Resume.
func TestPauseResume(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mode: "tick", tick: 2000, vcpus: 2})
	con.waitFor(t, "tick 2\n")
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	for round := 0; round < 3; round++ {
		if err := vm.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		if err := vm.Pause(ctx); !errors.Is(err, ErrState) {
			t.Errorf("second Pause = %v, want ErrState", err)
		}
		before := con.String()
		time.Sleep(200 * time.Millisecond)
		if after := con.String(); after != before {
			t.Fatalf("guest wrote while paused: %q", strings.TrimPrefix(after, before))
		}
		next := strings.Count(before, "tick ") + 2
		if err := vm.Resume(); err != nil {
			t.Fatal(err)
		}
		con.waitFor(t, fmt.Sprintf("tick %d\n", next))
	}
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// TestStop stops a spinning guest from the host.
func TestStop(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{mode: "spin"})
	con.waitFor(t, "ready\n")
	vm.Stop()
	if err := waitExit(t, vm, con); !errors.Is(err, ErrStopped) {
		t.Fatalf("Wait = %v, want ErrStopped", err)
	}
	if err := vm.Resume(); !errors.Is(err, ErrState) {
		t.Errorf("Resume after Stop = %v, want ErrState", err)
	}
}

func TestSnapshotNeedsPause(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{})
	con.waitFor(t, "ready\n")
	dir := t.TempDir()
	err := vm.Snapshot(filepath.Join(dir, "s"), filepath.Join(dir, "m"))
	if !errors.Is(err, ErrState) {
		t.Fatalf("Snapshot of a running VM = %v, want ErrState", err)
	}
}
