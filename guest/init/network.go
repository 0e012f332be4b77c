package guestinit

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
)

// GuestLink is the guest's network interface: the VMM's one virtio-net
// device.
const GuestLink = "eth0"

// SetupNetwork configures the network namespace it runs in as p says: lo
// up; with p.Addr, link gets p.Addr, comes up, and routes everything via
// p.Gateway. It is idempotent: an address or route already there is kept.
func SetupNetwork(p Params, link string) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("network: lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("network: lo up: %w", err)
	}
	if !p.Addr.IsValid() {
		return nil
	}
	l, err := netlink.LinkByName(link)
	if err != nil {
		return fmt.Errorf("network: %s: %w", link, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{
		IP:   p.Addr.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Addr.Bits(), 32),
	}}
	if err := netlink.AddrReplace(l, addr); err != nil {
		return fmt.Errorf("network: address %s on %s: %w", p.Addr, link, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("network: %s up: %w", link, err)
	}
	route := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: p.Gateway.AsSlice()}
	if err := netlink.RouteReplace(route); err != nil {
		return fmt.Errorf("network: default route via %s: %w", p.Gateway, err)
	}
	return nil
}

// resolvConf is the guest's resolver configuration: the gateway, which the
// sandbox's namespace sends to cubicle's resolver (the only one the egress
// policy lets through), as runtime/gvisor writes it.
func resolvConf(gateway netip.Addr) []byte {
	return fmt.Appendf(nil, "# cubicle: the sandbox's resolver enforces its network.allowOut domains\nnameserver %s\noptions timeout:2 attempts:2\n", gateway)
}

// writeResolvConf replaces root/etc/resolv.conf (a symlink there, as
// systemd-resolved leaves, included) with the gateway as the nameserver.
func writeResolvConf(root string, gateway netip.Addr) error {
	dir := filepath.Join(root, "etc")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	path := filepath.Join(dir, "resolv.conf")
	tmp := path + ".cubicle-tmp"
	if err := os.WriteFile(tmp, resolvConf(gateway), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}
