package network

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// hostNet is one network the host already uses: an interface address or a
// route's destination.
type hostNet struct {
	Prefix netip.Prefix
	// What says where it was found, for the error message.
	What string
}

// OverlapError says which host networks a pool prefix collides with.
type OverlapError struct {
	Prefix   netip.Prefix
	Overlaps []string
}

func (e *OverlapError) Error() string {
	return fmt.Sprintf("network: address pool %v overlaps host networks (%s); choose another prefix for sandbox addresses",
		e.Prefix, strings.Join(e.Overlaps, "; "))
}

// Unwrap lets errors.Is match ErrPrefixOverlap.
func (e *OverlapError) Unwrap() error { return ErrPrefixOverlap }

// checkOverlap returns an *OverlapError if prefix overlaps any of used.
// Default routes (0.0.0.0/0) are skipped: they overlap everything and say
// nothing about which addresses are taken.
func checkOverlap(prefix netip.Prefix, used []hostNet) error {
	var hits []string
	for _, u := range used {
		if u.Prefix.Bits() == 0 || !u.Prefix.Overlaps(prefix) {
			continue
		}
		hits = append(hits, fmt.Sprintf("%v (%s)", u.Prefix, u.What))
	}
	if hits != nil {
		return &OverlapError{Prefix: prefix, Overlaps: hits}
	}
	return nil
}

// hostNets gathers the IPv4 addresses and routes of the host namespace,
// leaving out links in skip (the pool's own host ends, whose /30s lie inside
// the prefix by design). Routes come from every table, not only main, so
// that policy-routed networks (VPNs such as Tailscale, which routes
// 100.64.0.0/10 from table 52) count too.
func hostNets(h *netlink.Handle, skip map[int]bool) ([]hostNet, error) {
	var out []hostNet
	addrs, err := h.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("network: list host addresses: %w", err)
	}
	for _, a := range addrs {
		if skip[a.LinkIndex] {
			continue
		}
		if p, ok := ipNetPrefix(a.IPNet); ok {
			out = append(out, hostNet{p, "address on " + linkName(h, a.LinkIndex)})
		}
	}
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("network: list host routes: %w", err)
	}
	for _, r := range routes {
		if skip[r.LinkIndex] || r.Dst == nil {
			continue
		}
		if p, ok := ipNetPrefix(r.Dst); ok {
			out = append(out, hostNet{p, fmt.Sprintf("route via %s in table %d", linkName(h, r.LinkIndex), r.Table)})
		}
	}
	return out, nil
}

func linkName(h *netlink.Handle, index int) string {
	if l, err := h.LinkByIndex(index); err == nil {
		return l.Attrs().Name
	}
	return fmt.Sprintf("link %d", index)
}

func ipNetPrefix(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones).Masked(), true
}

func prefixIPNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(bits, a.BitLen())}
}
