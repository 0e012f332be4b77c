//go:build linux && amd64

package vmm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/vmm/internal/testnet"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	vnet "github.com/cubicle-dev/cubicle/vmm/virtio/net"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

// expect types cmd on the guest's serial port and waits for output,
// written after cmd was sent, that matches re; it returns the submatches.
func expect(t testing.TB, vm *VM, con *console, cmd, re string) []string {
	t.Helper()
	m, err := expectErr(vm, con, cmd, re)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func expectErr(vm *VM, con *console, cmd, re string) ([]string, error) {
	rx := regexp.MustCompile(re)
	from := len(con.String())
	for i := 0; i < len(cmd); {
		if vm.SerialInput([]byte{cmd[i]}) == 1 {
			i++
			continue
		}
		time.Sleep(time.Millisecond)
	}
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		con.mu.Lock()
		out, ch := con.buf.String(), con.changed
		con.mu.Unlock()
		if m := rx.FindStringSubmatch(out[from:]); m != nil {
			return m, nil
		}
		select {
		case <-ch:
		case <-deadline.C:
			return nil, fmt.Errorf("after %q: no output matching %q within %v; output:\n%s", cmd, re, waitTimeout, out)
		}
	}
}

// writeDisk writes a disk image of sectors 512-byte sectors, each
// starting with "sector N <tag>" and filled with pseudo-random bytes.
func writeDisk(t testing.TB, path string, sectors int, tag string) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(uint64(len(tag)), 7))
	b := make([]byte, sectors*blk.SectorSize)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	for s := range sectors {
		copy(b[s*blk.SectorSize:], fmt.Sprintf("sector %d %s|", s, tag))
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

func fnv64(b []byte) uint64 {
	h := fnv.New64a()
	h.Write(b)
	return h.Sum64()
}

// printable is the guest's rendering of a buffer's head.
func printable(b []byte) string {
	out := []byte(string(b))
	for i, c := range out {
		if c < 0x20 || c >= 0x7f {
			out[i] = '.'
		}
	}
	return string(out)
}

// readLine is what the guest prints for "nR" of disk.
func readLine(disk []byte, sector int) string {
	data := disk[sector*blk.SectorSize : sector*blk.SectorSize+4096]
	return fmt.Sprintf("blk read %d status=0 fnv=%#x head=%s\n", sector, fnv64(data), printable(data[:16]))
}

func featureLine(typ string, base uint64, irq uint32, offered, want uint64) string {
	return fmt.Sprintf("virtio %s base=%#x irq=%d offered=%#x accepted=%#x refuse ok\n", typ, base, irq, offered, offered&want)
}

const featureVersion1 = 1 << virtio.FeatureVersion1

// TestVirtioBlock: the guest finds the disk on the command line,
// negotiates features (and sees one that was not offered refused), reads
// and writes sectors through its interrupt-driven driver, flushes, asks
// for the serial, and gets an I/O error past the end of the disk.
func TestVirtioBlock(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.img")
	content := writeDisk(t, disk, 2048, "blk-test")
	var dev *blk.Device
	vm, con := bootGuest(t, guestOpts{devices: func(t testing.TB, vm *VM) {
		var err error
		if dev, err = vm.AddBlock("vda", blk.Config{Path: disk, Serial: "cubicle-disk"}); err != nil {
			t.Fatal(err)
		}
	}})
	out := con.waitFor(t, "ready\n")
	checkOutput(t, out,
		"virtio_mmio.device=4K@0xd0000000:5]\n",
		featureLine("blk", MMIOBase, FirstDeviceIRQ, dev.Features(), featureVersion1|1<<blk.FeatureBlkSize|1<<blk.FeatureFlush))

	expect(t, vm, con, "3R", regexp.QuoteMeta(readLine(content, 3)))
	expect(t, vm, con, "7W", "blk write 7 status=0\n")
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Clone(content[3*512 : 3*512+4096])
	for i := range want {
		want[i]++
	}
	if !bytes.Equal(got[7*512:7*512+4096], want) {
		t.Errorf("sectors 7..14 on disk are not sectors 3..10 plus one")
	}
	if !bytes.Equal(got[:7*512], content[:7*512]) || !bytes.Equal(got[15*512:], content[15*512:]) {
		t.Errorf("the write touched sectors outside 7..14")
	}
	expect(t, vm, con, "2044R", `blk read 2044 status=1 `) // 8 sectors from 2044 end past 2048
	expect(t, vm, con, "F", "blk flush status=0\n")
	expect(t, vm, con, "I", "blk id cubicle-disk\n")
	m := expect(t, vm, con, "K", `irqs blk=(\d+)\n`)
	if n, _ := strconv.Atoi(m[1]); n < 5 {
		t.Errorf("guest took %d blk interrupts for 5 requests", n)
	}
	if n := dev.Metrics().Reads.Load(); n != 1 {
		t.Errorf("device counted %d good reads, want 1", n)
	}
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// TestVirtioRNG: two requests give 32 fresh bytes each.
func TestVirtioRNG(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{devices: func(t testing.TB, vm *VM) {
		if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
			t.Fatal(err)
		}
	}})
	con.waitFor(t, "ready\n")
	a := expect(t, vm, con, "G", `rng 32 ([0-9a-f]{64})\n`)[1]
	b := expect(t, vm, con, "G", `rng 32 ([0-9a-f]{64})\n`)[1]
	if a == b || a == strings.Repeat("0", 64) {
		t.Errorf("entropy not fresh: %s then %s", a, b)
	}
	expect(t, vm, con, "K", `irqs rng=[2-9]`)
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// hostConnect opens a host-initiated vsock connection to the guest's
// port through the device's Unix socket and returns it after "OK".
func hostConnect(uds string, port int) (net.Conn, *bufio.Reader, error) {
	c, err := net.DialTimeout("unix", uds, waitTimeout)
	if err != nil {
		return nil, nil, err
	}
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	r := bufio.NewReader(c)
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		c.Close()
		return nil, nil, err
	}
	line, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "OK ") {
		c.Close()
		return nil, nil, fmt.Errorf("CONNECT %d: answer %q, %v", port, line, err)
	}
	return c, r, nil
}

// echo writes msg on c and expects it back.
func echo(c net.Conn, r *bufio.Reader, msg string) error {
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(r, got); err != nil {
		return fmt.Errorf("echo of %d bytes: %w", len(msg), err)
	}
	if string(got) != msg {
		return fmt.Errorf("echo of %d bytes came back different", len(msg))
	}
	return nil
}

// TestVirtioVsock opens connections both ways: the host connects to the
// guest's listening port through the Unix socket handshake, the guest
// connects to host Unix sockets <uds>_<port>; both echo. Connections to
// ports nobody listens on are refused on either side.
func TestVirtioVsock(t *testing.T) {
	uds := filepath.Join(t.TempDir(), "v.sock")
	vm, con := bootGuest(t, guestOpts{devices: func(t testing.TB, vm *VM) {
		if _, err := vm.AddVsock("vsock0", vsock.Config{GuestCID: 42, UDSPath: uds}); err != nil {
			t.Fatal(err)
		}
	}})
	con.waitFor(t, "vsock cid=42\n")
	con.waitFor(t, "ready\n")

	c, r, err := hostConnect(uds, 1234)
	if err != nil {
		t.Fatalf("%v; output:\n%s", err, con)
	}
	con.waitFor(t, "vsock accept port=1234\n")
	for _, msg := range []string{"hello vsock\n", strings.Repeat("0123456789", 300)} {
		if err := echo(c, r, msg); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	con.waitFor(t, "vsock closed port=1234\n")

	// Nobody listens on guest port 999: the guest resets the request and
	// the device closes the Unix connection without "OK".
	if c, _, err := hostConnect(uds, 999); err == nil {
		c.Close()
		t.Fatal("CONNECT 999 answered OK")
	}
	con.waitFor(t, "vsock refuse port=999\n")

	ln, err := net.Listen("unix", uds+"_5000")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	send(t, vm, "5000C")
	ln.(*net.UnixListener).SetDeadline(time.Now().Add(waitTimeout))
	gc, err := ln.Accept()
	if err != nil {
		t.Fatalf("guest never connected: %v; output:\n%s", err, con)
	}
	_ = gc.SetDeadline(time.Now().Add(waitTimeout))
	gr := bufio.NewReader(gc)
	if hello, err := gr.ReadString('\n'); err != nil || hello != "hello from cid 42 port 5000\n" {
		t.Fatalf("guest said %q, %v", hello, err)
	}
	if err := echo(gc, gr, "ping\n"); err != nil {
		t.Fatal(err)
	}
	gc.Close()
	con.waitFor(t, "vsock closed port=5000\n")
	expect(t, vm, con, "6000C", "vsock refused port=6000\n")
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// TestVirtioNet: the guest's frames come out of a real tap in a
// throwaway network namespace, where a packet socket reads them and
// answers; the answer reaches the guest through its receive queue.
func TestVirtioNet(t *testing.T) {
	ns := testnet.New(t, 1500)
	mac := [6]byte{0x02, 0xcb, 0, 0, 0, 0x07}
	var dev *vnet.Device
	vm, con := bootGuest(t, guestOpts{devices: func(t testing.TB, vm *VM) {
		var err error
		if dev, err = vm.AddNet("eth0", vnet.Config{Tap: ns.Tap, MAC: mac}); err != nil {
			t.Fatal(err)
		}
	}})
	out := con.waitFor(t, "ready\n")
	checkOutput(t, out,
		featureLine("net", MMIOBase, FirstDeviceIRQ, dev.Features(), featureVersion1|1<<vnet.FeatureMAC),
		"net mac=02:cb:00:00:00:07\n")
	macText := func(m [6]byte) string {
		return fmt.Sprintf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5])
	}
	for i := 1; i <= 2; i++ {
		expect(t, vm, con, fmt.Sprintf("%dN", i), "net tx\n")
		f := ns.Recv(t)
		want := testnet.Frame([6]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, mac, []byte(fmt.Sprintf("cubicle ping %d\n", i)))
		if len(f) != 64 || !bytes.Equal(f[:len(want)], want) {
			t.Fatalf("frame from the guest: % x", f)
		}
		payload := make([]byte, 46) // pads the frame to the Ethernet minimum
		copy(payload, fmt.Sprintf("cubicle pong %d\n", i))
		ns.Send(t, testnet.Frame(mac, ns.MAC, payload))
		con.waitFor(t, fmt.Sprintf("net rx len=60 from=%s cubicle pong %d\n", macText(ns.MAC), i))
	}
	expect(t, vm, con, "K", `irqs net=([2-9]|\d\d)`)
	if n := dev.Metrics().TxFrames.Load(); n != 2 {
		t.Errorf("device sent %d frames, want 2", n)
	}
	send(t, vm, "q")
	mustClean(t, vm, con)
}

// TestVirtioAddAfterLoadKernel: the command line is written by then.
func TestVirtioAddAfterLoadKernel(t *testing.T) {
	vm, con := bootGuest(t, guestOpts{})
	con.waitFor(t, "ready\n")
	if _, err := vm.AddRNG("rng0", rng.Config{}); !errors.Is(err, ErrState) {
		t.Fatalf("AddRNG on a running VM = %v, want ErrState", err)
	}
	v, err := New(Config{MemoryBytes: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if err := v.LoadKernelFile(guestImages(t).ELF, "", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := v.AddRNG("rng0", rng.Config{}); !errors.Is(err, ErrState) {
		t.Fatalf("AddRNG after LoadKernel = %v, want ErrState", err)
	}
}

// cloneDevices adds the devices of the snapshot test to a VM: a disk, an
// entropy device and a vsock device.
func cloneDevices(vm *VM, disk, uds string, cid uint64) error {
	if _, err := vm.AddBlock("vda", blk.Config{Path: disk, Serial: "template"}); err != nil {
		return err
	}
	if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
		return err
	}
	// 100 clones share two cores (and the race detector): a guest may take
	// longer than the production 2 s to answer a CONNECT.
	_, err := vm.AddVsock("vsock0", vsock.Config{GuestCID: cid, UDSPath: uds, ConnectTimeout: 30 * time.Second})
	return err
}

// TestVirtioSnapshotClones snapshots a guest with state in memory and in
// its device queues: a block read posted but not yet seen by the device,
// rx and event buffers posted on vsock, and an open host connection. The
// original then completes its read from its own disk; 100 clones restored
// concurrently each get their own disk, vsock socket and CID: each is told
// that its connections are gone (transport reset, new CID), completes the
// in-flight read from its own disk, writes to it, draws fresh entropy and
// echoes on a new vsock connection.
func TestVirtioSnapshotClones(t *testing.T) {
	const clones = 100
	dir := t.TempDir()
	tmplDisk := filepath.Join(dir, "template.img")
	tmplContent := writeDisk(t, tmplDisk, 64, "template")
	tmplUDS := filepath.Join(dir, "t.sock")
	vm, con := bootGuest(t, guestOpts{mem: 32 << 20, devices: func(t testing.TB, vm *VM) {
		if err := cloneDevices(vm, tmplDisk, tmplUDS, 3); err != nil {
			t.Fatal(err)
		}
	}})
	con.waitFor(t, "ready\n")
	c, r, err := hostConnect(tmplUDS, 1234)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := echo(c, r, "before the snapshot\n"); err != nil {
		t.Fatal(err)
	}
	expect(t, vm, con, "0P", "blk posted 0\n")
	statePath, memPath := snapshotGuest(t, vm)

	// The original carries on: its device sees the posted read now.
	if err := vm.Resume(); err != nil {
		t.Fatal(err)
	}
	expect(t, vm, con, "A", regexp.QuoteMeta(readLine(tmplContent, 0)))
	if err := echo(c, r, "after the snapshot\n"); err != nil {
		t.Fatal(err)
	}
	vm.Close()

	type result struct {
		entropy string
		err     error
	}
	results := make(chan result, clones)
	vms := make(chan *VM, clones)
	for i := range clones {
		go func() {
			e, err := runVirtioClone(dir, i, statePath, memPath, vms)
			if err != nil {
				err = fmt.Errorf("clone %d: %w", i, err)
			}
			results <- result{e, err}
		}()
	}
	seen := map[string]bool{}
	for range clones {
		r := <-results
		if r.err != nil {
			t.Error(r.err)
			continue
		}
		if seen[r.entropy] {
			t.Errorf("two clones drew the same entropy %s", r.entropy)
		}
		seen[r.entropy] = true
	}
	close(vms)
	closeAll(vms)
}

// closeAll closes VMs in parallel: destroying a KVM VM takes tens of ms.
func closeAll(vms <-chan *VM) {
	done := make(chan struct{})
	n := 0
	for v := range vms {
		n++
		go func() { v.Close(); done <- struct{}{} }()
	}
	for range n {
		<-done
	}
}

func runVirtioClone(dir string, i int, statePath, memPath string, vms chan<- *VM) (entropy string, err error) {
	disk := filepath.Join(dir, fmt.Sprintf("clone%d.img", i))
	content := make([]byte, 64*blk.SectorSize)
	copy(content, fmt.Sprintf("sector 0 clone-%d|", i))
	if err := os.WriteFile(disk, content, 0o600); err != nil {
		return "", err
	}
	uds := filepath.Join(dir, fmt.Sprintf("c%d.sock", i))
	cid := uint64(100 + i)
	con := newConsole()
	vm, err := Restore(Config{Console: con}, statePath, memPath)
	if err != nil {
		return "", err
	}
	vms <- vm
	if err := cloneDevices(vm, disk, uds, cid); err != nil {
		return "", err
	}
	if err := vm.Start(); err != nil {
		return "", err
	}
	if _, err := con.waitForErr(fmt.Sprintf("vsock reset cid=%d\n", cid), waitTimeout); err != nil {
		return "", err
	}
	if _, err := expectErr(vm, con, "A", regexp.QuoteMeta(readLine(content, 0))); err != nil {
		return "", err
	}
	if _, err := expectErr(vm, con, "8W", "blk write 8 status=0\n"); err != nil {
		return "", err
	}
	m, err := expectErr(vm, con, "G", `rng 32 ([0-9a-f]{64})\n`)
	if err != nil {
		return "", err
	}
	c, r, err := hostConnect(uds, 1234)
	if err != nil {
		return "", fmt.Errorf("%w; output:\n%s", err, con)
	}
	err = echo(c, r, fmt.Sprintf("clone %d says hi\n", i))
	c.Close()
	if err != nil {
		return "", err
	}
	if _, err := expectErr(vm, con, "q", "bye"); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	if err := vm.Wait(ctx); err != nil {
		return "", fmt.Errorf("ended with %w; output:\n%s", err, con)
	}
	got, err := os.ReadFile(disk)
	if err != nil {
		return "", err
	}
	for j := range 4096 {
		if got[8*blk.SectorSize+j] != content[j]+1 {
			return "", fmt.Errorf("byte %d of sector 8.. is %#x, want %#x", j, got[8*blk.SectorSize+j], content[j]+1)
		}
	}
	return m[1], nil
}

// TestVirtioRestoreMismatch: a restored VM only takes the virtio devices
// its snapshot had, under the same names, of the same kind and over a
// matching disk; anything else is a clear error, never a started VM.
func TestVirtioRestoreMismatch(t *testing.T) {
	dir := t.TempDir()
	disk := filepath.Join(dir, "disk.img")
	writeDisk(t, disk, 64, "mismatch")
	vm, con := bootGuest(t, guestOpts{mem: 16 << 20, devices: func(t testing.TB, vm *VM) {
		if _, err := vm.AddBlock("vda", blk.Config{Path: disk}); err != nil {
			t.Fatal(err)
		}
		if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
			t.Fatal(err)
		}
	}})
	con.waitFor(t, "ready\n")
	statePath, memPath := snapshotGuest(t, vm)
	vm.Close()

	small := filepath.Join(dir, "small.img")
	writeDisk(t, small, 32, "small")
	v, err := Restore(Config{}, statePath, memPath)
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	if _, err := v.AddBlock("vda", blk.Config{Path: small}); !errors.Is(err, blk.ErrSnapshotMismatch) {
		t.Errorf("AddBlock over a smaller disk = %v, want blk.ErrSnapshotMismatch", err)
	}
	if _, err := v.AddRNG("vda", rng.Config{}); !errors.Is(err, ErrVirtioState) {
		t.Errorf("AddRNG under the disk's name = %v, want ErrVirtioState", err)
	}
	if _, err := v.AddRNG("rng1", rng.Config{}); !errors.Is(err, ErrIncompatible) {
		t.Errorf("AddRNG under a name the snapshot lacks = %v, want ErrIncompatible", err)
	}
	if err := v.Start(); !errors.Is(err, ErrIncompatible) {
		t.Errorf("Start without the snapshot's devices = %v, want ErrIncompatible", err)
	}

	st, err := snapshot.ReadFile(statePath)
	if err != nil {
		t.Fatal(err)
	}
	for i := range st.Devices {
		if st.Devices[i].Name == "vda" {
			st.Devices[i].Data = []byte(`{"version":1,"type":2,"base":`)
		}
	}
	v2, err := RestoreState(Config{}, st, memPath)
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	if _, err := v2.AddBlock("vda", blk.Config{Path: disk}); !errors.Is(err, ErrVirtioState) {
		t.Errorf("AddBlock with malformed saved state = %v, want ErrVirtioState", err)
	}

	good, gcon := restoreGuest(t, statePath, memPath, nil, func(t testing.TB, vm *VM) {
		if _, err := vm.AddBlock("vda", blk.Config{Path: disk}); err != nil {
			t.Fatal(err)
		}
		if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
			t.Fatal(err)
		}
	})
	expect(t, good, gcon, "G", `rng 32 [0-9a-f]{64}\n`)
	expect(t, good, gcon, "0R", `blk read 0 status=0 `)
}

// TestFullCmdline: the devices' parameters go before a "--", after which
// the kernel passes words to init, never to itself.
func TestFullCmdline(t *testing.T) {
	dev := []string{"virtio_mmio.device=4K@0xd0000000:5", "virtio_mmio.device=4K@0xd0001000:6"}
	for _, tc := range []struct {
		in    string
		extra []string
		want  string
	}{
		{"console=ttyS0", nil, "console=ttyS0"},
		{"console=ttyS0", dev, "console=ttyS0 " + strings.Join(dev, " ")},
		{"", dev, strings.Join(dev, " ")},
		{"console=ttyS0 init=/.cubicle/cubicle -- init", dev, "console=ttyS0 init=/.cubicle/cubicle " + strings.Join(dev, " ") + " -- init"},
		{"-- init --x", dev[:1], dev[0] + " -- init --x"},
		{"a --b", dev[:1], "a --b " + dev[0]},
	} {
		if got := fullCmdline(tc.in, tc.extra); got != tc.want {
			t.Errorf("fullCmdline(%q, %q) = %q, want %q", tc.in, tc.extra, got, tc.want)
		}
	}
}
