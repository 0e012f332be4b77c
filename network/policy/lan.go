package policy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// minOnLinkBits is the shortest on-link route HostLAN counts as a LAN. A
// device route broader than a /8 is a tunnel carrying (part of) the
// internet, e.g. "0.0.0.0/1 dev wg0" of a VPN set up by hand, not a
// network of neighbours; closing it would cut sandboxes off the internet.
const minOnLinkBits = 8

// HostLAN lists the networks around the host that sandboxes must not reach
// by default, besides its own addresses (HostAddrs) and the fixed ranges:
//
//   - the host's connected subnets: the prefix of every IPv4 address of
//     every interface but loopback, and its peer's for a point-to-point
//     address;
//   - every on-link route (a unicast route with link scope and no
//     gateway, in any routing table) at least a /8 long: neighbours the
//     host reaches directly;
//   - every gateway of every route (multipath next hops included), as a
//     /32: the routers, whose management interfaces and neighbours' view
//     a sandbox has no business with even when they are on no subnet of
//     the host's (on-link gateways).
//
// Prefixes inside pool (the sandboxes' own devices and routes) are left
// out. The result is masked, sorted and without duplicates; h names the
// host's namespace, nil means the caller's. These are closed like the
// private ranges: only an allowOut CIDR opens them (Options.HostLAN).
func HostLAN(h *netlink.Handle, pool netip.Prefix) ([]netip.Prefix, error) {
	if h == nil {
		h = &netlink.Handle{} // the zero Handle works in the caller's namespace
	}
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("policy: listing host links: %w", err)
	}
	loopback := map[int]bool{}
	for _, l := range links {
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			loopback[l.Attrs().Index] = true
		}
	}
	addrs, err := addrList(h, nil)
	if err != nil {
		return nil, fmt.Errorf("policy: listing host addresses: %w", err)
	}
	routes, err := routeList(h)
	if err != nil {
		return nil, fmt.Errorf("policy: listing host routes: %w", err)
	}
	var out []netip.Prefix
	add := func(p netip.Prefix, ok bool) {
		if !ok || !p.IsValid() || p.Bits() == 0 {
			return // a default route's "subnet" is the internet
		}
		p = p.Masked()
		if pool.Contains(p.Addr()) && p.Bits() >= pool.Bits() {
			return
		}
		out = append(out, p)
	}
	for _, a := range addrs {
		if loopback[a.LinkIndex] {
			continue // 127/8 is hard-denied
		}
		add(ipNetPrefix(a.IPNet))
		if a.Peer != nil {
			add(ipNetPrefix(a.Peer))
		}
	}
	for _, r := range routes {
		if loopback[r.LinkIndex] {
			continue
		}
		gws := []net.IP{r.Gw}
		for _, nh := range r.MultiPath {
			gws = append(gws, nh.Gw)
		}
		hasGw := false
		for _, gw := range gws {
			if a, ok := netip.AddrFromSlice(gw.To4()); ok && !a.IsUnspecified() {
				hasGw = true
				add(netip.PrefixFrom(a, 32), true)
			}
		}
		if !hasGw && r.Type == unix.RTN_UNICAST && r.Scope == netlink.SCOPE_LINK && r.Dst != nil {
			if p, ok := ipNetPrefix(r.Dst); ok && p.Bits() >= minOnLinkBits {
				add(p, true)
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out), nil
}

// ipNetPrefix converts an IPv4 net.IPNet; ok is false for anything else.
func ipNetPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP.To4())
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits != 32 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones), true
}

// routeList lists the IPv4 routes of every table, retrying interrupted
// dumps as addrList does.
func routeList(h *netlink.Handle) ([]netlink.Route, error) {
	var routes []netlink.Route
	var err error
	for range dumpRetries {
		routes, err = h.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return routes, err
}

// routeAffectsHost reports whether a route change can change HostLAN:
// the routes of sandbox devices, inside the pool, come and go with every
// sandbox and are never part of it; IPv6 is dropped wholesale.
func (m *Manager) routeAffectsHost(u netlink.RouteUpdate) bool {
	if u.Family != 0 && u.Family != unix.AF_INET {
		return false
	}
	if u.Gw != nil || len(u.MultiPath) > 0 {
		return true
	}
	p, ok := ipNetPrefix(u.Dst)
	return !ok || !(m.pool.Contains(p.Addr()) && p.Bits() >= m.pool.Bits())
}
