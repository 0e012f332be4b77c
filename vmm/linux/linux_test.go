//go:build linux && amd64

package linux

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

// bootTimeout bounds the boot to userspace and each command.
const bootTimeout = 2 * time.Minute

// TestKeyMatchesScript: the Go side and build.sh agree on the cache key.
func TestKeyMatchesScript(t *testing.T) {
	out, err := exec.Command("bash", "build.sh", "--key").Output()
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(string(out)); got != Key() {
		t.Fatalf("build.sh key %s, Key() %s", got, Key())
	}
}

// TestConfigFragment: the fragment holds what a sandbox kernel must have.
func TestConfigFragment(t *testing.T) {
	for _, opt := range []string{
		"CONFIG_PVH=y", "CONFIG_VIRTIO_MMIO=y", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y", "CONFIG_VIRTIO_BLK=y",
		"CONFIG_VSOCKETS=y", "CONFIG_VIRTIO_VSOCKETS=y", "CONFIG_SERIAL_8250_CONSOLE=y", "CONFIG_BLK_DEV_INITRD=y",
		// What guest/init's contract needs of the kernel.
		"CONFIG_EXT4_FS=y", "CONFIG_OVERLAY_FS=y", "CONFIG_TMPFS=y", "CONFIG_DEVTMPFS=y", "CONFIG_UNIX98_PTYS=y",
		"CONFIG_CGROUPS=y", "CONFIG_MEMCG=y", "CONFIG_CGROUP_SCHED=y", "CONFIG_CGROUP_PIDS=y",
		"CONFIG_INOTIFY_USER=y", "CONFIG_VIRTIO_NET=y", "CONFIG_INET=y",
	} {
		if !bytes.Contains(config, []byte("\n"+opt+"\n")) {
			t.Errorf("config lacks %s", opt)
		}
	}
}

// console collects the guest's serial output.
type console struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.Write(p)
}

func (c *console) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

// TestLinuxBoot boots the guest kernel (PVH) with an initramfs holding
// testinit, a virtio-blk disk, virtio-rng and vsock, reaches userspace,
// runs commands over vsock and reboots. It needs hardware virtualization:
// elsewhere it skips, and the kernel is not built.
func TestLinuxBoot(t *testing.T) {
	if ok, why := CanBoot(); !ok {
		t.Skip("cannot boot Linux here: " + why)
	}
	kernel := os.Getenv("CUBICLE_VMLINUX")
	if kernel == "" {
		var err error
		if kernel, err = Build(DefaultCacheDir()); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	initrd := filepath.Join(dir, "initramfs.cpio")
	buildInitramfs(t, dir, initrd)
	disk := filepath.Join(dir, "disk.img")
	img := make([]byte, 1<<20)
	copy(img, "cubicle linux boot test disk")
	if err := os.WriteFile(disk, img, 0o600); err != nil {
		t.Fatal(err)
	}
	uds := filepath.Join(dir, "v.sock")

	con := &console{}
	vm, err := vmm.New(vmm.Config{MemoryBytes: 256 << 20, VCPUs: 2, Console: con})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if _, err := vm.AddBlock("vda", blk.Config{Path: disk}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AddVsock("vsock0", vsock.Config{GuestCID: 3, UDSPath: uds}); err != nil {
		t.Fatal(err)
	}
	if err := vm.LoadInitrdFile(initrd); err != nil {
		t.Fatal(err)
	}
	if err := vm.LoadKernelFile(kernel, "console=ttyS0 reboot=k panic=-1 rdinit=/init", boot.ProtocolPVH); err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(bootTimeout)
	for !strings.Contains(con.String(), "cubicle-init: ready") {
		if time.Now().After(deadline) {
			t.Fatalf("no userspace after %v; console:\n%s", bootTimeout, con)
		}
		select {
		case <-vm.Done():
			t.Fatalf("VM stopped: %v; console:\n%s", vm.Wait(context.Background()), con)
		case <-time.After(20 * time.Millisecond):
		}
	}

	c, err := net.DialTimeout("unix", uds, bootTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(bootTimeout))
	r := bufio.NewReader(c)
	fmt.Fprintf(c, "CONNECT 1024\n")
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "OK ") {
		t.Fatalf("CONNECT 1024: %q, %v; console:\n%s", line, err, con)
	}
	ask := func(cmd string) string {
		t.Helper()
		fmt.Fprintln(c, cmd)
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("%s: %v; console:\n%s", cmd, err, con)
		}
		return strings.TrimSpace(line)
	}
	if got := ask("uname"); !strings.HasPrefix(got, "Linux 6.1") || !strings.HasSuffix(got, "x86_64") {
		t.Errorf("uname: %q", got)
	}
	if got := ask("disk"); got != "cubicle linux boot test disk" {
		t.Errorf("disk: %q", got)
	}
	if got := ask("rng"); len(got) != 32 || strings.HasPrefix(got, "error") {
		t.Errorf("rng: %q", got)
	}
	fmt.Fprintln(c, "reboot")
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	if err := vm.Wait(ctx); err != nil {
		t.Fatalf("VM ended with %v; console:\n%s", err, con)
	}
	// With -v the guest's console shows even when all went well: the
	// kernel's warnings (CPUID, XSAVE) are worth reading on a new host.
	if testing.Verbose() {
		t.Logf("console:\n%s", con)
	}
}

// buildInitramfs builds testinit statically and packs it as /init in an
// uncompressed newc cpio archive with /dev/console. Where there is no go
// command (inside scripts/nested-kvm.sh's L1 guest), $CUBICLE_TESTINIT
// names a testinit built beforehand and is used instead.
func buildInitramfs(t *testing.T, dir, out string) {
	t.Helper()
	initBin := os.Getenv("CUBICLE_TESTINIT")
	if initBin == "" {
		initBin = filepath.Join(dir, "init")
		goBin, err := exec.LookPath("go")
		if err != nil {
			t.Fatalf("the go command builds the test init (or set CUBICLE_TESTINIT to a prebuilt one): %v", err)
		}
		cmd := exec.Command(goBin, "build", "-trimpath", "-o", initBin, "./internal/testinit")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building testinit: %v\n%s", err, b)
		}
	}
	prog, err := os.ReadFile(initBin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	w := &cpioWriter{w: &buf}
	w.add("dev", 0o040755, 0, nil)
	w.add("dev/console", 0o020600, 5<<8|1, nil) // character device 5:1
	w.add("proc", 0o040755, 0, nil)
	w.add("sys", 0o040755, 0, nil)
	w.add("init", 0o100755, 0, prog)
	w.add("TRAILER!!!", 0, 0, nil)
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// cpioWriter writes the "newc" format the kernel unpacks into its initial
// root (Documentation/driver-api/early-userspace/buffer-format.rst).
type cpioWriter struct {
	w   io.Writer
	ino uint32
}

func (c *cpioWriter) add(name string, mode, rdev uint32, data []byte) {
	c.ino++
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev>>8, rdev&0xff, len(name)+1, 0)
	b := append([]byte(hdr), name...)
	b = append(b, 0)
	b = pad4(b)
	b = append(b, data...)
	c.w.Write(pad4(b))
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// TestCPIO checks the archive format against its fixed header layout.
func TestCPIO(t *testing.T) {
	var buf bytes.Buffer
	w := &cpioWriter{w: &buf}
	w.add("init", 0o100755, 0, []byte("abc"))
	b := buf.Bytes()
	if len(b)%4 != 0 || string(b[:6]) != "070701" || string(b[110:115]) != "init\x00" {
		t.Fatalf("header: %q", b)
	}
	var size uint32
	fmt.Sscanf(string(b[54:62]), "%08x", &size)
	if size != 3 || !bytes.Contains(b, []byte("abc")) {
		t.Fatalf("file size %d in %q", size, b)
	}
}

// TestInitramfs builds the initramfs of the boot test (here too, where the
// boot itself skips): /init is a static x86-64 ELF executable.
func TestInitramfs(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "initramfs.cpio")
	buildInitramfs(t, dir, out)
	b, data := archiveInit(t, out)
	if !bytes.HasPrefix(data, []byte("\x7fELF\x02\x01")) || binary.LittleEndian.Uint16(data[18:]) != 62 {
		t.Fatalf("/init is not an x86-64 ELF: % x", data[:20])
	}
	if !bytes.Contains(b[max(0, len(b)-128):], []byte("TRAILER!!!")) {
		t.Fatal("archive does not end with the trailer")
	}
}

// archiveInit reads the newc archive at path and returns it and what
// follows the name of its /init entry: the file's data, 4-byte aligned.
func archiveInit(t *testing.T, path string) (archive, data []byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b, []byte("init\x00"))
	if i < 0 {
		t.Fatal("no init in the archive")
	}
	return b, b[(i+5+3)&^3:]
}

// TestInitramfsPrebuiltInit: with $CUBICLE_TESTINIT set, the archive's
// /init is that file (no go command needed, as inside nested KVM).
func TestInitramfsPrebuiltInit(t *testing.T) {
	dir := t.TempDir()
	prog := filepath.Join(dir, "prebuilt")
	want := []byte("\x7fELF prebuilt testinit")
	if err := os.WriteFile(prog, want, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CUBICLE_TESTINIT", prog)
	out := filepath.Join(dir, "initramfs.cpio")
	buildInitramfs(t, dir, out)
	if _, data := archiveInit(t, out); !bytes.HasPrefix(data, want) {
		t.Fatalf("/init is not the prebuilt file: %q", data[:min(len(data), 32)])
	}
}
