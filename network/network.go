// Package network gives each sandbox its network devices and addresses: a
// named network namespace, a veth pair whose host end stays in the host
// namespace, and a /30 from an address pool that never overlaps the host's
// own networks.
//
// Each sandbox's /30 is split as x.x.x.1 (host end, the sandbox's gateway)
// and x.x.x.2 (sandbox end, named eth0 inside the namespace). The host reaches
// the sandbox's ports at x.x.x.2 over the veth.
//
// For a microVM (ModeTap) the namespace also holds a tap device, tap0, for
// the VMM. Every VM uses the same in-guest addressing, GuestAddr with
// gateway GuestGateway, so that one snapshot restores into any namespace;
// nftables inside the namespace translates between GuestAddr and the
// sandbox's x.x.x.2, so that from the host a VM looks exactly like a gVisor
// sandbox, and sends DNS for GuestGateway to the host end's resolver.
//
// Making devices takes a dozen netlink calls. A Pool with Options.Spares
// makes them ahead of time; Setup then only writes the sandbox ID into a
// spare's host-end alias. Teardown removes the devices and the host's
// connection-tracking entries of the sandbox's address, so that no NAT
// state outlives the sandbox and reaches the next one to get the address.
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
// their addresses too. Namespaces are mounted under the same name as the
// host-end link; a spare's link carries the alias "~spare", which no sandbox
// ID can be, and a new Pool removes spares and half-made devices it finds.
package network

import (
	"errors"
	"fmt"
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
	// TapName is the tap device for a microVM's VMM, inside the sandbox's
	// namespace (ModeTap).
	TapName = "tap0"
	// ifNameMax is the longest interface name Linux accepts: IFNAMSIZ (16,
	// include/uapi/linux/if.h) less the terminating NUL.
	ifNameMax = 15
	// spareAlias marks the host end of a spare. It cannot be a sandbox ID
	// (validID needs a letter or digit first), so a Pool made after a
	// restart tells spares from sandboxes.
	spareAlias = "~spare"
)

// The in-guest addressing of every microVM (ModeTap): the guest's eth0 has
// GuestAddr in GuestSubnet with GuestGateway as its default route and its
// DNS server; tap0 has GuestGateway. E2B's Firecracker sandboxes use the
// same pair, so guest images need no change.
var (
	GuestSubnet  = netip.MustParsePrefix("169.254.0.20/30")
	GuestAddr    = netip.MustParseAddr("169.254.0.21")
	GuestGateway = netip.MustParseAddr("169.254.0.22")
)

// Mode says what device a sandbox's runtime uses inside the namespace.
type Mode int

const (
	// ModeVeth: the namespace's eth0 is the sandbox's interface (gVisor
	// copies the namespace's links into its netstack).
	ModeVeth Mode = iota
	// ModeTap: a VMM attaches to TapName in the namespace; the namespace
	// routes and translates between it and eth0.
	ModeTap
)

func (m Mode) String() string {
	switch m {
	case ModeVeth:
		return "veth"
	case ModeTap:
		return "tap"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

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
	// ErrBadOptions is returned by NewPool for options it cannot use.
	ErrBadOptions = errors.New("network: invalid options")
)
