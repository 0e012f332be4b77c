package policy

import (
	"context"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The LAN world: a host (router) whose only uplink is a LAN on public
// addresses, as at hosters and on some campus networks; nothing in it is
// private or special-purpose, so only the host's own routes tell the LAN
// from the internet. Everything lives in namespaces the test makes.
//
//	router (the host): sba 100.96.0.1/30; r-lan 11.1.0.5/24, default
//	        route via 11.7.0.1 (an on-link gateway outside the subnet)
//	lan   eth0: 11.1.0.7/24 (a neighbour), 11.7.0.1 (the gateway),
//	      11.9.9.9 and 11.8.8.8 (the internet beyond it), and 11.6.0.9,
//	      11.3.0.1, 11.2.0.9 for routes and addresses the host gains
//	      later; HTTP :80 on all
//	sandbox A 100.96.0.2/30
const (
	lanHost     = "11.1.0.5"
	lanNeighbor = "11.1.0.7"
	lanGateway  = "11.7.0.1"
	lanInet     = "11.9.9.9"
	lanDenied   = "11.8.8.8" // in the operator's --deny-cidr
	lanLaterNet = "11.6.0.9" // an on-link route to 11.6.0.0/24 comes later
	lanLaterGw  = "11.3.0.1" // later the gateway of a route to 11.4.0.0/16
	lanLaterSub = "11.2.0.9" // the host later takes 11.2.0.5/24
)

func newLANWorld(t *testing.T) *world {
	requireRoot(t)
	w := &world{t: t}
	w.router, w.lan, w.a = newNS(t), newNS(t), newNS(t)
	w.rh = handle(t, w.router)
	w.sbaIndex = w.link(w.a, "sba", []string{gwA + "/30"}, []string{aAddr + "/30"}, gwA)
	w.link(w.lan, "r-lan", []string{lanHost + "/24"}, []string{lanNeighbor + "/24", lanGateway + "/32", lanInet + "/32",
		lanDenied + "/32", lanLaterNet + "/32", lanLaterGw + "/32", lanLaterSub + "/32"}, lanHost)
	rlan, err := w.rh.LinkByName("r-lan")
	must(t, err, "r-lan")
	must(t, w.rh.RouteAdd(&netlink.Route{LinkIndex: rlan.Attrs().Index, Gw: net.ParseIP(lanGateway),
		Flags: int(netlink.FLAG_ONLINK)}), "default route via an on-link gateway")
	must(t, inNS(w.router, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644)
	}), "router forwarding")
	w.serveHTTP(w.lan, "tcp4", "0.0.0.0:80")
	w.serveHTTP(w.router, "tcp4", lanHost+":80")
	return w
}

func newLANManager(t *testing.T, w *world, name string, opts Options) *Manager {
	t.Helper()
	t.Cleanup(func() { os.Remove("/sys/fs/bpf/cubicle-test") })
	t.Cleanup(func() { os.RemoveAll("/sys/fs/bpf/cubicle-test/" + name) })
	opts.Name, opts.PinRoot, opts.PoolPrefix, opts.NetNS = name, "/sys/fs/bpf/cubicle-test", testPool, w.router
	m, err := New(opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		if err := m.Remove(); err != nil {
			t.Error(err)
		}
	})
	must(t, m.FollowHostAddrs(ctx), "follow")
	return m
}

// TestHostLAN: on a host whose LAN uses public addresses, sandboxes reach
// neither its neighbours nor its gateways by default, reach them when
// allowOut names them, never reach the operator's --deny-cidr ranges, and
// the host's networks are followed as they change.
func TestHostLAN(t *testing.T) {
	w := newLANWorld(t)
	reach := func(name, addr string, want bool) check {
		return check{name, func() error { _, err := get(w.a, "tcp4", addr+":80"); return err }, want}
	}
	nb := reach("A→LAN neighbour", lanNeighbor, false)
	gw := reach("A→on-link default gateway", lanGateway, false)
	host := reach("A→host's LAN address", lanHost, false)
	inet := reach("A→internet beyond the gateway", lanInet, true)
	denied := reach("A→--deny-cidr range", lanDenied, false)
	on := func(c check) check { c.want = true; return c }

	t.Run("baseline without program", func(t *testing.T) {
		run(t, on(nb), on(gw), on(host), inet, on(denied), reach("A→later net", lanLaterNet, true),
			reach("A→later gateway", lanLaterGw, true), reach("A→later subnet", lanLaterSub, true))
	})

	lan, err := HostLAN(w.rh, testPool)
	must(t, err, "HostLAN")
	for _, p := range pfx("11.1.0.0/24", lanGateway+"/32") {
		if !slices.Contains(lan, p) {
			t.Errorf("HostLAN %v lacks %v", lan, p)
		}
	}
	for _, p := range lan {
		if p.Overlaps(testPool) || p.Bits() == 0 || p.Addr().IsLoopback() {
			t.Errorf("HostLAN %v holds %v (pool, default route or loopback)", lan, p)
		}
	}

	// A device route this broad is a tunnel carrying the internet (a VPN
	// set up by hand), not a LAN.
	rlan, err := w.rh.LinkByName("r-lan")
	must(t, err, "r-lan")
	wide := &netlink.Route{LinkIndex: rlan.Attrs().Index, Dst: mustIPNet("0.0.0.0/1"), Scope: netlink.SCOPE_LINK}
	must(t, w.rh.RouteAdd(wide), "wide on-link route")
	lan, err = HostLAN(w.rh, testPool)
	must(t, err, "HostLAN")
	must(t, w.rh.RouteDel(wide), "drop wide route")
	if slices.Contains(lan, netip.MustParsePrefix("0.0.0.0/1")) {
		t.Errorf("HostLAN %v holds the /1 device route", lan)
	}

	m := newLANManager(t, w, "lan"+strconv.Itoa(os.Getpid()), Options{DenyCIDRs: pfx("11.8.0.0/16")})
	def := Policy{AllowInternet: true}
	must(t, m.Attach(w.sbaIndex, def), "attach A")
	t.Run("default policy", func(t *testing.T) {
		run(t, nb, gw, host, inet, denied)
	})
	t.Run("allowOut opens the LAN and the gateway", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{AllowOut: pfx("11.1.0.0/24", lanGateway+"/32")}), "update")
		run(t, on(nb), on(gw), host, denied, reach("A→internet, closed", lanInet, false))
	})
	t.Run("deny-cidr beats allowOut 0.0.0.0/0", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{AllowOut: pfx("0.0.0.0/0")}), "update")
		run(t, on(nb), on(gw), inet, host, denied)
	})
	t.Run("learned answers do not open the LAN", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, Policy{}), "update")
		must(t, m.Learn(w.sbaIndex, addrs(lanNeighbor, lanInet), time.Now().Add(time.Hour)), "learn")
		run(t, nb, inet)
	})

	t.Run("followed", func(t *testing.T) {
		must(t, m.Update(w.sbaIndex, def), "update")
		idx := rlan.Attrs().Index
		later := []check{reach("A→later net", lanLaterNet, true), reach("A→later gateway", lanLaterGw, true),
			reach("A→later subnet", lanLaterSub, true)}
		run(t, later...)

		onLink := &netlink.Route{LinkIndex: idx, Dst: mustIPNet("11.6.0.0/24"), Scope: netlink.SCOPE_LINK}
		must(t, w.rh.RouteAdd(onLink), "on-link route")
		must(t, w.rh.RouteAdd(&netlink.Route{LinkIndex: idx, Dst: mustIPNet("11.4.0.0/16"), Gw: net.ParseIP(lanLaterGw),
			Flags: int(netlink.FLAG_ONLINK)}), "route via a new gateway")
		must(t, w.rh.AddrAdd(rlan, &netlink.Addr{IPNet: mustIPNet("11.2.0.5/24"), Flags: unix.IFA_F_NODAD}), "new host subnet")
		for _, c := range later {
			eventually(t, c.name+" closed", func() bool { return c.fn() != nil })
		}
		run(t, inet)

		must(t, w.rh.RouteDel(onLink), "drop on-link route")
		eventually(t, "A→later net open again", func() bool { return later[0].fn() == nil })
	})
}

// TestAllowCIDRs: what the operator opens is reached like the internet,
// hard denies inside it stay denied, and the rest of the LAN stays closed.
func TestAllowCIDRs(t *testing.T) {
	w := newLANWorld(t)
	m := newLANManager(t, w, "lanopen"+strconv.Itoa(os.Getpid()), Options{AllowCIDRs: pfx("11.1.0.0/24")})
	must(t, m.Attach(w.sbaIndex, Policy{AllowInternet: true}), "attach A")
	reach := func(name, addr string, want bool) check {
		return check{name, func() error { _, err := get(w.a, "tcp4", addr+":80"); return err }, want}
	}
	run(t, reach("A→opened LAN neighbour", lanNeighbor, true), reach("A→gateway outside it", lanGateway, false),
		reach("A→host address inside it", lanHost, false), reach("A→internet", lanInet, true))
	must(t, m.Update(w.sbaIndex, Policy{}), "update")
	run(t, reach("A→opened LAN neighbour, internet off", lanNeighbor, false))
	// A name answered with an opened address opens it, as on the internet.
	must(t, m.Learn(w.sbaIndex, addrs(lanNeighbor), time.Now().Add(time.Hour)), "learn")
	run(t, reach("A→opened LAN neighbour, learned", lanNeighbor, true))
}

func mustIPNet(s string) *net.IPNet {
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	n.IP = ip.To4()
	return n
}
