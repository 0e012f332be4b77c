package policy

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// pollLimit bounds every wait for something asynchronous (an expiry, a
// netlink event); tests never assert how long it took.
const pollLimit = 10 * time.Second

// eventually polls cond until it holds or pollLimit passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(pollLimit); ; {
		if cond() {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("%s: not within %v", what, pollLimit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// perIfindex counts the learned or flows entries of ifindex.
func perIfindex(t *testing.T, m *Manager, name string, ifindex int) int {
	t.Helper()
	var k, v []byte
	n := 0
	it := m.maps[name].Iterate()
	for it.Next(&k, &v) {
		if binary.NativeEndian.Uint32(k) == uint32(ifindex) { // both keys start with it
			n++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

func learnedDeadline(t *testing.T, m *Manager, ifindex int, addr string) (uint64, bool) {
	t.Helper()
	var dl uint64
	err := m.maps[mapLearned].Lookup(learnKey{Ifindex: uint32(ifindex), Addr: netip.MustParseAddr(addr).As4()}, &dl)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, false
	}
	must(t, err, "lookup learned")
	return dl, true
}

func addrs(s ...string) []netip.Addr {
	var out []netip.Addr
	for _, x := range s {
		out = append(out, netip.MustParseAddr(x))
	}
	return out
}

// TestLearned: domain answers open their addresses until the deadline,
// connections opened meanwhile outlive it, and nothing of it leaks.
func TestLearned(t *testing.T) {
	w := newWorld(t)
	name := "learned" + strconv.Itoa(os.Getpid())
	m := newManager(t, w, name)
	t.Cleanup(func() { m.Remove() })
	closed := Policy{} // allow_internet_access=false
	must(t, m.Attach(w.sbaIndex, closed), "attach A")

	inetTCP := check{"A→internet tcp", func() error { return tcpEcho(w.a, inetAddr+":7000") }, false}
	inetUDP := check{"A→internet udp", func() error { return udpEcho(w.a, inetAddr+":9000") }, false}
	lan := check{"A→LAN", func() error { _, err := get(w.a, "tcp4", lanAddr+":80"); return err }, false}
	inetDNS := check{"A→internet tcp 53", func() error { return tcpEcho(w.a, inetAddr+":53") }, false}
	open := func(c check) check { c.want = true; return c }
	counters := func() Counters {
		c, err := m.Counters(w.sbaIndex)
		must(t, err, "counters")
		return c
	}

	run(t, inetTCP, inetUDP, lan)
	if perIfindex(t, m, mapFlows, w.sbaIndex) != 0 {
		t.Fatal("flows before anything was learned")
	}

	// Held across Forget and the deadline below, closed at the end.
	var held, heldUDP net.Conn
	parent := t
	t.Run("learn opens new connections", func(t *testing.T) {
		before := counters()
		must(t, m.Learn(w.sbaIndex, addrs(inetAddr), time.Now().Add(2*time.Second)), "learn")
		var err error
		held, err = dial(w.a, "tcp4", inetAddr+":7000")
		must(t, err, "dial learned address")
		parent.Cleanup(func() { held.Close() })
		must(t, exchange(held), "exchange")
		heldUDP, err = dial(w.a, "udp4", inetAddr+":9000")
		must(t, err, "udp socket")
		parent.Cleanup(func() { heldUDP.Close() })
		must(t, exchange(heldUDP), "udp exchange")
		if n := perIfindex(t, m, mapFlows, w.sbaIndex); n < 2 {
			t.Errorf("%d flows recorded, want the TCP and the UDP one", n)
		}
		// Learned opens addresses, not DNS elsewhere, and not the LAN.
		run(t, inetDNS)
		if after := counters(); after.PassedPackets <= before.PassedPackets || after.DroppedPackets <= before.DroppedPackets {
			t.Errorf("counters did not move: %+v → %+v", before, after)
		}
	})
	t.Run("forget closes new connections, not open flows", func(t *testing.T) {
		before := counters()
		must(t, m.Forget(w.sbaIndex, addrs(inetAddr)), "forget")
		if _, ok := learnedDeadline(t, m, w.sbaIndex, inetAddr); ok {
			t.Error("learned entry left after Forget")
		}
		run(t, inetTCP, inetUDP) // new sockets: new source ports
		must(t, exchange(held), "held TCP connection after Forget")
		must(t, exchange(heldUDP), "held UDP flow after Forget")
		if after := counters(); after.DroppedPackets <= before.DroppedPackets {
			t.Errorf("dropped packets %d → %d after blocked connections", before.DroppedPackets, after.DroppedPackets)
		}
	})
	t.Run("expiry closes new connections, not open flows", func(t *testing.T) {
		must(t, m.Learn(w.sbaIndex, addrs(inetAddr), time.Now().Add(time.Second)), "learn")
		c, err := dial(w.a, "tcp4", inetAddr+":7000")
		must(t, err, "dial before the deadline")
		defer c.Close()
		eventually(t, "a new connection fails after the deadline", func() bool { return inetTCP.fn() != nil })
		must(t, exchange(c), "connection opened before the deadline")
		must(t, exchange(held), "older connection")
		n, err := m.SweepLearned()
		must(t, err, "sweep")
		if n < 1 {
			t.Errorf("SweepLearned removed %d, want the expired address", n)
		}
		if perIfindex(t, m, mapLearned, w.sbaIndex) != 0 {
			t.Error("expired entry survived SweepLearned")
		}
		must(t, exchange(c), "connection after the sweep (its flow is not idle)")
	})
	t.Run("learned private address stays closed", func(t *testing.T) {
		must(t, m.Learn(w.sbaIndex, addrs(lanAddr), time.Now().Add(time.Minute)), "learn LAN")
		if _, ok := learnedDeadline(t, m, w.sbaIndex, lanAddr); !ok {
			t.Fatal("LAN address not learned at all")
		}
		run(t, lan)
		must(t, m.Update(w.sbaIndex, Policy{AllowInternet: true}), "internet on")
		run(t, lan)
		must(t, m.Update(w.sbaIndex, closed), "internet off")
	})
	t.Run("learned beats denyOut; update keeps learned", func(t *testing.T) {
		must(t, m.Learn(w.sbaIndex, addrs(inetAddr), time.Now().Add(time.Minute)), "learn")
		must(t, m.Update(w.sbaIndex, Policy{AllowInternet: true, DenyOut: pfx(inetAddr + "/32")}), "update")
		run(t, open(inetTCP), open(inetUDP), inetDNS)
		must(t, m.Update(w.sbaIndex, closed), "update")
		run(t, open(inetTCP))
	})
	t.Run("deadlines only grow", func(t *testing.T) {
		const addr = "192.0.2.77"
		must(t, m.Learn(w.sbaIndex, addrs(addr), time.Now().Add(time.Hour)), "learn 1h")
		long, _ := learnedDeadline(t, m, w.sbaIndex, addr)
		must(t, m.Learn(w.sbaIndex, addrs(addr), time.Now().Add(time.Second)), "learn 1s")
		if got, _ := learnedDeadline(t, m, w.sbaIndex, addr); got != long {
			t.Errorf("shorter deadline replaced the longer one: %d → %d", long, got)
		}
		must(t, m.Learn(w.sbaIndex, addrs(addr), time.Now().Add(2*time.Hour)), "learn 2h")
		if got, _ := learnedDeadline(t, m, w.sbaIndex, addr); got <= long {
			t.Errorf("longer deadline did not replace the shorter one: %d → %d", long, got)
		}
		must(t, m.Forget(w.sbaIndex, addrs(addr)), "forget")
	})
	t.Run("argument handling", func(t *testing.T) {
		before := perIfindex(t, m, mapLearned, w.sbaIndex)
		tests := []struct {
			name    string
			ifindex int
			addrs   []netip.Addr
			until   time.Time
			wantErr error
		}{
			{"unknown interface", 999999, addrs(inetAddr), time.Now().Add(time.Minute), ErrNotAttached},
			{"ipv6 ignored", w.sbaIndex, addrs("2001:db8::1"), time.Now().Add(time.Minute), nil},
			{"invalid ignored", w.sbaIndex, []netip.Addr{{}}, time.Now().Add(time.Minute), nil},
			{"past deadline opens nothing", w.sbaIndex, addrs("192.0.2.78"), time.Now().Add(-time.Second), nil},
		}
		for _, tt := range tests {
			if err := m.Learn(tt.ifindex, tt.addrs, tt.until); !errors.Is(err, tt.wantErr) {
				t.Errorf("%s: Learn: %v, want %v", tt.name, err, tt.wantErr)
			}
		}
		if err := m.Forget(999999, addrs(inetAddr)); !errors.Is(err, ErrNotAttached) {
			t.Errorf("Forget on unknown interface: %v, want ErrNotAttached", err)
		}
		if after := perIfindex(t, m, mapLearned, w.sbaIndex); after != before {
			t.Errorf("learned entries %d → %d; nothing should have been added", before, after)
		}
		mapped := netip.AddrFrom16(netip.MustParseAddr("192.0.2.79").As16())
		must(t, m.Learn(w.sbaIndex, []netip.Addr{mapped}, time.Now().Add(time.Minute)), "learn mapped")
		if _, ok := learnedDeadline(t, m, w.sbaIndex, "192.0.2.79"); !ok {
			t.Error("IPv4-mapped address not learned as IPv4")
		}
	})
	t.Run("restart adopts learned addresses", func(t *testing.T) {
		must(t, m.Close(), "close")
		m = newManager(t, w, name)
		run(t, open(inetTCP)) // still learned for a minute
		must(t, m.Forget(w.sbaIndex, addrs(inetAddr)), "forget after restart")
		run(t, inetTCP)
		must(t, exchange(held), "held connection across the restart")
	})
	t.Run("idle flows are swept", func(t *testing.T) {
		m.flowIdle = time.Nanosecond
		_, err := m.SweepLearned()
		must(t, err, "sweep")
		if n := perIfindex(t, m, mapFlows, w.sbaIndex); n != 0 {
			t.Errorf("%d flows survived an idle sweep", n)
		}
		if exchange(held) == nil {
			t.Error("held connection to a forgotten address still works without its flow")
		}
		m.flowIdle = DefaultFlowIdleTimeout
	})
	t.Run("detach removes learned and flows", func(t *testing.T) {
		must(t, m.Learn(w.sbaIndex, addrs(inetAddr), time.Now().Add(time.Minute)), "learn")
		run(t, open(inetTCP))
		if perIfindex(t, m, mapLearned, w.sbaIndex) == 0 || perIfindex(t, m, mapFlows, w.sbaIndex) == 0 {
			t.Fatal("nothing learned or no flow before Detach")
		}
		must(t, m.Detach(w.sbaIndex), "detach")
		for _, name := range []string{mapLearned, mapFlows} {
			if n := perIfindex(t, m, name, w.sbaIndex); n != 0 {
				t.Errorf("%s: %d entries of the detached interface", name, n)
			}
		}
		// A reused ifindex starts clean.
		must(t, m.Attach(w.sbaIndex, closed), "attach again")
		run(t, inetTCP)
	})
}

// TestFollowHostAddrs: an address the host gains is denied to sandboxes
// without a restart, and released again when the host drops it.
func TestFollowHostAddrs(t *testing.T) {
	w := newWorld(t)
	m := newManager(t, w, "follow"+strconv.Itoa(os.Getpid()))
	t.Cleanup(func() { m.Remove() })
	must(t, m.Attach(w.sbaIndex, Policy{AllowInternet: true}), "attach A")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel) // runs before Remove
	must(t, m.FollowHostAddrs(ctx), "follow")

	hard := func() []netip.Prefix {
		var k addrKey
		var v uint32
		var out []netip.Prefix
		it := m.maps[mapHard].Iterate()
		for it.Next(&k, &v) {
			out = append(out, netip.PrefixFrom(netip.AddrFrom4(k.Addr), int(k.Prefixlen)))
		}
		must(t, it.Err(), "walk hard")
		return out
	}
	// The router's own addresses, and none of its pool addresses (the
	// pool prefix covers them).
	for _, p := range pfx("198.51.100.1/32", "10.77.0.1/32", testPool.String()) {
		if !slices.Contains(hard(), p) {
			t.Errorf("hard denies %v lack %v", hard(), p)
		}
	}
	if slices.Contains(hard(), netip.MustParsePrefix(gwA+"/32")) {
		t.Errorf("pool address %s listed one by one", gwA)
	}

	// X belongs to the internet host, so A reaches it, until the host
	// (router) takes it too and serves on it itself.
	const x = "198.51.100.20"
	xPfx := netip.MustParsePrefix(x + "/32")
	reachX := func() error { _, err := get(w.a, "tcp4", x+":80"); return err }
	ih := handle(t, w.inet)
	eth, err := ih.LinkByName("eth0")
	must(t, err, "inet eth0")
	must(t, ih.AddrAdd(eth, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(x), Mask: net.CIDRMask(32, 32)}, Flags: unix.IFA_F_NODAD}), "inet addr")
	must(t, reachX(), "A→X while only the internet host has it")

	// A veth pair inside the router stands in for a dummy link (this
	// kernel may lack the dummy driver): any link of the host will do.
	must(t, w.rh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "hostaddr0"}, PeerName: "hostaddr1"}), "veth")
	dummy, err := w.rh.LinkByName("hostaddr0")
	must(t, err, "hostaddr0")
	must(t, w.rh.LinkSetUp(dummy), "hostaddr0 up")
	xAddr := &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(x), Mask: net.CIDRMask(32, 32)}, Flags: unix.IFA_F_NODAD}
	must(t, w.rh.AddrAdd(dummy, xAddr), "host addr")
	w.serveHTTP(w.router, "tcp4", x+":80")
	eventually(t, "host address denied", func() bool { return slices.Contains(hard(), xPfx) })
	if err := reachX(); err == nil {
		t.Error("A reaches a host address")
	}

	must(t, w.rh.AddrDel(dummy, xAddr), "drop host addr")
	eventually(t, "host address released", func() bool { return !slices.Contains(hard(), xPfx) })
	must(t, reachX(), "A→X once the host no longer has it")
}
