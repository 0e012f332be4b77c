//go:build linux && amd64

package linux

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	vnet "github.com/cubicle-dev/cubicle/vmm/virtio/net"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

// initCmdline is guest/init's contract command line for a 512 MiB guest.
const initCmdline = "console=ttyS0 reboot=k panic=1 root=/dev/vda ro rootfstype=ext4 " +
	"init=/.cubicle/cubicle cubicle.ip=169.254.0.21/30 cubicle.gw=169.254.0.22 cubicle.mem=512 -- init"

// TestLinuxInit boots the guest kernel the way a microVM sandbox boots:
// the template image read-only as vda, a fresh sandbox disk as vdb,
// virtio-net on a tap, vsock, and `cubicle init` as PID 1 (guest/init's
// contract). Over the vsock control channel it sends ping and identity,
// waits for envd, writes a file to / through envd over the network, syncs
// and powers off; then the file must be on the sandbox disk and the
// template image unchanged. Needs hardware virtualization and root (a tap
// in a network namespace of its own). Inside nested KVM (no go, no
// mkfs.ext4 there), $CUBICLE_INIT_DISKS names a directory that
// vmm/linux/internal/initdisks filled on the host.
func TestLinuxInit(t *testing.T) {
	if ok, why := CanBoot(); !ok {
		t.Skip("cannot boot Linux here: " + why)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: the guest's network is a tap in a network namespace of the test's")
	}
	kernel := os.Getenv("CUBICLE_VMLINUX")
	if kernel == "" {
		var err error
		if kernel, err = Build(DefaultCacheDir()); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	image, disk := initDisks(t, dir)
	imageSum := fileSum(t, image)
	ns := newTapNetns(t)

	con := &console{}
	vm, err := vmm.New(vmm.Config{MemoryBytes: 512 << 20, VCPUs: 2, Console: con})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if _, err := vm.AddBlock("vda", blk.Config{Path: image, ReadOnly: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AddBlock("vdb", blk.Config{Path: disk}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AddNet("eth0", vnet.Config{Tap: ns.tap, MAC: [6]byte{0x02, 0xcb, 0, 0, 0, 0x21}}); err != nil {
		t.Fatal(err)
	}
	if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
		t.Fatal(err)
	}
	uds := filepath.Join(dir, "v.sock")
	if _, err := vm.AddVsock("vsock0", vsock.Config{GuestCID: 3, UDSPath: uds}); err != nil {
		t.Fatal(err)
	}
	if err := vm.LoadKernelFile(kernel, initCmdline, boot.ProtocolPVH); err != nil {
		t.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	waitConsole(t, vm, con, "cubicle-init: ready")

	ctl := dialControl(t, uds, con)
	if resp := ctl.ask(t, `{"op":"ping"}`); resp["ok"] != true || resp["envd"] == nil {
		t.Fatalf("ping: %v; console:\n%s", resp, con)
	}
	entropy := make([]byte, 64)
	rand.Read(entropy)
	id := fmt.Sprintf(`{"op":"identity","unixNano":%d,"entropy":%q,"hostname":"init-test"}`,
		time.Now().UnixNano(), base64.StdEncoding.EncodeToString(entropy))
	if resp := ctl.ask(t, id); resp["ok"] != true {
		t.Fatalf("identity: %v; console:\n%s", resp, con)
	}
	if resp := ctl.ask(t, `{"op":"launch"}`); resp["ok"] != false || resp["error"] == nil {
		t.Fatalf("unknown op: %v", resp)
	}
	deadline := time.Now().Add(bootTimeout)
	for {
		resp := ctl.ask(t, `{"op":"ping"}`)
		if resp["ok"] == true && resp["envd"] == true {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("envd not up after %v: %v; console:\n%s", bootTimeout, resp, con)
		}
		time.Sleep(200 * time.Millisecond)
	}

	// Through the guest's network, as the host's proxy reaches envd.
	client := &http.Client{Timeout: bootTimeout, Transport: &http.Transport{DialContext: ns.dial, DisableKeepAlives: true}}
	envd := "http://169.254.0.21:49983"
	resp, err := client.Get(envd + "/health")
	if err != nil {
		t.Fatalf("envd /health over the guest's network: %v; console:\n%s", err, con)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("envd /health: %s", resp.Status)
	}
	marker := fmt.Sprintf("written to / by TestLinuxInit %x", entropy[:8])
	req, _ := http.NewRequest(http.MethodPost, envd+"/files?path=/init-test-file&username=root", strings.NewReader(marker))
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err = client.Do(req)
	if err != nil {
		t.Fatalf("upload: %v; console:\n%s", err, con)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("upload: %s %s", resp.Status, body)
	}
	resp, err = client.Get(envd + "/files?path=/init-test-file&username=root")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != marker {
		t.Fatalf("read back %q, want %q", body, marker)
	}

	if resp := ctl.ask(t, `{"op":"sync"}`); resp["ok"] != true {
		t.Fatalf("sync: %v", resp)
	}
	if resp := ctl.ask(t, `{"op":"poweroff"}`); resp["ok"] != true {
		t.Fatalf("poweroff: %v", resp)
	}
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	if err := vm.Wait(ctx); err != nil {
		t.Fatalf("VM ended with %v; console:\n%s", err, con)
	}
	if testing.Verbose() {
		t.Logf("console:\n%s", con)
	}

	// The write went to the sandbox disk (the overlay's upper layer), and
	// so did init's resolv.conf; the template image is as it was.
	if got := fileSum(t, image); got != imageSum {
		t.Error("the template image changed")
	}
	raw, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, []byte(marker)) {
		t.Error("the file written to / is not on the sandbox disk")
	}
	if !bytes.Contains(raw, []byte("nameserver 169.254.0.22")) {
		t.Error("init's /etc/resolv.conf is not on the sandbox disk")
	}
	if tpl, _ := os.ReadFile(image); bytes.Contains(tpl, []byte(marker)) {
		t.Error("the file written to / is in the template image")
	}
	for _, want := range []string{"envd started", "ready (hostname sandbox, memory 512 MiB)"} {
		if !strings.Contains(con.String(), want) {
			t.Errorf("console lacks %q", want)
		}
	}
}

// initDisks returns the template image and a fresh sandbox disk for the
// test: copies from $CUBICLE_INIT_DISKS, or made here by building cubicle
// and running internal/initdisks.
func initDisks(t *testing.T, dir string) (image, disk string) {
	t.Helper()
	src := os.Getenv("CUBICLE_INIT_DISKS")
	if src == "" {
		goBin, err := exec.LookPath("go")
		if err != nil {
			t.Fatalf("the go command builds cubicle and the disks (or set CUBICLE_INIT_DISKS to a directory initdisks filled): %v", err)
		}
		if _, err := exec.LookPath("mkfs.ext4"); err != nil {
			t.Skip("mkfs.ext4 is needed for the disks (apt-get install e2fsprogs)")
		}
		src = filepath.Join(dir, "disks")
		bin := filepath.Join(dir, "cubicle")
		build := exec.Command(goBin, "build", "-trimpath", "-o", bin, "../../cmd/cubicle")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := build.CombinedOutput(); err != nil {
			t.Fatalf("building cubicle: %v\n%s", err, b)
		}
		mk := exec.Command(goBin, "run", "./internal/initdisks", "-cubicle", bin, src)
		if b, err := mk.CombinedOutput(); err != nil {
			t.Fatalf("initdisks: %v\n%s", err, b)
		}
	}
	image = filepath.Join(src, "template.ext4")
	// Each run gets its own sandbox disk, as each sandbox does.
	disk = filepath.Join(dir, "sandbox.ext4")
	b, err := os.ReadFile(filepath.Join(src, "sandbox.ext4"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(disk, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return image, disk
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// waitConsole waits for s on the guest's console.
func waitConsole(t *testing.T, vm *vmm.VM, con *console, s string) {
	t.Helper()
	deadline := time.Now().Add(bootTimeout)
	for !strings.Contains(con.String(), s) {
		if time.Now().After(deadline) {
			t.Fatalf("no %q after %v; console:\n%s", s, bootTimeout, con)
		}
		select {
		case <-vm.Done():
			t.Fatalf("VM stopped: %v; console:\n%s", vm.Wait(context.Background()), con)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// control is a connection to init's control channel.
type control struct {
	c   net.Conn
	r   *bufio.Reader
	con *console
}

// dialControl connects to init's control port as runtime/microvm's
// dialGuest does: a CONNECT the vsock device closes unanswered (EOF) is
// made again, up to 5 times. That close is a known fault of the device,
// seen about once in fifteen first connections and tracked apart
// (docs/STATUS.md, TestLinuxSnapshotRestore); this test is about init's
// contract, so it logs the retry and goes on.
func dialControl(t *testing.T, uds string, con *console) *control {
	t.Helper()
	for try := 1; ; try++ {
		c, err := net.DialTimeout("unix", uds, bootTimeout)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(2 * bootTimeout))
		r := bufio.NewReader(c)
		fmt.Fprintf(c, "CONNECT 1024\n")
		line, err := r.ReadString('\n')
		if err == nil && strings.HasPrefix(line, "OK ") {
			t.Cleanup(func() { c.Close() })
			return &control{c: c, r: r, con: con}
		}
		c.Close()
		if !errors.Is(err, io.EOF) || try == 5 {
			t.Fatalf("CONNECT 1024 (try %d): %q, %v; console:\n%s", try, line, err, con)
		}
		t.Logf("CONNECT 1024 closed unanswered (try %d): making it again", try)
		time.Sleep(200 * time.Millisecond)
	}
}

func (c *control) ask(t *testing.T, req string) map[string]any {
	t.Helper()
	if _, err := fmt.Fprintln(c.c, req); err != nil {
		t.Fatalf("%s: %v", req, err)
	}
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		t.Fatalf("%s: %v; console:\n%s", req, err, c.con)
	}
	var resp map[string]any
	if err := json.Unmarshal(line, &resp); err != nil {
		t.Fatalf("%s: response %q: %v", req, line, err)
	}
	return resp
}

// tapNetns is a network namespace of the test's with a tap holding the
// guest's gateway address (the host side of a sandbox's link), and a
// thread in it that dials for the test.
type tapNetns struct {
	tap  *os.File
	jobs chan func()
}

func newTapNetns(t *testing.T) *tapNetns {
	t.Helper()
	ns := &tapNetns{jobs: make(chan func())}
	errc := make(chan error, 1)
	go func() {
		// The thread stays in the namespace and is never unlocked: the
		// runtime discards it when this goroutine ends with the test.
		runtime.LockOSThread()
		err := func() error {
			if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
				return fmt.Errorf("unshare: %w", err)
			}
			tap, name, err := vnet.OpenTap("ctap%d")
			if err != nil {
				return err
			}
			ns.tap = tap
			for _, n := range []string{"lo", name} {
				l, err := netlink.LinkByName(n)
				if err != nil {
					return err
				}
				if n == name {
					a, _ := netlink.ParseAddr("169.254.0.22/30")
					if err := netlink.AddrAdd(l, a); err != nil {
						return err
					}
				}
				if err := netlink.LinkSetUp(l); err != nil {
					return err
				}
			}
			return nil
		}()
		errc <- err
		if err != nil {
			return
		}
		for job := range ns.jobs {
			job()
		}
	}()
	if err := <-errc; err != nil {
		t.Fatalf("network namespace with a tap: %v", err)
	}
	t.Cleanup(func() { close(ns.jobs) })
	return ns
}

// dial connects from inside the namespace.
func (ns *tapNetns) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	var err error
	done := make(chan struct{})
	ns.jobs <- func() {
		c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
		close(done)
	}
	<-done
	return c, err
}
