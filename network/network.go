// Package network gives each sandbox its network devices and addresses: a
// named network namespace, a veth pair whose host end stays in the host
// namespace, and a /30 from an address pool that never overlaps the host's
// own networks.
//
// Each sandbox's /30 is split as x.x.x.1 (host end, the sandbox's gateway)
// and x.x.x.2 (sandbox end, named eth0 inside the namespace). The host reaches
// the sandbox's ports at x.x.x.2 over the veth.
//
// Who a sandbox may talk to is not this package's job: network/policy
// attaches an eBPF program to each host end (other sandboxes, the host's own
// addresses and link-local ranges are always closed; the E2B egress policy
// decides the rest), and network/nat masquerades the pool out of the host's
// default route. Without them a sandbox reaches its host end, x.x.x.1, and
// so every host service listening on all addresses.
//
// The kernel is the pool's persistent state: every host-end link carries its
// slot index in its name (LinkPrefix + index) and the sandbox ID in its alias
// (IFLA_IFALIAS), so a Pool made after a server restart finds every existing
// allocation again from the links themselves. Nothing can drift out of
// sync with the devices, and a host reboot, which removes the devices, frees
// their addresses too.
package network

import (
	"errors"
	"net/netip"
)

// DefaultPrefix is the pool's default address range: a /11 from the
// shared-address space of RFC 6598, rarely routed on hosts, holding 524288
// sandboxes.
var DefaultPrefix = netip.MustParsePrefix("100.96.0.0/11")

const (
	// DefaultNetnsDir is where named network namespaces are bind-mounted by
	// default: the directory iproute2 uses, so `ip netns exec` works on them.
	DefaultNetnsDir = "/run/netns"
	// DefaultLinkPrefix starts the name of every host-end veth.
	DefaultLinkPrefix = "cubicle"
	// GuestLink is the name of the sandbox end of the veth, inside the
	// sandbox's namespace (names there cannot clash with the host's).
	GuestLink = "eth0"
	// ifNameMax is the longest interface name Linux accepts: IFNAMSIZ (16,
	// include/uapi/linux/if.h) less the terminating NUL.
	ifNameMax = 15
)

var (
	// ErrBadPrefix is returned for an address prefix the pool cannot use.
	ErrBadPrefix = errors.New("network: unusable address prefix")
	// ErrPrefixOverlap is returned by NewPool when the pool's prefix overlaps
	// an address or route of the host; see *OverlapError.
	ErrPrefixOverlap = errors.New("network: address pool overlaps host networks")
	// ErrExhausted is returned when every /30 of the pool is in use.
	ErrExhausted = errors.New("network: address pool exhausted")
	// ErrInUse is returned when a sandbox ID already has an attachment.
	ErrInUse = errors.New("network: sandbox already attached")
	// ErrBadID is returned for a sandbox ID that cannot name devices.
	ErrBadID = errors.New("network: invalid sandbox id")
)
