// Package testguest builds the freestanding test guest that the VMM's
// tests boot. A Linux guest cannot boot on the development hosts (PVM
// emulates guest CPL0 code and rejects much of what a kernel does), so the
// tests run this small C kernel instead: it enters through the same boot
// paths as Linux, checks what the VMM gave it and drives the devices from
// inside the VM (see guest/guest.c for its command-line options and
// commands).
//
// Build compiles the embedded sources with gcc into a vmlinux-like ELF64
// linked at 1 MiB and wraps its flat image into a bzImage. Results are
// cached under the user cache directory, keyed by a hash of the sources
// and the compiler, so concurrent test binaries build once.
package testguest

import (
	"crypto/sha256"
	"debug/elf"
	"embed"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
)

//go:embed guest
var sources embed.FS

// cflags returns the flags the guest must be built with: no SSE (the PVM
// emulator rejects SSE arithmetic), no red zone (interrupt handlers), no
// PIC (fixed load address), nothing from libc.
func cflags() []string {
	return []string{
		"-ffreestanding", "-nostdlib", "-static", "-no-pie", "-fno-pic",
		"-mgeneral-regs-only", "-mno-red-zone", "-fno-stack-protector",
		"-fno-asynchronous-unwind-tables", "-fcf-protection=none",
		"-O2", "-Wall", "-Werror",
		"-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments", "-Wl,-z,noexecstack",
	}
}

// Images are the built guest kernels.
type Images struct {
	// ELF is the vmlinux-like ELF64 image (with a PVH note).
	ELF string
	// BzImage is the same kernel as a bzImage (boot protocol 2.15,
	// 64-bit entry at load address + 0x200).
	BzImage string
}

// ErrNoCompiler is returned when gcc or objcopy is not installed.
var ErrNoCompiler = errors.New("testguest: gcc and objcopy are needed to build the test guest")

// PrebuiltEnv names the environment variable that points Build at a
// directory holding guest.elf and guest.bzImage built beforehand (copies of
// what Build returns on a machine with gcc), for machines with no compiler,
// such as the L1 guest of scripts/nested-kvm.sh.
const PrebuiltEnv = "CUBICLE_TESTGUEST_DIR"

// Build returns the test guest images, building them if the cache does not
// have them yet; with $CUBICLE_TESTGUEST_DIR set it returns the images in
// that directory and builds nothing.
func Build() (*Images, error) {
	if dir := os.Getenv(PrebuiltEnv); dir != "" {
		imgs := &Images{ELF: filepath.Join(dir, "guest.elf"), BzImage: filepath.Join(dir, "guest.bzImage")}
		for _, p := range []string{imgs.ELF, imgs.BzImage} {
			if _, err := os.Stat(p); err != nil {
				return nil, fmt.Errorf("testguest: $%s: %w", PrebuiltEnv, err)
			}
		}
		return imgs, nil
	}
	gcc, err := exec.LookPath("gcc")
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoCompiler, err)
	}
	objcopy, err := exec.LookPath("objcopy")
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoCompiler, err)
	}
	key, err := cacheKey(gcc)
	if err != nil {
		return nil, err
	}
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	dir := filepath.Join(base, "cubicle", "testguest", key)
	imgs := &Images{ELF: filepath.Join(dir, "guest.elf"), BzImage: filepath.Join(dir, "guest.bzImage")}
	if _, err := os.Stat(imgs.BzImage); err == nil {
		return imgs, nil
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		return nil, fmt.Errorf("testguest: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), key+".tmp*")
	if err != nil {
		return nil, fmt.Errorf("testguest: %w", err)
	}
	defer os.RemoveAll(tmp)
	if err := build(tmp, gcc, objcopy); err != nil {
		return nil, err
	}
	// Another process may have finished first; either copy is good.
	if err := os.Rename(tmp, dir); err != nil {
		if _, serr := os.Stat(imgs.BzImage); serr != nil {
			return nil, fmt.Errorf("testguest: %w", err)
		}
	}
	return imgs, nil
}

// cacheKey hashes the sources, the flags and the compiler version.
func cacheKey(gcc string) (string, error) {
	h := sha256.New()
	var names []string
	err := fs.WalkDir(sources, "guest", func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			names = append(names, p)
		}
		return err
	})
	if err != nil {
		return "", fmt.Errorf("testguest: %w", err)
	}
	sort.Strings(names)
	for _, n := range names {
		b, err := sources.ReadFile(n)
		if err != nil {
			return "", fmt.Errorf("testguest: %w", err)
		}
		fmt.Fprintf(h, "%s %d\n", n, len(b))
		h.Write(b)
	}
	fmt.Fprintln(h, cflags())
	v, err := exec.Command(gcc, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("testguest: gcc --version: %w", err)
	}
	h.Write(v)
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// sourceFiles are the guest's sources, all in guest/.
var sourceFiles = []string{"guest.h", "guest.c", "virtio.c", "entry.S", "guest.ld"}

func build(dir, gcc, objcopy string) error {
	for _, n := range sourceFiles {
		b, err := sources.ReadFile("guest/" + n)
		if err != nil {
			return fmt.Errorf("testguest: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			return fmt.Errorf("testguest: %w", err)
		}
	}
	elfPath := filepath.Join(dir, "guest.elf")
	args := append(cflags(), "-T", "guest.ld", "-o", "guest.elf", "entry.S", "guest.c", "virtio.c")
	cmd := exec.Command(gcc, args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("testguest: gcc: %w\n%s", err, out)
	}
	flat := filepath.Join(dir, "guest.bin")
	if out, err := exec.Command(objcopy, "-O", "binary", elfPath, flat).CombinedOutput(); err != nil {
		return fmt.Errorf("testguest: objcopy: %w\n%s", err, out)
	}
	return writeBzImage(elfPath, flat, filepath.Join(dir, "guest.bzImage"))
}

// Load address of the guest and bzImage setup-header fields
// (Documentation/arch/x86/boot.rst).
const (
	loadAddr    = 0x100000
	setupSects  = 4
	bootVersion = 0x020f
)

// writeBzImage wraps the flat image (which starts at loadAddr) in a
// bzImage: setup sectors holding a setup header, then the protected-mode
// code. The real-mode part is never run: cubicle enters at the 64-bit
// entry point.
func writeBzImage(elfPath, flatPath, out string) error {
	f, err := elf.Open(elfPath)
	if err != nil {
		return fmt.Errorf("testguest: %w", err)
	}
	defer f.Close()
	var end uint64
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD {
			end = max(end, p.Paddr+p.Memsz)
		}
	}
	flat, err := os.ReadFile(flatPath)
	if err != nil {
		return fmt.Errorf("testguest: %w", err)
	}
	le := binary.LittleEndian
	setup := make([]byte, (setupSects+1)*512)
	setup[0x1f1] = setupSects
	le.PutUint16(setup[0x1fe:], 0xAA55)
	setup[0x200], setup[0x201] = 0xEB, 0x6A // jmp to the end of the header (0x26c)
	le.PutUint32(setup[0x202:], 0x53726448) // "HdrS"
	le.PutUint16(setup[0x206:], bootVersion)
	setup[0x211] = 0x01 // LOADED_HIGH
	le.PutUint32(setup[0x214:], loadAddr)
	le.PutUint32(setup[0x230:], 0x200000) // kernel_alignment
	setup[0x234] = 0                      // not relocatable
	le.PutUint16(setup[0x236:], 0x01)     // XLF_KERNEL_64
	le.PutUint32(setup[0x238:], 2047)     // cmdline_size
	le.PutUint64(setup[0x258:], loadAddr) // pref_address
	le.PutUint32(setup[0x260:], uint32(end-loadAddr))
	le.PutUint32(setup[0x1f4:], uint32((len(flat)+15)/16)) // syssize
	if err := os.WriteFile(out, append(setup, flat...), 0o644); err != nil {
		return fmt.Errorf("testguest: %w", err)
	}
	return nil
}
