package policy

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/network/nat"
)

func pfx(s ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, x := range s {
		out = append(out, netip.MustParsePrefix(x))
	}
	return out
}

func newManager(t *testing.T, w *world, name string) *Manager {
	t.Helper()
	t.Cleanup(func() { os.Remove("/sys/fs/bpf/cubicle-test") }) // only once empty
	// Pins of a test that failed before its Manager's Remove; runs after
	// the test's own cleanups.
	t.Cleanup(func() { os.RemoveAll(filepath.Join("/sys/fs/bpf/cubicle-test", name)) })
	// The fake world's internet is TEST-NET-2, a closed special-purpose
	// range and the router's LAN: the operator opens it, as the e2e suite
	// does for its own.
	m, err := New(Options{Name: name, PinRoot: "/sys/fs/bpf/cubicle-test", PoolPrefix: testPool,
		HostAddrs: pfx("198.51.100.1/32", "10.77.0.1/32"), AllowCIDRs: pfx("198.51.100.0/24"), NetNS: w.router})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return m
}

type check struct {
	name string
	fn   func() error
	want bool // reachable
}

// run runs the checks concurrently (each blocked one waits out dialLimit)
// and reports every mismatch.
func run(t *testing.T, checks ...check) {
	t.Helper()
	errs := make([]error, len(checks))
	var wg sync.WaitGroup
	for i, c := range checks {
		wg.Go(func() { errs[i] = c.fn() })
	}
	wg.Wait()
	for i, c := range checks {
		// A path that should be open may miss the first round's short
		// budget on a loaded host (a first IPv6 neighbour solicitation
		// lost is retransmitted after a second): it gets more tries.
		// Retries cannot open a blocked path, so "blocked" keeps its
		// one-round meaning.
		for try := 0; try < 3 && c.want && errs[i] != nil; try++ {
			errs[i] = c.fn()
		}
		if err := errs[i]; (err == nil) != c.want {
			t.Errorf("%s: reachable=%v (err %v), want reachable=%v", c.name, err == nil, err, c.want)
		}
	}
}

// TestEgress runs real traffic through the fake world: first without the
// program (so every "blocked" below is known to be reachable otherwise),
// then under policies.
func TestEgress(t *testing.T) {
	w := newWorld(t)
	aGet := func(addr string) func() error {
		return func() error { _, err := get(w.a, "tcp4", addr); return err }
	}
	toB := check{"A→B tcp", aGet(bAddr + ":80"), false}
	toBUDP := check{"A→B udp", func() error { return udpEcho(w.a, bAddr+":9000") }, false}
	toBICMP := check{"A→B icmp", func() error { return ping(w.a, bAddr) }, false}
	bToA := check{"B→A tcp", func() error { _, err := get(w.b, "tcp4", aAddr+":49983"); return err }, false}
	inet := check{"A→internet", aGet(inetAddr + ":80"), true}
	lan := check{"A→LAN", aGet(lanAddr + ":80"), false}
	meta := check{"A→metadata", aGet(metadata + ":80"), false}
	gwTCP := check{"A→gateway tcp (new connection)", aGet(gwA + ":8080"), false}
	gwICMP := check{"A→gateway icmp", func() error { return ping(w.a, gwA) }, false}
	v6 := check{"A→gateway ipv6", func() error { _, err := get(w.a, "tcp6", "[fd00:a::1]:8080"); return err }, false}
	envd := check{"router→A envd (host-initiated)", func() error { _, err := get(w.router, "tcp4", aAddr+":49983"); return err }, true}
	pingA := check{"router→A icmp", func() error { return ping(w.router, aAddr) }, true}
	inetUDP := check{"A→internet udp", func() error { return udpEcho(w.a, inetAddr+":9000") }, true}
	inetICMP := check{"A→internet icmp", func() error { return ping(w.a, inetAddr) }, true}
	gwDNSUDP := check{"A→gateway dns udp", func() error { return udpEcho(w.a, gwA+":53") }, true}
	gwDNSTCP := check{"A→gateway dns tcp", func() error { return tcpEcho(w.a, gwA+":53") }, true}
	gwUDP := check{"A→gateway other udp", func() error { return udpEcho(w.a, gwA+":5353") }, false}
	// DNS and DNS over TLS elsewhere, which nothing opens.
	var inetDNS []check
	for _, port := range []string{"53", "853"} {
		inetDNS = append(inetDNS,
			check{"A→internet udp " + port, func() error { return udpEcho(w.a, inetAddr+":"+port) }, false},
			check{"A→internet tcp " + port, func() error { return tcpEcho(w.a, inetAddr+":"+port) }, false})
	}
	reach := func(c check, want bool) check { c.want = want; return c }
	reachAll := func(cs []check, want bool) []check {
		var out []check
		for _, c := range cs {
			out = append(out, reach(c, want))
		}
		return out
	}

	t.Run("baseline without program", func(t *testing.T) {
		run(t, append(reachAll(inetDNS, true), reach(toB, true), reach(toBUDP, true), reach(toBICMP, true), reach(bToA, true), inet,
			inetUDP, inetICMP, reach(lan, true), reach(meta, true), reach(gwTCP, true), reach(gwICMP, true), reach(v6, true),
			gwDNSUDP, gwDNSTCP, reach(gwUDP, true), envd, pingA)...)
	})

	m := newManager(t, w, "egress"+strconv.Itoa(os.Getpid()))
	t.Cleanup(func() {
		if err := m.Remove(); err != nil {
			t.Error(err)
		}
	})
	def := Policy{AllowInternet: true}
	must(t, m.Attach(w.sbaIndex, def), "attach A")
	must(t, m.Attach(w.sbbIndex, def), "attach B")
	if err := m.Attach(w.sbaIndex, def); !errors.Is(err, ErrAttached) {
		t.Errorf("second Attach: %v, want ErrAttached", err)
	}

	t.Run("default policy", func(t *testing.T) {
		run(t, append(inetDNS, toB, toBUDP, toBICMP, bToA, inet, inetUDP, inetICMP, lan, meta, gwTCP, gwICMP, v6,
			gwDNSUDP, gwDNSTCP, gwUDP, envd, pingA)...)
	})
	t.Run("internet disabled", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{}), "update")
		// The resolver stays reachable: it is how domain rules work.
		run(t, append(inetDNS, reach(inet, false), reach(inetUDP, false), reach(inetICMP, false), lan, meta,
			toB, toBUDP, toBICMP, gwTCP, gwUDP, gwDNSUDP, gwDNSTCP, envd, pingA)...)
	})
	t.Run("allowOut opens LAN host, internet still off", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{AllowOut: pfx(lanAddr + "/32")}), "update")
		run(t, reach(lan, true), reach(inet, false), envd)
	})
	t.Run("denyOut blocks internet host", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{AllowInternet: true, DenyOut: pfx(inetAddr + "/32")}), "update")
		run(t, reach(inet, false), lan)
	})
	t.Run("allowOut beats denyOut", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{AllowInternet: true, AllowOut: pfx(inetAddr + "/32"), DenyOut: pfx("198.51.100.0/24")}), "update")
		run(t, inet)
	})
	t.Run("hard rules and DNS beat allowOut 0.0.0.0/0", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{AllowOut: pfx("0.0.0.0/0")}), "update")
		run(t, append(inetDNS, meta, toB, toBICMP, gwTCP, gwUDP, reach(lan, true), inet, inetUDP, gwDNSUDP, envd)...)
	})
	t.Run("live update: next connection", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, def), "update")
		run(t, inet)
		must(t, m.Update(w.sbaIndex, Policy{AllowInternet: true, DenyOut: pfx("198.51.0.0/16")}), "update")
		run(t, reach(inet, false))
		must(t, m.Update(w.sbaIndex, def), "update")
		run(t, inet)
	})
	t.Run("counters", func(t *testing.T) {
		c, err := m.Counters(w.sbaIndex)
		must(t, err, "counters")
		if c.PassedPackets == 0 || c.PassedBytes == 0 || c.DroppedPackets == 0 || c.DroppedBytes == 0 || c.DroppedIPv6Packets == 0 {
			t.Errorf("counters did not all move: %+v", c)
		}
		run(t, inet)
		c2, _ := m.Counters(w.sbaIndex)
		if c2.PassedPackets <= c.PassedPackets {
			t.Errorf("passed packets %d → %d after a connection", c.PassedPackets, c2.PassedPackets)
		}
		run(t, lan)
		c3, _ := m.Counters(w.sbaIndex)
		if c3.DroppedPackets <= c2.DroppedPackets {
			t.Errorf("dropped packets %d → %d after a blocked connection", c2.DroppedPackets, c3.DroppedPackets)
		}
		if c3.DroppedIPv6Packets > c3.DroppedPackets {
			t.Errorf("ipv6 drops %d exceed drops %d", c3.DroppedIPv6Packets, c3.DroppedPackets)
		}
	})
	t.Run("restart adopts pinned state", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{AllowInternet: true, DenyOut: pfx(inetAddr + "/32")}), "update")
		must(t, m.Close(), "close")
		run(t, reach(inet, false), toB) // the filter and maps outlive the process's handles
		m2 := newManager(t, w, "egress"+strconv.Itoa(os.Getpid()))
		m = m2
		run(t, reach(inet, false), toB, envd)
		must(t, m.Update(w.sbaIndex, def), "update after restart")
		run(t, inet)
		for _, name := range []string{mapAllow, mapDeny} {
			if n := countEntries(t, m, name); n != 0 {
				t.Errorf("%s has %d entries after update to default; old rules leaked", name, n)
			}
		}
	})
	t.Run("detach removes everything", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{AllowOut: pfx(lanAddr + "/32"), DenyOut: pfx("8.8.8.8/32")}), "update")
		must(t, m.Detach(w.sbaIndex), "detach A")
		must(t, m.Detach(w.sbbIndex), "detach B")
		for _, name := range []string{mapConfig, mapCounters, mapAllow, mapDeny} {
			if n := countEntries(t, m, name); n != 0 {
				t.Errorf("%s has %d entries after detaching all", name, n)
			}
		}
		if _, err := m.Counters(w.sbaIndex); !errors.Is(err, ErrNotAttached) {
			t.Errorf("Counters after Detach: %v, want ErrNotAttached", err)
		}
		run(t, reach(toB, true)) // no filter left on the links
	})
	t.Run("NAT", func(t *testing.T) {
		opts := nat.Options{Pool: testPool, Table: "cubicletest", NetNS: w.router}
		for range 2 { // idempotent
			out, err := nat.Enable(opts)
			must(t, err, "nat enable")
			if out != "r-inet" {
				t.Errorf("uplink %q, want r-inet (default route)", out)
			}
		}
		if got, err := get(w.a, "tcp4", inetAddr+":80"); err != nil || got != "198.51.100.1" {
			t.Errorf("internet host saw %q (err %v), want masqueraded 198.51.100.1", got, err)
		}
		if got, err := get(w.a, "tcp4", lanAddr+":80"); err != nil || got != aAddr {
			t.Errorf("LAN host saw %q (err %v), want unmasqueraded %s (not the uplink)", got, err, aAddr)
		}
		run(t, toB) // nftables forward drop, with no eBPF program attached
		must(t, nat.Disable(opts), "nat disable")
		must(t, nat.Disable(opts), "nat disable twice")
		run(t, reach(toB, true))
		if got, _ := get(w.a, "tcp4", inetAddr+":80"); got != aAddr {
			t.Errorf("after Disable internet host saw %q, want %s", got, aAddr)
		}
	})
}

func countEntries(t *testing.T, m *Manager, name string) int {
	t.Helper()
	var n int
	var k, v []byte
	it := m.maps[name].Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestReconcileDropsVanishedLinks(t *testing.T) {
	w := newWorld(t)
	name := "reconcile" + strconv.Itoa(os.Getpid())
	m := newManager(t, w, name)
	must(t, m.Attach(w.sbbIndex, Policy{AllowOut: pfx("10.0.0.0/8")}), "attach")
	must(t, m.Learn(w.sbbIndex, []netip.Addr{netip.MustParseAddr(inetAddr)}, time.Now().Add(time.Hour)), "learn")
	if _, err := get(w.b, "tcp4", inetAddr+":80"); err != nil {
		t.Fatalf("B→learned internet host: %v", err)
	}
	if countEntries(t, m, mapFlows) == 0 {
		t.Fatal("no flow recorded")
	}
	must(t, m.Close(), "close")
	l, err := w.rh.LinkByIndex(w.sbbIndex)
	must(t, err, "link")
	must(t, w.rh.LinkDel(l), "delete link")
	m = newManager(t, w, name)
	defer m.Remove()
	for _, mp := range []string{mapConfig, mapCounters, mapAllow, mapLearned, mapFlows} {
		if n := countEntries(t, m, mp); n != 0 {
			t.Errorf("%s: %d entries of a vanished link survived reconcile", mp, n)
		}
	}
	if _, err := os.Stat(filepath.Join("/sys/fs/bpf/cubicle-test", name, progName)); err != nil {
		t.Errorf("program not pinned: %v", err)
	}
}
