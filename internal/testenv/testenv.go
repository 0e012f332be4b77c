// Package testenv is cubicle's one test kit for what a test needs from the
// machine: root, a usable /dev/kvm, loop devices, a command. Each Require
// function skips the test, saying what is missing and why the test needs
// it, so that a suite run on a machine without it reports skips, never
// failures caused by the machine and never a pass that ran nothing.
package testenv

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// KVMDevice is the KVM device node (Documentation/virt/kvm/api.rst).
const KVMDevice = "/dev/kvm"

// kvmAPIVersion is what KVM_GET_API_VERSION answers on every kernel since
// 2.6.22 (linux/kvm.h: KVM_API_VERSION); kvmGetAPIVersion is
// _IO(KVMIO, 0x00).
const (
	kvmAPIVersion    = 12
	kvmGetAPIVersion = 0xae00
)

// RequireRoot skips the test unless it runs as root; why says what for
// ("creates network namespaces").
func RequireRoot(tb testing.TB, why string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skipf("needs root (it %s); run it as root, e.g. with scripts/test.sh", why)
	}
}

var kvmOnce = sync.OnceValue(kvmProblem)

// KVMProblem says why this host cannot run KVM guests ("" when it can):
// no /dev/kvm, a node without the module behind it (ENODEV), no permission,
// or a device that does not answer KVM's API version.
func KVMProblem() string { return kvmOnce() }

func kvmProblem() string {
	fd, err := unix.Open(KVMDevice, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return "no " + KVMDevice + " on this host"
		}
		return fmt.Sprintf("%s is not usable: open: %v", KVMDevice, err)
	}
	defer unix.Close(fd)
	v, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), kvmGetAPIVersion, 0)
	if errno != 0 {
		return fmt.Sprintf("%s is not usable: KVM_GET_API_VERSION: %v", KVMDevice, errno)
	}
	if v != kvmAPIVersion {
		return fmt.Sprintf("%s answers KVM API version %d, want %d", KVMDevice, v, kvmAPIVersion)
	}
	return ""
}

// RequireKVM skips the test unless /dev/kvm can be opened and answers as
// KVM does.
func RequireKVM(tb testing.TB) {
	tb.Helper()
	if p := KVMProblem(); p != "" {
		tb.Skipf("needs KVM: %s", p)
	}
}

// RequireLoop skips the test unless loop devices can be had
// (/dev/loop-control: the loop module, and a /dev that has it).
func RequireLoop(tb testing.TB) {
	tb.Helper()
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		tb.Skipf("needs loop devices: %v", err)
	}
}

// RequireCommand skips the test unless name is on $PATH, and returns its
// path.
func RequireCommand(tb testing.TB, name string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		tb.Skipf("needs %s: %v", name, err)
	}
	return p
}

// EmulatedEnv is the environment variable scripts/nested-kvm.sh sets to 1
// in its L1 guest, where /dev/kvm is nested KVM under QEMU's software
// emulation: guest code runs 10-100x slower than on hardware, on two
// emulated CPUs.
const EmulatedEnv = "CUBICLE_TEST_EMULATED"

// Emulated reports whether the tests run under software emulation
// ($CUBICLE_TEST_EMULATED=1).
func Emulated() bool { return os.Getenv(EmulatedEnv) == "1" }

// Scale returns n, or emulated where the tests run under software
// emulation: a test that starts many guests keeps proving the same thing
// with fewer of them there, instead of running into its own time limits.
func Scale(n, emulated int) int {
	if Emulated() {
		return emulated
	}
	return n
}
