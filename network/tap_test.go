package network

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// envdPort is where the host reaches envd in every sandbox.
const envdPort = 49983

// inNetns runs fn on a throwaway thread inside the namespace mounted at path.
func inNetns(path string, fn func() error) error {
	return onFreshThread(func() error {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return err
		}
		return fn()
	})
}

func TestTapDevices(t *testing.T) {
	for _, tc := range []struct {
		name   string
		spares int
	}{{"cold", 0}, {"spare", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			p, _ := testPool(t, "100.88.248.0/28", func(o *Options) { o.Mode = ModeTap; o.Spares = tc.spares })
			if tc.spares > 0 {
				waitSpares(t, p, tc.spares)
			}
			a, err := p.Setup(context.Background(), "vm"+tc.name)
			if err != nil {
				t.Fatal(err)
			}
			if a.Tap != TapName || a.GuestAddr != GuestAddr || a.GuestGateway != GuestGateway || a.GuestSubnet != GuestSubnet {
				t.Fatalf("attachment %+v lacks the guest addressing", a)
			}
			checkHostEnd(t, a)
			checkGuestEnd(t, a)
			checkTap(t, a)
			if err := p.Teardown(context.Background(), a.ID); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// checkTap checks a's tap, forwarding and translation table in its
// namespace, and that the VMM can open the tap the way it does.
func checkTap(t *testing.T, a Attachment) {
	t.Helper()
	ns, err := netns.GetFromPath(a.Netns)
	if err != nil {
		t.Fatalf("open netns: %v", err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(a.Tap)
	if err != nil {
		t.Fatalf("%s in netns: %v", a.Tap, err)
	}
	tap, ok := l.(*netlink.Tuntap)
	if !ok || tap.Mode != netlink.TUNTAP_MODE_TAP || tap.NonPersist || tap.Flags&netlink.TUNTAP_MULTI_QUEUE != 0 {
		t.Errorf("%s is %+v, want a persistent single-queue tap", a.Tap, l)
	}
	if l.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("%s is not up", a.Tap)
	}
	addrs, _ := h.AddrList(l, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != GuestGateway.String()+"/30" {
		t.Errorf("%s addresses %v, want %v/30", a.Tap, addrs, GuestGateway)
	}

	var forward []byte
	err = inNetns(a.Netns, func() error {
		var err error
		forward, err = os.ReadFile(ipForwardPath)
		if err != nil {
			return err
		}
		// As vmm/virtio/net.OpenTap does: these flags, then the
		// virtio-net header size.
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		ifr, err := unix.NewIfreq(a.Tap)
		if err != nil {
			return err
		}
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			return err
		}
		return unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, 12)
	})
	if err != nil {
		t.Fatalf("open %s as the VMM does: %v", a.Tap, err)
	}
	if strings.TrimSpace(string(forward)) != "1" {
		t.Errorf("ip_forward in netns is %q, want 1", forward)
	}

	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		t.Fatal(err)
	}
	tbl := &nftables.Table{Name: natTable, Family: nftables.TableFamilyIPv4}
	for _, want := range []struct {
		chain string
		rules int
	}{{"prerouting", 3}, {"postrouting", 1}, {"forward", 1}} {
		rules, err := c.GetRules(tbl, &nftables.Chain{Name: want.chain, Table: tbl})
		if err != nil || len(rules) != want.rules {
			t.Errorf("chain %s in netns: %d rules (%v), want %d", want.chain, len(rules), err, want.rules)
		}
	}
}

// TestTapTraffic sends real packets through a ModeTap sandbox: the test
// plays the guest on tap0, with handmade Ethernet frames.
func TestTapTraffic(t *testing.T) {
	p, _ := testPool(t, "100.88.248.16/28", func(o *Options) { o.Mode = ModeTap })
	a, err := p.Setup(context.Background(), "vmtraffic")
	if err != nil {
		t.Fatal(err)
	}
	g := attachGuest(t, a)

	t.Run("guest egress is translated to Addr", func(t *testing.T) {
		srv := listenUDP(t, netip.AddrPortFrom(a.Gateway, 0))
		to := addrPort(srv.LocalAddr())
		from := netip.AddrPortFrom(GuestAddr, 40001)
		g.send(t, udpFrame(g.tapMAC, g.mac, from, to, []byte("ping")))
		got, src := recvFrom(t, srv)
		if got != "ping" || src.Addr() != a.Addr {
			t.Fatalf("server got %q from %v, want ping from the sandbox address %v", got, src, a.Addr)
		}
		if _, err := srv.WriteToUDPAddrPort([]byte("pong"), src); err != nil {
			t.Fatal(err)
		}
		reply := g.expect(t, "the reply", func(p frame) bool {
			return p.proto == unix.IPPROTO_UDP && p.src == to && p.dst == from
		})
		if string(reply.payload) != "pong" || !bytes.Equal(reply.ethDst, g.mac) {
			t.Fatalf("reply %+v, want pong to %v", reply, g.mac)
		}
	})

	t.Run("guest cannot forge its source", func(t *testing.T) {
		srv := listenUDP(t, netip.AddrPortFrom(a.Gateway, 0))
		to := addrPort(srv.LocalAddr())
		// Both take the same path, so the forged one, were it let
		// through, would arrive first.
		forged := netip.AddrPortFrom(netip.MustParseAddr("10.11.12.13"), 40002)
		g.send(t, udpFrame(g.tapMAC, g.mac, forged, to, []byte("forged")))
		g.send(t, udpFrame(g.tapMAC, g.mac, netip.AddrPortFrom(GuestAddr, 40002), to, []byte("genuine")))
		if got, src := recvFrom(t, srv); got != "genuine" || src.Addr() != a.Addr {
			t.Fatalf("server got %q from %v first, want the genuine datagram from %v", got, src, a.Addr)
		}
	})

	t.Run("host reaches the guest at Addr", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		done := make(chan struct{})
		go func() {
			defer close(done)
			var d net.Dialer
			if c, err := d.DialContext(ctx, "tcp4", netip.AddrPortFrom(a.Addr, envdPort).String()); err == nil {
				c.Close()
			}
		}()
		defer func() { cancel(); <-done }()
		syn := g.expect(t, "a SYN for the guest", func(p frame) bool {
			return p.proto == unix.IPPROTO_TCP && p.dst == netip.AddrPortFrom(GuestAddr, envdPort) && p.tcpFlags&tcpSYN != 0
		})
		if syn.src.Addr() != a.Gateway {
			t.Fatalf("SYN from %v, want the host end %v", syn.src, a.Gateway)
		}
	})

	t.Run("guest DNS goes to the host end", func(t *testing.T) {
		dns := netip.AddrPortFrom(GuestGateway, dnsPort)
		srv := listenUDP(t, netip.AddrPortFrom(a.Gateway, dnsPort))
		from := netip.AddrPortFrom(GuestAddr, 40053)
		g.send(t, udpFrame(g.tapMAC, g.mac, from, dns, []byte("query")))
		got, src := recvFrom(t, srv)
		if got != "query" || src.Addr() != a.Addr {
			t.Fatalf("resolver got %q from %v, want the query from %v", got, src, a.Addr)
		}
		if _, err := srv.WriteToUDPAddrPort([]byte("answer"), src); err != nil {
			t.Fatal(err)
		}
		// The answer comes from the address the guest asked.
		g.expect(t, "the DNS answer", func(p frame) bool {
			return p.proto == unix.IPPROTO_UDP && p.src == dns && p.dst == from && string(p.payload) == "answer"
		})

		// DNS over TCP: the host end's listener answers the guest's SYN.
		ln, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(a.Gateway, dnsPort)))
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		from = netip.AddrPortFrom(GuestAddr, 40054)
		g.send(t, tcpSYNFrame(g.tapMAC, g.mac, from, dns))
		g.expect(t, "a SYN-ACK from the resolver", func(p frame) bool {
			return p.proto == unix.IPPROTO_TCP && p.src == dns && p.dst == from && p.tcpFlags&(tcpSYN|tcpACK) == tcpSYN|tcpACK
		})
	})
}

func listenUDP(t *testing.T, at netip.AddrPort) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(at))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.UDPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// fakeGuest is the test's side of a tap: it sends frames as the guest
// would and answers the kernel's ARP for GuestAddr.
type fakeGuest struct {
	tap    *os.File
	mac    net.HardwareAddr
	tapMAC net.HardwareAddr
}

func attachGuest(t *testing.T, a Attachment) *fakeGuest {
	t.Helper()
	g := &fakeGuest{mac: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x21}}
	fd := -1
	err := inNetns(a.Netns, func() error {
		var err error
		// The tap belongs to the namespace /dev/net/tun is opened in.
		fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq(a.Tap)
		if err != nil {
			return err
		}
		// No virtio-net header: the test writes bare frames.
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			return err
		}
		l, err := netlink.LinkByName(a.Tap)
		if err != nil {
			return err
		}
		g.tapMAC = l.Attrs().HardwareAddr
		return nil
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		t.Fatalf("attach to %s: %v", a.Tap, err)
	}
	g.tap = os.NewFile(uintptr(fd), a.Tap) // non-blocking: deadlines work
	t.Cleanup(func() { g.tap.Close() })
	return g
}

func (g *fakeGuest) send(t *testing.T, frame []byte) {
	t.Helper()
	if _, err := g.tap.Write(frame); err != nil {
		t.Fatalf("write to tap: %v", err)
	}
}

// recvFrom reads one datagram from srv and returns it with its source.
func recvFrom(t *testing.T, srv *net.UDPConn) (string, netip.AddrPort) {
	t.Helper()
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 1500)
	n, src, err := srv.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("%v received nothing: %v", srv.LocalAddr(), err)
	}
	return string(buf[:n]), netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
}

// expect reads frames from the tap until one matches, answering ARP
// requests for GuestAddr on the way, for at most 5 seconds.
func (g *fakeGuest) expect(t *testing.T, what string, match func(frame) bool) frame {
	t.Helper()
	g.tap.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 65536)
	for {
		n, err := g.tap.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %s on the tap: %v", what, err)
		}
		b := buf[:n]
		if reply, ok := arpReply(b, GuestAddr, g.mac); ok {
			g.send(t, reply)
			continue
		}
		if f, ok := parseFrame(b); ok && match(f) {
			return f
		}
	}
}

// Ethernet, IPv4, ARP, UDP and TCP, as much as the test needs (RFC 894,
// 791, 826, 768, 793).
const (
	etherIPv4 = 0x0800
	etherARP  = 0x0806
	tcpSYN    = 0x02
	tcpACK    = 0x10
)

// frame is a parsed IPv4 frame.
type frame struct {
	ethDst, ethSrc net.HardwareAddr
	proto          byte
	src, dst       netip.AddrPort
	tcpFlags       byte
	payload        []byte
}

func parseFrame(b []byte) (frame, bool) {
	if len(b) < 14+20 || binary.BigEndian.Uint16(b[12:]) != etherIPv4 {
		return frame{}, false
	}
	f := frame{ethDst: slices.Clone(b[0:6]), ethSrc: slices.Clone(b[6:12])}
	ip := b[14:]
	ihl := int(ip[0]&0xf) * 4
	total := int(binary.BigEndian.Uint16(ip[2:]))
	if ip[0]>>4 != 4 || ihl < 20 || total < ihl || total > len(ip) {
		return frame{}, false
	}
	f.proto = ip[9]
	src := netip.AddrFrom4([4]byte(ip[12:16]))
	dst := netip.AddrFrom4([4]byte(ip[16:20]))
	l4 := ip[ihl:total]
	switch f.proto {
	case unix.IPPROTO_UDP:
		if len(l4) < 8 {
			return frame{}, false
		}
		f.payload = slices.Clone(l4[8:])
	case unix.IPPROTO_TCP:
		if len(l4) < 20 {
			return frame{}, false
		}
		f.tcpFlags = l4[13]
	default:
		f.src, f.dst = netip.AddrPortFrom(src, 0), netip.AddrPortFrom(dst, 0)
		return f, true
	}
	f.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:]))
	f.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))
	return f, true
}

// arpReply answers b if it is an ARP request for addr, as mac.
func arpReply(b []byte, addr netip.Addr, mac net.HardwareAddr) ([]byte, bool) {
	if len(b) < 14+28 || binary.BigEndian.Uint16(b[12:]) != etherARP {
		return nil, false
	}
	arp := b[14:]
	// Ethernet/IPv4 request (htype 1, ptype IPv4, hlen 6, plen 4, op 1).
	if binary.BigEndian.Uint16(arp[0:]) != 1 || binary.BigEndian.Uint16(arp[2:]) != etherIPv4 ||
		arp[4] != 6 || arp[5] != 4 || binary.BigEndian.Uint16(arp[6:]) != 1 {
		return nil, false
	}
	if netip.AddrFrom4([4]byte(arp[24:28])) != addr {
		return nil, false
	}
	senderMAC, senderIP := arp[8:14], arp[14:18]
	out := ethernet(senderMAC, mac, etherARP, nil)
	out = binary.BigEndian.AppendUint16(out, 1)
	out = binary.BigEndian.AppendUint16(out, etherIPv4)
	out = append(out, 6, 4, 0, 2) // hlen, plen, op reply
	out = append(out, mac...)
	out = append(out, addr.AsSlice()...)
	out = append(out, senderMAC...)
	out = append(out, senderIP...)
	return out, true
}

func ethernet(dst, src net.HardwareAddr, typ uint16, payload []byte) []byte {
	b := append(slices.Clone([]byte(dst)), src...)
	b = binary.BigEndian.AppendUint16(b, typ)
	return append(b, payload...)
}

func ipv4(src, dst netip.Addr, proto byte, l4 []byte) []byte {
	h := make([]byte, 20)
	h[0] = 0x45
	binary.BigEndian.PutUint16(h[2:], uint16(20+len(l4)))
	binary.BigEndian.PutUint16(h[6:], 0x4000) // don't fragment
	h[8] = 64
	h[9] = proto
	copy(h[12:], src.AsSlice())
	copy(h[16:], dst.AsSlice())
	binary.BigEndian.PutUint16(h[10:], checksum(0, h))
	return append(h, l4...)
}

// l4Checksum is the UDP/TCP checksum of segment, over the IPv4
// pseudo-header.
func l4Checksum(src, dst netip.Addr, proto byte, segment []byte) uint16 {
	pseudo := append(src.AsSlice(), dst.AsSlice()...)
	pseudo = append(pseudo, 0, proto)
	pseudo = binary.BigEndian.AppendUint16(pseudo, uint16(len(segment)))
	return checksum(sum(0, pseudo), segment)
}

func sum(acc uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	return acc
}

func checksum(acc uint32, b []byte) uint16 {
	acc = sum(acc, b)
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	return ^uint16(acc)
}

func udpFrame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.AddrPort, payload []byte) []byte {
	u := make([]byte, 8, 8+len(payload))
	binary.BigEndian.PutUint16(u[0:], src.Port())
	binary.BigEndian.PutUint16(u[2:], dst.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(8+len(payload)))
	u = append(u, payload...)
	binary.BigEndian.PutUint16(u[6:], l4Checksum(src.Addr(), dst.Addr(), unix.IPPROTO_UDP, u))
	return ethernet(dstMAC, srcMAC, etherIPv4, ipv4(src.Addr(), dst.Addr(), unix.IPPROTO_UDP, u))
}

func tcpSYNFrame(dstMAC, srcMAC net.HardwareAddr, src, dst netip.AddrPort) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], src.Port())
	binary.BigEndian.PutUint16(h[2:], dst.Port())
	binary.BigEndian.PutUint32(h[4:], 0x01020304) // sequence number
	h[12] = 5 << 4                                // header length: 5 words
	h[13] = tcpSYN
	binary.BigEndian.PutUint16(h[14:], 65535) // window
	binary.BigEndian.PutUint16(h[16:], l4Checksum(src.Addr(), dst.Addr(), unix.IPPROTO_TCP, h))
	return ethernet(dstMAC, srcMAC, etherIPv4, ipv4(src.Addr(), dst.Addr(), unix.IPPROTO_TCP, h))
}
