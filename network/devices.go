package network

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	goruntime "runtime"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	// ipForwardPath is the IPv4 forwarding switch of the namespace of the
	// thread that opens it (Documentation/networking/ip-sysctl.rst).
	ipForwardPath = "/proc/sys/net/ipv4/ip_forward"
	// conntrackCountPath exists (in every namespace) once the kernel has
	// connection tracking loaded; without it there is no state to forget.
	conntrackCountPath = "/proc/sys/net/netfilter/nf_conntrack_count"
	// natTable is the nftables table (family ip) inside a ModeTap
	// sandbox's namespace (the namespace is the sandbox's alone): address
	// translation and the guest's anti-spoofing rule.
	natTable = "cubicle"
	// dnsPort is where the guest's resolver and the host end's listen.
	dnsPort = 53
	// tapFlags make an Ethernet tap without packet-info prefix, with
	// virtio-net headers (include/uapi/linux/if_tun.h): the flags the VMM
	// opens it with (vmm/virtio/net/tap.go).
	tapFlags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR
)

// onFreshThread runs fn on an OS thread of its own that is thrown away
// afterwards. fn may move the thread into another namespace: a goroutine
// that exits while locked to its thread takes the thread with it, so no
// other goroutine ever runs in that namespace by accident.
func onFreshThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		goruntime.LockOSThread()
		// No UnlockOSThread, on purpose: see above.
		errc <- fn()
	}()
	return <-errc
}

// build creates a's namespace and devices, with alias on the host end, and
// returns the host end's interface index as soon as it exists (also on
// a later error). It runs on a throwaway thread and moves that thread into
// the new namespace.
func (p *Pool) build(a Attachment, alias string) (int, error) {
	// A netlink socket acts in the namespace it was opened in, whatever
	// the thread does later: open the host's before leaving it.
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return 0, fmt.Errorf("netlink: %w", err)
	}
	defer host.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return 0, fmt.Errorf("unshare netns: %w", err)
	}
	guest, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return 0, fmt.Errorf("netlink in netns: %w", err)
	}
	defer guest.Close()

	// Pin the namespace with a bind mount so it outlives this thread and
	// can be found by path (by runsc, by the VMM, by `ip netns`, after a
	// restart).
	f, err := os.OpenFile(a.Netns, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return 0, fmt.Errorf("create netns mount point: %w", err)
	}
	f.Close()
	const self = "/proc/thread-self/ns/net"
	if err := unix.Mount(self, a.Netns, "", unix.MS_BIND, ""); err != nil {
		return 0, fmt.Errorf("bind-mount netns at %s: %w", a.Netns, err)
	}
	nsfd, err := unix.Open(self, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open netns: %w", err)
	}
	defer unix.Close(nsfd)

	// A fresh namespace has lo down; gVisor's netstack copies the
	// namespace's links and needs a working loopback.
	lo, err := guest.LinkByName("lo")
	if err != nil {
		return 0, fmt.Errorf("find lo: %w", err)
	}
	if err := guest.LinkSetUp(lo); err != nil {
		return 0, fmt.Errorf("set lo up: %w", err)
	}

	// The peer is created straight inside the namespace, so its name never
	// has to be unique on the host. The alias records the owner for adopt.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: a.HostLink, Alias: alias},
		PeerName:      GuestLink,
		PeerNamespace: netlink.NsFd(nsfd),
	}
	if err := host.LinkAdd(veth); err != nil {
		return 0, fmt.Errorf("create veth %s: %w", a.HostLink, err)
	}
	hl, err := host.LinkByName(a.HostLink)
	if err != nil {
		return 0, fmt.Errorf("find %s: %w", a.HostLink, err)
	}
	ifindex := hl.Attrs().Index
	if hl.Attrs().Alias != alias {
		// Older kernels ignore IFLA_IFALIAS on creation.
		if err := host.LinkSetAlias(hl, alias); err != nil {
			return ifindex, fmt.Errorf("set alias of %s: %w", a.HostLink, err)
		}
	}
	if err := host.AddrAdd(hl, &netlink.Addr{IPNet: prefixIPNet(a.Gateway, a.Subnet.Bits())}); err != nil {
		return ifindex, fmt.Errorf("address %s: %w", a.HostLink, err)
	}
	if err := host.LinkSetUp(hl); err != nil {
		return ifindex, fmt.Errorf("set %s up: %w", a.HostLink, err)
	}

	gl, err := guest.LinkByName(GuestLink)
	if err != nil {
		return ifindex, fmt.Errorf("find %s in netns: %w", GuestLink, err)
	}
	if err := guest.AddrAdd(gl, &netlink.Addr{IPNet: prefixIPNet(a.Addr, a.Subnet.Bits())}); err != nil {
		return ifindex, fmt.Errorf("address %s in netns: %w", GuestLink, err)
	}
	if err := guest.LinkSetUp(gl); err != nil {
		return ifindex, fmt.Errorf("set %s up in netns: %w", GuestLink, err)
	}
	if err := guest.RouteAdd(&netlink.Route{LinkIndex: gl.Attrs().Index, Gw: a.Gateway.AsSlice()}); err != nil {
		return ifindex, fmt.Errorf("default route in netns: %w", err)
	}
	if a.Tap != "" {
		if err := buildTap(guest, nsfd, a); err != nil {
			return ifindex, err
		}
	}
	return ifindex, nil
}

// buildTap gives the namespace (the calling thread's, also nsfd) a's tap
// with the guest's gateway address, turns forwarding on, and translates
// between the guest's fixed address and a.Addr.
func buildTap(guest *netlink.Handle, nsfd int, a Attachment) error {
	// A tap is made in the namespace of whoever opens /dev/net/tun, and
	// made persistent so that it outlives this descriptor: the VMM opens
	// it again by name.
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /dev/net/tun: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(a.Tap)
	if err != nil {
		return fmt.Errorf("tap name %q: %w", a.Tap, err)
	}
	ifr.SetUint16(tapFlags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("create tap %s: %w", a.Tap, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("make tap %s persistent: %w", a.Tap, err)
	}
	tap, err := guest.LinkByName(a.Tap)
	if err != nil {
		return fmt.Errorf("find %s: %w", a.Tap, err)
	}
	bits := a.GuestSubnet.Bits()
	if err := guest.AddrAdd(tap, &netlink.Addr{IPNet: prefixIPNet(a.GuestGateway, bits)}); err != nil {
		return fmt.Errorf("address %s: %w", a.Tap, err)
	}
	if err := guest.LinkSetUp(tap); err != nil {
		return fmt.Errorf("set %s up: %w", a.Tap, err)
	}
	// /proc/sys/net shows the namespace of the thread that opens it:
	// this thread's, the sandbox's.
	if err := os.WriteFile(ipForwardPath, []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("enable forwarding in netns: %w", err)
	}
	c, err := nftables.New(nftables.WithNetNSFd(nsfd))
	if err != nil {
		return fmt.Errorf("nftables in netns: %w", err)
	}
	addNATRules(c, a)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("install nftables table %s in netns: %w", natTable, err)
	}
	return nil
}

// addNATRules queues the namespace's translation table:
//
//	table ip cubicle {
//	  chain prerouting { type nat hook prerouting priority dstnat
//	    iifname eth0 ip daddr <Addr> dnat to <GuestAddr>
//	    iifname tap0 ip daddr <GuestGateway> udp dport 53 dnat to <Gateway>:53
//	    iifname tap0 ip daddr <GuestGateway> tcp dport 53 dnat to <Gateway>:53 }
//	  chain postrouting { type nat hook postrouting priority srcnat
//	    oifname eth0 ip saddr <GuestAddr> snat to <Addr> }
//	  chain forward { type filter hook forward priority filter; policy accept
//	    iifname tap0 ip saddr != <GuestAddr> drop }
//	}
//
// The host thus sees only Addr, as for a gVisor sandbox (the egress policy
// on the host end applies unchanged, and envd is reached at Addr), and
// the guest's DNS goes to the host end's resolver. A guest that forges its
// source address is dropped here: untranslated, its packets would reach the
// host with an address that is not its sandbox's.
func addNATRules(c *nftables.Conn, a Attachment) {
	t := c.AddTable(&nftables.Table{Name: natTable, Family: nftables.TableFamilyIPv4})
	pre := c.AddChain(&nftables.Chain{Name: "prerouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	post := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	accept := nftables.ChainPolicyAccept
	fwd := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})

	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: concat(
		matchIfname(expr.MetaKeyIIFNAME, GuestLink),
		matchAddr(ipv4DaddrOffset, a.Addr),
		natTo(expr.NATTypeDestNAT, a.GuestAddr, 0),
	)})
	for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: concat(
			matchIfname(expr.MetaKeyIIFNAME, a.Tap),
			matchAddr(ipv4DaddrOffset, a.GuestGateway),
			matchDport(proto, dnsPort),
			natTo(expr.NATTypeDestNAT, a.Gateway, dnsPort),
		)})
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: concat(
		matchIfname(expr.MetaKeyOIFNAME, GuestLink),
		matchAddr(ipv4SaddrOffset, a.GuestAddr),
		natTo(expr.NATTypeSourceNAT, a.Addr, 0),
	)})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: concat(
		matchIfname(expr.MetaKeyIIFNAME, a.Tap),
		[]expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: ipv4SaddrOffset, Len: 4},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: a.GuestAddr.AsSlice()},
			&expr.Verdict{Kind: expr.VerdictDrop},
		},
	)})
}

// Offsets of the addresses in the IPv4 header (RFC 791 §3.1).
const (
	ipv4SaddrOffset = 12
	ipv4DaddrOffset = 16
)

func concat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// matchIfname matches the input or output interface name; nftables
// compares names as NUL-padded IFNAMSIZ-byte strings.
func matchIfname(key expr.MetaKey, name string) []expr.Any {
	b := make([]byte, ifNameMax+1)
	copy(b, name)
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b},
	}
}

// matchAddr matches the IPv4 address at network-header offset off.
func matchAddr(off uint32, addr netip.Addr) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr.AsSlice()},
	}
}

// matchDport matches transport protocol proto with destination port port
// (bytes 2-3 of both the UDP and the TCP header).
func matchDport(proto byte, port uint16) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

// natTo translates to addr, and to port unless it is 0.
func natTo(typ expr.NATType, addr netip.Addr, port uint16) []expr.Any {
	out := []expr.Any{&expr.Immediate{Register: 1, Data: addr.AsSlice()}}
	nat := &expr.NAT{Type: typ, Family: unix.NFPROTO_IPV4, RegAddrMin: 1}
	if port != 0 {
		out = append(out, &expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(port)})
		nat.RegProtoMin = 2
	}
	return append(out, nat)
}

// destroy removes a's devices: it runs OnDestroy if hooked (a's OnCreate
// had succeeded), deletes the veth (its peer and, with the namespace, the
// tap go too), unmounts the namespace, and forgets the host's connection
// tracking of a's address. What is already gone is not an error.
func (p *Pool) destroy(a Attachment, hooked bool) error {
	if hooked && p.onDestroy != nil {
		p.onDestroy(a)
	}
	var errs []error
	// Deleting one end of a veth deletes the other, inside the netns.
	l, err := netlink.LinkByName(a.HostLink)
	if err == nil {
		err = netlink.LinkDel(l)
	}
	if err != nil && !isNotFound(err) {
		errs = append(errs, fmt.Errorf("delete %s: %w", a.HostLink, err))
	}
	paths := []string{p.slotNetns(p.slotIndex(a))}
	if a.ID != "" {
		paths = append(paths, p.legacyNetns(a.ID))
	}
	for _, path := range paths {
		if err := removeNetns(path); err != nil {
			errs = append(errs, err)
		}
	}
	// Only once the link is gone, so no packet can make a new entry. A
	// spare never sent any.
	if a.ID != "" {
		if err := forgetConntrack(a.Addr); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeNetns unmounts and removes a namespace mount point. The namespace
// itself goes away once no process is left in it.
func removeNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// addrFlows matches the connection-tracking entries of one address, in
// either direction of the original tuple: what the sandbox opened (and
// network/nat masqueraded) and what the host opened to it.
type addrFlows netip.Addr

// MatchConntrackFlow implements netlink.CustomConntrackFilter.
func (f addrFlows) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	src, _ := netip.AddrFromSlice(flow.Forward.SrcIP)
	dst, _ := netip.AddrFromSlice(flow.Forward.DstIP)
	return src.Unmap() == netip.Addr(f) || dst.Unmap() == netip.Addr(f)
}

// conntrackTries bounds the retries of a conntrack dump that the kernel
// interrupted because the table changed meanwhile.
const conntrackTries = 3

// forgetConntrack deletes the host namespace's connection-tracking entries
// of addr, so that no NAT mapping or established state outlives the
// sandbox and applies to the next one given the address.
func forgetConntrack(addr netip.Addr) error {
	if _, err := os.Stat(conntrackCountPath); errors.Is(err, os.ErrNotExist) {
		return nil // no connection tracking in this kernel: nothing to forget
	}
	var err error
	for range conntrackTries {
		_, err = netlink.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, addrFlows(addr))
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("delete conntrack entries of %v: %w", addr, err)
	}
	return nil
}
