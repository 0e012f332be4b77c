// Package testnet gives VMM tests a throwaway network namespace holding one
// tap device, up, with a packet socket bound to it, so that a test can play
// the network on the other side of a virtio-net device: read the frames the
// guest sends and inject frames for it. The namespace is anonymous and
// owned by descriptors only: it disappears, tap included, when the test
// closes them (the tap's descriptor normally goes to a net device, which
// closes it). Nothing in it routes anywhere.
package testnet

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	vnet "github.com/cubicle-dev/cubicle/vmm/virtio/net"
)

const (
	// EtherType is the type of the test frames: IEEE 802 "local
	// experimental" (IEEE Std 802, EtherType 88-B5), which nothing else
	// on the link sends.
	EtherType = 0x88b5
	// ethPAll is ETH_P_ALL (include/uapi/linux/if_ether.h).
	ethPAll = 0x0003
	// WaitFor bounds Recv.
	WaitFor = 5 * time.Second
)

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// Netns is the namespace's tap and sockets.
type Netns struct {
	// Tap is the tap's descriptor (vnet header on, non-blocking), for a
	// net device to take over.
	Tap     *os.File
	TapName string
	Ifindex int
	// MAC is the host side's address on the link (the tap interface's).
	MAC [6]byte
	pkt int
	ctl int
}

// New creates the namespace, or fails the test. It skips when not root:
// only root may create network namespaces and taps.
func New(t testing.TB, mtu int) *Netns {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace and a tap device")
	}
	type result struct {
		ns  *Netns
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// This thread enters the new namespace and is never unlocked, so
		// the runtime discards it when the goroutine ends.
		runtime.LockOSThread()
		ns, err := setup(mtu)
		ch <- result{ns, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("network namespace with a tap: %v", r.err)
	}
	t.Cleanup(func() {
		unix.Close(r.ns.pkt)
		unix.Close(r.ns.ctl)
	})
	return r.ns
}

func setup(mtu int) (*Netns, error) {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("unshare: %w", err)
	}
	tap, name, err := vnet.OpenTap("ctap%d")
	if err != nil {
		return nil, err
	}
	ns := &Netns{Tap: tap, TapName: name}
	fail := func(err error) (*Netns, error) {
		tap.Close()
		if ns.ctl > 0 {
			unix.Close(ns.ctl)
		}
		return nil, err
	}
	// Keep IPv6 from sending router solicitations on the link.
	_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/disable_ipv6", []byte("1"), 0)
	if ns.ctl, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
		return fail(err)
	}
	ifr, _ := unix.NewIfreq(name)
	ifr.SetUint32(uint32(mtu))
	if err := unix.IoctlIfreq(ns.ctl, unix.SIOCSIFMTU, ifr); err != nil {
		return fail(fmt.Errorf("set mtu: %w", err))
	}
	ifr, _ = unix.NewIfreq(name)
	if err := unix.IoctlIfreq(ns.ctl, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fail(err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(ns.ctl, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fail(fmt.Errorf("link up: %w", err))
	}
	ifr, _ = unix.NewIfreq(name)
	if err := unix.IoctlIfreq(ns.ctl, unix.SIOCGIFINDEX, ifr); err != nil {
		return fail(err)
	}
	ns.Ifindex = int(ifr.Uint32())
	ifr, _ = unix.NewIfreq(name)
	if err := unix.IoctlIfreq(ns.ctl, unix.SIOCGIFHWADDR, ifr); err != nil {
		return fail(err)
	}
	// struct ifreq: ifr_hwaddr is a struct sockaddr after the name; its
	// sa_data starts 2 bytes in.
	raw := (*[unix.IFNAMSIZ + 16]byte)(unsafe.Pointer(ifr))
	copy(ns.MAC[:], raw[unix.IFNAMSIZ+2:])
	if ns.pkt, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(ethPAll))); err != nil {
		return fail(err)
	}
	if err := unix.Bind(ns.pkt, &unix.SockaddrLinklayer{Protocol: htons(ethPAll), Ifindex: ns.Ifindex}); err != nil {
		unix.Close(ns.pkt)
		return fail(err)
	}
	tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
	_ = unix.SetsockoptTimeval(ns.pkt, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return ns, nil
}

// Frame builds an Ethernet frame of EtherType.
func Frame(dst, src [6]byte, payload []byte) []byte {
	f := append(append(append([]byte{}, dst[:]...), src[:]...), byte(EtherType>>8), byte(EtherType&0xff))
	return append(f, payload...)
}

// Send puts a frame on the tap's link from the namespace side.
func (ns *Netns) Send(t testing.TB, f []byte) {
	t.Helper()
	sa := &unix.SockaddrLinklayer{Protocol: htons(EtherType), Ifindex: ns.Ifindex, Halen: 6}
	copy(sa.Addr[:], f[:6])
	if err := unix.Sendto(ns.pkt, f, 0, sa); err != nil {
		t.Fatalf("packet socket send: %v", err)
	}
}

// Recv waits up to WaitFor for a frame of EtherType on the link.
func (ns *Netns) Recv(t testing.TB) []byte {
	t.Helper()
	buf := make([]byte, 70000)
	deadline := time.Now().Add(WaitFor)
	for time.Now().Before(deadline) {
		n, from, err := unix.Recvfrom(ns.pkt, buf, 0)
		if err != nil {
			continue // timeout: poll again until the deadline
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if n >= 14 && binary.BigEndian.Uint16(buf[12:]) == EtherType {
			return append([]byte(nil), buf[:n]...)
		}
	}
	t.Fatal("no frame arrived on the tap's link")
	return nil
}

// Ethtool asks the tap's kernel device for one ethtool value
// (ETHTOOL_GTSO, ETHTOOL_GTXCSUM).
func (ns *Netns) Ethtool(t testing.TB, cmd uint32) uint32 {
	t.Helper()
	val := &struct{ cmd, data uint32 }{cmd: cmd}
	var ifr struct {
		name [unix.IFNAMSIZ]byte
		data uintptr
		_    [16]byte
	}
	copy(ifr.name[:], ns.TapName)
	ifr.data = uintptr(unsafe.Pointer(val))
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(ns.ctl), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
	runtime.KeepAlive(val)
	if errno != 0 {
		t.Fatalf("ethtool %#x: %v", cmd, errno)
	}
	return val.data
}
