//go:build linux

// Command initdisks makes the two disks of vmm/linux's TestLinuxInit: a
// template image (template.BuildImage) of a tiny rootfs, just enough for
// envd (root in /etc/passwd), holding the given cubicle binary, and an
// empty ext4 sandbox disk. It runs on the host, where mkfs.ext4 is, before
// the test runs inside nested KVM, where it is not.
//
//	go run ./vmm/linux/internal/initdisks -cubicle <static cubicle binary> <out dir>
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

// SandboxDiskMiB is the size of the sandbox disk.
const SandboxDiskMiB = 64

func main() {
	binary := flag.String("cubicle", "", "the static cubicle binary to put in the template image")
	flag.Parse()
	if *binary == "" || flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: initdisks -cubicle BINARY OUTDIR")
		os.Exit(2)
	}
	if err := run(*binary, flag.Arg(0)); err != nil {
		fmt.Fprintln(os.Stderr, "initdisks:", err)
		os.Exit(1)
	}
}

func run(binary, out string) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	root, err := os.MkdirTemp(out, ".rootfs-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(root)
	if err := os.Chmod(root, 0o755); err != nil {
		return err
	}
	for _, d := range []string{"etc", "root", "run", "var/tmp"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	for name, content := range map[string]string{
		"etc/passwd":      "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":       "root:x:0:\n",
		"etc/hostname":    "template\n",
		"etc/resolv.conf": "nameserver 192.0.2.53\n", // init must replace it in the overlay
	} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(content), 0o644); err != nil {
			return err
		}
	}
	if err := template.BuildImage(context.Background(), root, binary, filepath.Join(out, "template.ext4")); err != nil {
		return err
	}
	disk := filepath.Join(out, "sandbox.ext4")
	f, err := os.Create(disk)
	if err != nil {
		return err
	}
	if err := f.Truncate(SandboxDiskMiB << 20); err != nil {
		f.Close()
		return err
	}
	f.Close()
	if b, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", "-L", "sandbox", disk).CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4 %s: %w: %s", disk, err, b)
	}
	return nil
}
