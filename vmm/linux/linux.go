//go:build linux && amd64

// Package linux is cubicle's guest kernel: the Kconfig fragment every
// sandbox kernel is built with (config), the script that builds vmlinux
// from Debian's linux-source package into a cache keyed by that fragment
// (build.sh), and the test that boots it with the VMM and reaches
// userspace. A Linux guest needs hardware virtualization (VT-x or AMD-V):
// under PVM, as on the development hosts, the kernel's own code runs in
// an emulator that cannot execute it, so CanBoot says no and the boot
// test skips.
package linux

import (
	"crypto/sha256"
	_ "embed" // config and build.sh
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
)

// SourceVersion is the Debian linux-source package the kernel is built
// from (linux-source-6.1).
const SourceVersion = "6.1"

var (
	//go:embed config
	config []byte
	//go:embed build.sh
	buildScript []byte
)

// ErrBuild is wrapped by kernel build failures.
var ErrBuild = errors.New("linux: building the guest kernel failed")

// Config returns the kernel configuration fragment.
func Config() []byte { return append([]byte(nil), config...) }

// Key is the cache key of the kernel: the first 16 hex digits of
// SHA-256 over the fragment and "linux-source-<version>\n", as build.sh
// computes it.
func Key() string {
	h := sha256.New()
	h.Write(config)
	fmt.Fprintf(h, "linux-source-%s\n", SourceVersion)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// DefaultCacheDir is where kernels are cached: $CUBICLE_CACHE_DIR/linux,
// or /var/cache/cubicle/linux.
func DefaultCacheDir() string {
	base := os.Getenv("CUBICLE_CACHE_DIR")
	if base == "" {
		base = "/var/cache/cubicle"
	}
	return filepath.Join(base, "linux")
}

// Cached returns the path of the kernel in cacheDir if it was built.
func Cached(cacheDir string) (string, bool) {
	p := filepath.Join(cacheDir, Key(), "vmlinux")
	st, err := os.Stat(p)
	return p, err == nil && st.Size() > 0
}

// Build returns the cached kernel or builds it with build.sh (minutes).
func Build(cacheDir string) (string, error) {
	if p, ok := Cached(cacheDir); ok {
		return p, nil
	}
	dir, err := os.MkdirTemp("", "cubicle-linux-script")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(dir)
	for name, b := range map[string][]byte{"config": config, "build.sh": buildScript} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o755); err != nil {
			return "", err
		}
	}
	cmd := exec.Command("bash", filepath.Join(dir, "build.sh"), cacheDir)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("%w: %w", ErrBuild, err)
	}
	p := strings.TrimSpace(string(out))
	if want := filepath.Join(cacheDir, Key(), "vmlinux"); p != want {
		return "", fmt.Errorf("%w: build.sh produced %q, expected %q", ErrBuild, p, want)
	}
	return p, nil
}

// CanBoot reports whether this host can run a Linux guest, and if not,
// why: it needs /dev/kvm with hardware virtualization (the vmx or svm CPU
// flag), not PVM.
func CanBoot() (bool, string) {
	sys, err := kvm.Open()
	if err != nil {
		return false, fmt.Sprintf("no usable KVM: %v", err)
	}
	defer sys.Close()
	if sys.PVM() {
		return false, "KVM here is PVM (no VT-x/AMD-V): guest kernel code runs in an emulator that cannot run Linux"
	}
	cpuinfo, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false, fmt.Sprintf("cannot read /proc/cpuinfo: %v", err)
	}
	for _, line := range strings.Split(string(cpuinfo), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "flags" {
			for _, f := range strings.Fields(v) {
				if f == "vmx" || f == "svm" {
					return true, ""
				}
			}
			break
		}
	}
	return false, "no VT-x/AMD-V: /proc/cpuinfo has neither the vmx nor the svm flag"
}
