//go:build linux

// Command initdisks makes the two disks a microVM guest with cubicle init
// needs, for tests that run inside nested KVM, where no mkfs.ext4 is: a
// template image (template.BuildImage) holding the given cubicle binary,
// and an empty ext4 sandbox disk. The template's rootfs is a tiny one,
// just enough for envd (root in /etc/passwd), for vmm/linux's
// TestLinuxInit, or the directory -rootfs names (a real template's, for
// runtime/microvm's suite: scripts/microvm-check.sh).
//
//	go run ./vmm/linux/internal/initdisks -cubicle <static cubicle binary> [-rootfs DIR] [-disk-mib N] <out dir>
//
// writes <out dir>/template.ext4 and <out dir>/sandbox.ext4.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/cubicle-dev/cubicle/template"
)

// SandboxDiskMiB is the sandbox disk's size unless -disk-mib says.
const SandboxDiskMiB = 64

func main() {
	binary := flag.String("cubicle", "", "the static cubicle binary to put in the template image")
	rootfs := flag.String("rootfs", "", "the template's rootfs directory (default: a tiny one made here)")
	diskMiB := flag.Int("disk-mib", SandboxDiskMiB, "the sandbox disk's size in MiB")
	flag.Parse()
	if *binary == "" || flag.NArg() != 1 || *diskMiB < 16 {
		fmt.Fprintln(os.Stderr, "usage: initdisks -cubicle BINARY [-rootfs DIR] [-disk-mib N>=16] OUTDIR")
		os.Exit(2)
	}
	if err := run(*binary, *rootfs, *diskMiB, flag.Arg(0)); err != nil {
		fmt.Fprintln(os.Stderr, "initdisks:", err)
		os.Exit(1)
	}
}

func run(binary, rootfs string, diskMiB int, out string) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	if rootfs == "" {
		root, err := tinyRootfs(out)
		if err != nil {
			return err
		}
		defer os.RemoveAll(root)
		rootfs = root
	}
	if err := template.BuildImage(context.Background(), rootfs, binary, filepath.Join(out, "template.ext4")); err != nil {
		return err
	}
	disk := filepath.Join(out, "sandbox.ext4")
	f, err := os.Create(disk)
	if err != nil {
		return err
	}
	if err := f.Truncate(int64(diskMiB) << 20); err != nil {
		f.Close()
		return err
	}
	f.Close()
	if b, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", "-L", "sandbox",
		// Initialised now, not by the guest's ext4lazyinit after a
		// snapshot, as runtime/microvm formats its disks.
		"-E", "lazy_itable_init=0,lazy_journal_init=0", disk).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", disk, err, b)
	}
	return nil
}

// tinyRootfs makes, under out, a rootfs just big enough for envd.
func tinyRootfs(out string) (_ string, err error) {
	root, err := os.MkdirTemp(out, ".rootfs-")
	if err != nil {
		return "", err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(root)
		}
	}()
	if err := os.Chmod(root, 0o755); err != nil {
		return "", err
	}
	for _, d := range []string{"etc", "root", "run", "var/tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return "", err
		}
	}
	for name, content := range map[string]string{
		"etc/passwd":      "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":       "root:x:0:\n",
		"etc/hostname":    "template\n",
		"etc/resolv.conf": "nameserver 192.0.2.53\n", // init must replace it in the overlay
	} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			return "", err
		}
	}
	return root, nil
}
