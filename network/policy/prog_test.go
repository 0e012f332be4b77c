package policy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"testing"

	"github.com/cilium/ebpf"
)

// The program parses whatever a sandbox sends, so FuzzProgram checks it
// against model, a plain Go statement of the package documentation's rule
// order, on packets built from fuzz input and run with BPF_PROG_TEST_RUN.
// The test run gives the packet to the loopback device of the namespace
// the run happens in, so skb->ifindex is 1: the fuzz sandbox is ifindex 1.

// The fuzz sandbox's world.
var (
	fzGateway = netip.MustParseAddr("100.96.0.1")
	fzAddr    = netip.MustParseAddr("100.96.0.2")
	fzHost    = netip.MustParsePrefix("192.0.2.1/32")
	fzAllow   = pfx("203.0.113.0/24", "10.1.0.0/16", "5.6.7.128/25", "9.9.9.0/25")
	fzDeny    = pfx("198.18.0.0/15")
	// The host's LAN (a public-looking subnet and an on-link gateway),
	// the operator's opened ranges (in a special-purpose and a private
	// range) and the operator's hard-denied range.
	fzLAN      = pfx("5.6.7.0/24", "5.6.8.1/32")
	fzOpen     = pfx("198.51.100.0/25", "10.9.0.0/16")
	fzDenyCIDR = pfx("9.9.9.0/24")
	// Learned for ifindex 1, with whether the deadline is still ahead.
	fzLearned = map[netip.Addr]bool{
		netip.MustParseAddr("8.8.4.4"):      true,
		netip.MustParseAddr("8.8.8.8"):      false,
		netip.MustParseAddr("10.2.0.5"):     true, // private
		netip.MustParseAddr("198.18.5.5"):   true, // in denyOut
		netip.MustParseAddr("5.6.7.9"):      true, // the host's LAN
		netip.MustParseAddr("198.51.100.7"): true, // special-purpose, opened by the operator
	}
	// Learned for another sandbox only.
	fzOther = netip.MustParseAddr("1.0.0.1")
	// Destinations worth hitting, by selector; others come from raw input.
	fzDsts = []netip.Addr{fzGateway, fzAddr, netip.MustParseAddr("100.96.0.6"), fzHost.Addr(),
		netip.MustParseAddr("169.254.169.254"), netip.MustParseAddr("10.77.0.10"),
		netip.MustParseAddr("203.0.113.9"), netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("198.18.0.1"),
		netip.MustParseAddr("8.8.4.4"), netip.MustParseAddr("8.8.8.8"), netip.MustParseAddr("10.2.0.5"),
		netip.MustParseAddr("198.18.5.5"), fzOther, netip.MustParseAddr("1.1.1.1"),
		// 15…
		netip.MustParseAddr("5.6.7.9"), netip.MustParseAddr("5.6.8.1"), netip.MustParseAddr("198.51.100.7"),
		netip.MustParseAddr("198.51.100.200"), netip.MustParseAddr("10.9.1.1"), netip.MustParseAddr("9.9.9.9"),
		netip.MustParseAddr("192.0.0.9"), netip.MustParseAddr("5.6.8.2"), netip.MustParseAddr("5.6.7.200")}
)

const fzPolicyID = 7

// fzPacket describes one fuzz packet.
type fzPacket struct {
	etherType   uint16
	ihl         uint8
	frag        uint16 // flags and fragment offset half-word
	proto       uint8
	src, dst    netip.Addr
	sport       uint16
	dport       uint16
	tcpFlags    uint8
	icmpType    uint8
	length      int // bytes after the Ethernet header
	internet    bool
	learnedFlag bool
	flow        bool // a flow entry for this packet exists beforehand
}

func (p fzPacket) String() string {
	return fmt.Sprintf("ethertype %#04x ihl %d frag %#04x proto %d %v:%d → %v:%d tcp flags %#02x icmp type %d length %d internet=%v learned=%v flow=%v",
		p.etherType, p.ihl, p.frag, p.proto, p.src, p.sport, p.dst, p.dport, p.tcpFlags, p.icmpType, p.length,
		p.internet, p.learnedFlag, p.flow)
}

// fullLength is the length of p's IPv4 header, options and 14 bytes of
// L4 header; bytes() cuts the packet to p.length of it.
func (p fzPacket) fullLength() int { return max(20, int(p.ihl)*4) + 14 }

func (p fzPacket) bytes() []byte {
	b := make([]byte, 14+max(p.fullLength(), p.length))
	binary.BigEndian.PutUint16(b[12:], p.etherType)
	ip := b[14:]
	ip[0] = 0x40 | p.ihl&0x0f
	binary.BigEndian.PutUint16(ip[2:], uint16(p.length))
	binary.BigEndian.PutUint16(ip[6:], p.frag)
	ip[8] = 64
	ip[9] = p.proto
	s, d := p.src.As4(), p.dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	l4 := ip[max(20, int(p.ihl)*4):]
	binary.BigEndian.PutUint16(l4[0:], p.sport)
	binary.BigEndian.PutUint16(l4[2:], p.dport)
	l4[13] = p.tcpFlags
	if p.proto == ipprotoICMP {
		l4[0] = p.icmpType
	}
	return b[:14+p.length]
}

// hasPorts reports whether the program reads ports from p: a TCP or UDP
// packet from the sandbox that is not a non-first fragment.
func (p fzPacket) hasPorts() bool {
	return p.etherType == ethPIP && p.length >= 20 && p.ihl >= 5 && p.src == fzAddr &&
		p.frag&ipFragOffset == 0 && (p.proto == ipprotoTCP || p.proto == ipprotoUDP)
}

func (p fzPacket) flowKey() flowKey {
	k := flowKey{Ifindex: 1, Addr: p.dst.As4(), Proto: p.proto}
	binary.BigEndian.PutUint16(k.Sport[:], p.sport)
	binary.BigEndian.PutUint16(k.Dport[:], p.dport)
	return k
}

func anyContains(ps []netip.Prefix, a netip.Addr) bool {
	return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(a) })
}

type verdict struct {
	pass, drop6 bool
	flowHit     bool // passed on an existing flow (its last-seen is updated)
	newFlow     bool // passed on a learned address, flow recorded
}

// closed is rule 11's set: the closed ranges and the host's LAN, less
// what the operator opened.
func closed(a netip.Addr) bool {
	return (anyContains(closedRanges, a) || anyContains(fzLAN, a)) && !anyContains(fzOpen, a)
}

// model is the package documentation's rule order.
func model(p fzPacket) verdict {
	drop, pass := verdict{}, verdict{pass: true}
	switch {
	case p.etherType == ethPARP:
		return pass
	case p.etherType == ethPIPv6:
		return verdict{drop6: true}
	case p.etherType != ethPIP:
		return drop
	}
	l4off := int(p.ihl) * 4
	if p.length < 20 || p.ihl < 5 || p.src != fzAddr { // 3.
		return drop
	}
	ports := p.hasPorts()
	if ports && p.length < l4off+4 { // ports cut off
		return drop
	}
	if p.dst == fzGateway { // 4.
		switch {
		case ports && p.dport == portDNS:
			return pass
		case p.frag&ipFragOffset != 0:
			return drop
		case p.proto == ipprotoICMP:
			return verdict{pass: p.length >= l4off+8 && p.icmpType == icmpEchoReply}
		default:
			// TCP needs a host socket; the fuzz namespace has none.
			return drop
		}
	}
	hard := append(append([]netip.Prefix{testPool, fzHost}, builtinHard...), fzDenyCIDR...)
	switch {
	case anyContains(hard, p.dst): // 5.
		return drop
	case ports && (p.dport == portDNS || p.dport == portDoT): // 6.
		return drop
	case anyContains(fzAllow, p.dst): // 7.
		return pass
	}
	if p.learnedFlag { // 8.
		if ports && p.flow {
			return verdict{pass: true, flowHit: true}
		}
		if fzLearned[p.dst] && !closed(p.dst) {
			return verdict{pass: true, newFlow: ports}
		}
	}
	switch {
	case anyContains(fzDeny, p.dst): // 9.
		return drop
	case !p.internet: // 10.
		return drop
	case closed(p.dst): // 11.
		return drop
	}
	return pass // 12.
}

func FuzzProgram(f *testing.F) {
	requireRoot(f)
	ns := newNS(f)
	var m *Manager
	must(f, inNS(ns, func() (err error) {
		m, err = New(Options{Name: "fuzz" + strconv.Itoa(os.Getpid()), PinRoot: "/sys/fs/bpf/cubicle-test",
			PoolPrefix: testPool, HostAddrs: []netip.Prefix{fzHost}, HostLAN: fzLAN, AllowCIDRs: fzOpen, DenyCIDRs: fzDenyCIDR})
		return err
	}), "New")
	f.Cleanup(func() {
		m.Remove()
		os.Remove("/sys/fs/bpf/cubicle-test")
	})
	zero := make([]counterValue, ebpf.MustPossibleCPU())
	must(f, m.maps[mapCounters].Put(uint32(1), zero), "counters")
	must(f, m.putRules(mapAllow, fzPolicyID, fzAllow), "allow")
	must(f, m.putRules(mapDeny, fzPolicyID, fzDeny), "deny")
	for a, valid := range fzLearned {
		dl := uint64(1) // long past
		if valid {
			dl = ^uint64(0)
		}
		must(f, m.maps[mapLearned].Put(learnKey{Ifindex: 1, Addr: a.As4()}, dl), "learned")
	}
	must(f, m.maps[mapLearned].Put(learnKey{Ifindex: 2, Addr: fzOther.As4()}, ^uint64(0)), "learned other")
	counters := func(t *testing.T) (c counterValue) {
		var per []counterValue
		must(t, m.maps[mapCounters].Lookup(uint32(1), &per), "counters")
		for _, v := range per {
			c.PassPackets += v.PassPackets
			c.DropPackets += v.DropPackets
			c.DropIPv6Packets += v.DropIPv6Packets
		}
		return c
	}

	// Seeds: one per rule and parsing corner.
	type seed struct {
		eth, dstSel             uint8
		dstRaw                  uint32
		proto, ihl              uint8
		frag, sport, dport      uint16
		tcpFlags, icmpType, cut uint8
		cfg                     uint8 // bit 0 internet, bit 1 learned flag, bit 2 flow present, bit 3 spoof
	}
	const tcp, udp, icmp = ipprotoTCP, ipprotoUDP, ipprotoICMP
	full := uint8(255)
	for _, s := range []seed{
		{eth: 1, cut: full},                      // ARP
		{eth: 2, cut: full},                      // IPv6
		{eth: 3, cut: full},                      // VLAN
		{eth: 4, dstRaw: 0x0800_0000, cut: full}, // ethertype from dstRaw: IPv4, to the gateway
		{dstSel: 14, proto: tcp, ihl: 5, dport: 443, cut: full, cfg: 1},         // public, internet on
		{dstSel: 14, proto: tcp, ihl: 5, dport: 443, cut: full},                 // internet off
		{dstSel: 14, proto: tcp, ihl: 5, dport: 443, cut: full, cfg: 9},         // spoofed
		{dstSel: 14, proto: tcp, ihl: 4, dport: 443, cut: full, cfg: 1},         // ihl < 5
		{dstSel: 14, proto: tcp, ihl: 5, cut: 20, cfg: 1},                       // TCP header cut
		{dstSel: 14, proto: tcp, ihl: 5, cut: 22, cfg: 1},                       // ports cut
		{dstSel: 14, proto: tcp, ihl: 8, dport: 443, cut: 33, cfg: 1},           // options, ports beyond the end
		{dstSel: 14, proto: udp, ihl: 6, dport: 53, cut: full, cfg: 1},          // DNS elsewhere, options
		{dstSel: 6, proto: tcp, ihl: 5, dport: 853, cut: full, cfg: 1},          // DoT to allowOut
		{dstSel: 6, proto: udp, ihl: 5, frag: 0x0010, dport: 53, cut: full},     // non-first fragment, allowOut
		{dstSel: 0, proto: udp, ihl: 5, dport: 53, cut: full},                   // gateway DNS
		{dstSel: 0, proto: tcp, ihl: 5, dport: 53, tcpFlags: tcpSYN, cut: full}, // gateway TCP DNS SYN
		{dstSel: 0, proto: tcp, ihl: 5, dport: 8080, tcpFlags: tcpSYN, cut: full, cfg: 1},
		{dstSel: 0, proto: tcp, ihl: 5, dport: 8080, tcpFlags: tcpACK, cut: full, cfg: 1},
		{dstSel: 0, proto: udp, ihl: 5, dport: 5353, cut: full, cfg: 1},
		{dstSel: 0, proto: icmp, ihl: 5, icmpType: 0, cut: 28},                        // echo reply
		{dstSel: 0, proto: icmp, ihl: 5, icmpType: 8, cut: 28},                        // echo request
		{dstSel: 0, proto: icmp, ihl: 5, cut: 27},                                     // reply cut short
		{dstSel: 14, proto: udp, ihl: 5, frag: 0x2000, dport: 53, cut: full, cfg: 1},  // first fragment, DNS
		{dstSel: 0, proto: udp, ihl: 5, frag: 0x2000 | 3, dport: 53, cut: full},       // gateway, non-first fragment
		{dstSel: 2, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                 // other sandbox
		{dstSel: 3, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                 // host
		{dstSel: 4, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                 // metadata
		{dstSel: 5, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                 // LAN
		{dstSel: 7, proto: tcp, ihl: 5, dport: 80, cut: full},                         // allowOut private
		{dstSel: 8, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                 // denyOut
		{dstSel: 9, proto: tcp, ihl: 5, dport: 443, cut: full, cfg: 2},                // learned
		{dstSel: 9, proto: udp, ihl: 5, dport: 443, cut: full, cfg: 0},                // learned, flag unset
		{dstSel: 9, proto: icmp, ihl: 5, cut: full, cfg: 2},                           // learned, no ports
		{dstSel: 10, proto: tcp, ihl: 5, dport: 443, cut: full, cfg: 2},               // learned, expired
		{dstSel: 10, proto: tcp, ihl: 5, dport: 443, cut: full, cfg: 6},               // expired, flow
		{dstSel: 11, proto: tcp, ihl: 5, dport: 443, cut: full, cfg: 3},               // learned private
		{dstSel: 12, proto: tcp, ihl: 5, dport: 443, cut: full, cfg: 3},               // learned in denyOut
		{dstSel: 13, proto: tcp, ihl: 5, dport: 443, cut: full, cfg: 2},               // learned by another
		{dstSel: 14, proto: udp, ihl: 5, dport: 443, cut: full, cfg: 6},               // flow only
		{dstSel: 14, proto: udp, ihl: 5, frag: 0x0001, dport: 443, cut: full, cfg: 6}, // fragment of a flow
		{dstSel: 15, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                // LAN neighbour
		{dstSel: 15, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 3},                // LAN neighbour, learned
		{dstSel: 16, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                // on-link gateway
		{dstSel: 22, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                // beside the gateway
		{dstSel: 23, proto: tcp, ihl: 5, dport: 80, cut: full},                        // LAN, opened by allowOut
		{dstSel: 17, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                // opened by the operator
		{dstSel: 17, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 2},                // opened, learned
		{dstSel: 18, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                // TEST-NET-2, not opened
		{dstSel: 19, proto: udp, ihl: 5, dport: 80, cut: full, cfg: 1},                // private, opened
		{dstSel: 20, proto: tcp, ihl: 5, dport: 80, cut: full, cfg: 1},                // --deny-cidr, in allowOut
		{dstSel: 21, proto: udp, ihl: 5, dport: 5351, cut: full, cfg: 1},              // PCP anycast
	} {
		f.Add(s.eth, s.dstSel, s.dstRaw, s.proto, s.ihl, s.frag, s.sport, s.dport, s.tcpFlags, s.icmpType, s.cut, s.cfg)
	}

	f.Fuzz(func(t *testing.T, eth, dstSel uint8, dstRaw uint32, proto, ihl uint8, frag, sport, dport uint16,
		tcpFlags, icmpType, cut, cfg uint8) {
		p := fzPacket{
			etherType: []uint16{ethPIP, ethPARP, ethPIPv6, 0x8100, uint16(dstRaw >> 16)}[eth%5],
			ihl:       ihl % 16, frag: frag, proto: proto, src: fzAddr, sport: sport, dport: dport,
			tcpFlags: tcpFlags, icmpType: icmpType,
			internet: cfg&1 != 0, learnedFlag: cfg&2 != 0, flow: cfg&4 != 0,
		}
		// cut 255 keeps the whole packet; others cut it anywhere.
		p.length = p.fullLength()
		if cut != 255 {
			p.length = int(cut) % (p.length + 1)
		}
		// The kernel's test run refuses IPv4 and IPv6 packets shorter than
		// their fixed header, so those lengths cannot be tried here.
		if p.etherType == ethPIPv6 {
			p.length = max(p.length, 40)
		} else if p.etherType == ethPIP && p.length < 20 {
			return
		}
		if int(dstSel) < len(fzDsts) {
			p.dst = fzDsts[dstSel]
		} else {
			var b [4]byte
			binary.BigEndian.PutUint32(b[:], dstRaw)
			p.dst = netip.AddrFrom4(b)
		}
		if cfg&8 != 0 {
			p.src = netip.MustParseAddr("100.96.0.3")
		}

		cv := configValue{PolicyID: fzPolicyID, Gateway: fzGateway.As4(), Addr: fzAddr.As4()}
		if p.internet {
			cv.Flags |= flagInternet
		}
		if p.learnedFlag {
			cv.Flags |= flagLearned
		}
		must(t, m.maps[mapConfig].Put(uint32(1), cv), "config")
		fk := p.flowKey()
		if p.hasPorts() && p.flow {
			must(t, m.maps[mapFlows].Put(fk, uint64(0)), "flow")
		} else if err := m.maps[mapFlows].Delete(fk); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
		p.flow = p.flow && p.hasPorts()

		before := counters(t)
		var ret uint32
		must(t, inNS(ns, func() (err error) {
			ret, err = m.prog.Run(&ebpf.RunOptions{Data: p.bytes()})
			return err
		}), "run")
		want := model(p)
		if got := ret == tcActOK; got != want.pass {
			t.Fatalf("%v: program passes=%v (ret %d), model passes=%v (%+v)", p, got, ret, want.pass, want)
		}
		after := counters(t)
		if want.pass && after.PassPackets != before.PassPackets+1 ||
			!want.pass && after.DropPackets != before.DropPackets+1 ||
			want.drop6 != (after.DropIPv6Packets == before.DropIPv6Packets+1) {
			t.Errorf("%v: counters %+v → %+v for %+v", p, before, after, want)
		}
		if !p.hasPorts() {
			return
		}
		var seen uint64
		err := m.maps[mapFlows].Lookup(fk, &seen)
		exists := err == nil
		if !exists && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatal(err)
		}
		if exists != (p.flow || want.newFlow) {
			t.Errorf("%v: flow exists=%v, want %v (%+v)", p, exists, p.flow || want.newFlow, want)
		}
		if (want.flowHit || want.newFlow) && seen == 0 {
			t.Errorf("%v: flow's last-seen time not set", p)
		}
	})
}
