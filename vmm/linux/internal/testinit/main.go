//go:build linux

// Command testinit is PID 1 of the Linux boot test's initramfs. It mounts
// /proc, /sys and /dev, says "cubicle-init: ready" on the console and
// then answers one command per line on vsock port 1024 (the host reaches
// it through the VMM's Unix socket, "CONNECT 1024"):
//
//	uname    the kernel's sysname, release and machine
//	disk     the first 32 bytes of /dev/vda, as text, read past the page
//	         cache (a guest restored onto another disk reads that one)
//	rng      16 bytes of /dev/hwrng, in hex (virtio-rng)
//	reboot   sync and restart (with reboot=k: the i8042 reset that ends the VM)
package main

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Port is the vsock port the init listens on.
const Port = 1024

func main() {
	for _, m := range []struct{ src, dir, typ string }{
		{"proc", "/proc", "proc"}, {"sysfs", "/sys", "sysfs"}, {"devtmpfs", "/dev", "devtmpfs"},
	} {
		_ = os.MkdirAll(m.dir, 0o755)
		if err := unix.Mount(m.src, m.dir, m.typ, 0, ""); err != nil && err != unix.EBUSY {
			fmt.Println("cubicle-init: mount", m.dir, err)
		}
	}
	ln, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err == nil {
		err = unix.Bind(ln, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: Port})
	}
	if err == nil {
		err = unix.Listen(ln, 8)
	}
	if err != nil {
		fmt.Println("cubicle-init: vsock:", err)
		halt()
	}
	fmt.Println("cubicle-init: ready")
	for {
		fd, _, err := unix.Accept(ln)
		if err != nil {
			fmt.Println("cubicle-init: accept:", err)
			continue
		}
		go serve(os.NewFile(uintptr(fd), "vsock"))
	}
}

func serve(c *os.File) {
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		fmt.Fprintln(c, run(strings.TrimSpace(line)))
	}
}

func run(cmd string) string {
	switch cmd {
	case "uname":
		var u unix.Utsname
		if err := unix.Uname(&u); err != nil {
			return "error: " + err.Error()
		}
		return fmt.Sprintf("%s %s %s", unix.ByteSliceToString(u.Sysname[:]), unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Machine[:]))
	case "disk":
		return readDirect("/dev/vda", 32)
	case "rng":
		return readHead("/dev/hwrng", 16, true)
	case "reboot":
		unix.Sync()
		if err := unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART); err != nil {
			return "error: " + err.Error()
		}
	}
	return "unknown command " + cmd
}

func readHead(path string, n int, asHex bool) string {
	f, err := os.Open(path)
	if err != nil {
		return "error: " + err.Error()
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := io.ReadFull(f, b); err != nil {
		return "error: " + err.Error()
	}
	if asHex {
		return hex.EncodeToString(b)
	}
	return strings.TrimRight(string(b), "\x00")
}

// readDirect reads the first n (<= 4096) bytes of a block device with
// O_DIRECT, into a page-aligned buffer as O_DIRECT wants, and returns them
// as text.
func readDirect(path string, n int) string {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return "error: " + err.Error()
	}
	defer unix.Close(fd)
	buf, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return "error: " + err.Error()
	}
	defer unix.Munmap(buf)
	if _, err := unix.Pread(fd, buf, 0); err != nil {
		return "error: " + err.Error()
	}
	return strings.TrimRight(string(buf[:n]), "\x00")
}

func halt() {
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_RESTART)
	select {}
}
