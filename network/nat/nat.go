// Package nat gives sandboxes egress to the outside world: it masquerades
// the sandbox pool's addresses out of the host's default-route interface
// with one nftables table, and turns on IPv4 forwarding.
//
// The table is cubicle's alone (named by Options.Table) and replaced as a
// whole in one nftables transaction, so Enable is idempotent and never
// leaves a half-written rule set; Disable deletes it. The table also drops
// forwarding from the pool to the pool: package network/policy already
// guarantees that per packet in eBPF, and this is defence in depth should
// a program be missing. Who may go where is entirely network/policy's job;
// this package only translates addresses.
package nat

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DefaultTable is the name of cubicle's nftables table (family ip).
const DefaultTable = "cubicle"

// ipForwardPath is the IPv4 forwarding switch of the current network
// namespace, Documentation/networking/ip-sysctl.rst.
const ipForwardPath = "/proc/sys/net/ipv4/ip_forward"

// ifNameSize is IFNAMSIZ, include/uapi/linux/if.h: nftables compares
// interface names as NUL-padded 16-byte strings.
const ifNameSize = 16

var (
	// ErrNoDefaultRoute is returned when no OutInterface is given and the
	// namespace has no IPv4 default route to take it from.
	ErrNoDefaultRoute = errors.New("nat: no IPv4 default route")
	// ErrBadOptions is returned for unusable options.
	ErrBadOptions = errors.New("nat: invalid options")
)

// Options configures Enable and Disable.
type Options struct {
	// Pool is the sandbox address prefix to masquerade (required, IPv4).
	Pool netip.Prefix
	// OutInterface is the uplink; empty means the interface of the IPv4
	// default route.
	OutInterface string
	// Table names the nftables table (DefaultTable).
	Table string
	// NetNS, if open, is the namespace to configure (tests); by default
	// the caller's.
	NetNS netns.NsHandle
}

func (o *Options) check() error {
	if o.Table == "" {
		o.Table = DefaultTable
	}
	if !o.Pool.IsValid() || !o.Pool.Addr().Is4() {
		return fmt.Errorf("%w: pool %v is not an IPv4 prefix", ErrBadOptions, o.Pool)
	}
	o.Pool = o.Pool.Masked()
	if len(o.OutInterface) >= ifNameSize {
		return fmt.Errorf("%w: interface name %q too long", ErrBadOptions, o.OutInterface)
	}
	return nil
}

func (o *Options) conn() (*nftables.Conn, error) {
	if o.NetNS.IsOpen() {
		return nftables.New(nftables.WithNetNSFd(int(o.NetNS)))
	}
	return nftables.New()
}

// Enable installs (or replaces) the NAT table and sets ip_forward=1. It
// returns the uplink interface it masquerades out of.
func Enable(opts Options) (string, error) {
	if err := opts.check(); err != nil {
		return "", err
	}
	if opts.OutInterface == "" {
		name, err := defaultRouteLink(opts.NetNS)
		if err != nil {
			return "", err
		}
		opts.OutInterface = name
	}
	c, err := opts.conn()
	if err != nil {
		return "", fmt.Errorf("nat: nftables: %w", err)
	}
	exists, err := tableExists(c, opts.Table)
	if err != nil {
		return "", err
	}
	t := &nftables.Table{Name: opts.Table, Family: nftables.TableFamilyIPv4}
	if exists {
		c.DelTable(t) // same transaction: the replacement is atomic
	}
	c.AddTable(t)
	post := c.AddChain(&nftables.Chain{Name: "postrouting", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	accept := nftables.ChainPolicyAccept
	fwd := c.AddChain(&nftables.Chain{Name: "forward", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})

	ifname := make([]byte, ifNameSize)
	copy(ifname, opts.OutInterface)
	// ip saddr <pool> oifname <uplink> masquerade
	c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: append(
		matchPrefix(12, opts.Pool),
		&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname},
		&expr.Masq{},
	)})
	// ip saddr <pool> ip daddr <pool> drop
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: append(append(
		matchPrefix(12, opts.Pool), matchPrefix(16, opts.Pool)...),
		&expr.Verdict{Kind: expr.VerdictDrop},
	)})
	if err := c.Flush(); err != nil {
		return "", fmt.Errorf("nat: install table %s: %w", opts.Table, err)
	}
	if err := inNetns(opts.NetNS, func() error {
		return os.WriteFile(ipForwardPath, []byte("1\n"), 0o644)
	}); err != nil {
		return "", fmt.Errorf("nat: enable forwarding: %w", err)
	}
	return opts.OutInterface, nil
}

// Disable deletes the NAT table if present. It leaves ip_forward alone:
// other services on the host may rely on it.
func Disable(opts Options) error {
	if err := opts.check(); err != nil {
		return err
	}
	c, err := opts.conn()
	if err != nil {
		return fmt.Errorf("nat: nftables: %w", err)
	}
	exists, err := tableExists(c, opts.Table)
	if err != nil || !exists {
		return err
	}
	c.DelTable(&nftables.Table{Name: opts.Table, Family: nftables.TableFamilyIPv4})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nat: delete table %s: %w", opts.Table, err)
	}
	return nil
}

func tableExists(c *nftables.Conn, name string) (bool, error) {
	ts, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return false, fmt.Errorf("nat: list tables: %w", err)
	}
	for _, t := range ts {
		if t.Name == name {
			return true, nil
		}
	}
	return false, nil
}

// matchPrefix matches the IPv4 address at network-header offset off (12
// saddr, 16 daddr; RFC 791 §3.1) against p.
func matchPrefix(off uint32, p netip.Prefix) []expr.Any {
	mask := netipMask(p.Bits())
	base := p.Addr().As4()
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: base[:]},
	}
}

func netipMask(bits int) []byte {
	m := make([]byte, 4)
	for i := range bits {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

func defaultRouteLink(ns netns.NsHandle) (string, error) {
	var h *netlink.Handle
	var err error
	if ns.IsOpen() {
		h, err = netlink.NewHandleAt(ns)
	} else {
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	if err != nil {
		return "", fmt.Errorf("nat: netlink: %w", err)
	}
	defer h.Close()
	routes, err := h.RouteList(nil, unix.AF_INET)
	if err != nil {
		return "", fmt.Errorf("nat: routes: %w", err)
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.LinkIndex > 0 {
			l, err := h.LinkByIndex(r.LinkIndex)
			if err != nil {
				return "", fmt.Errorf("nat: default route link: %w", err)
			}
			return l.Attrs().Name, nil
		}
	}
	return "", ErrNoDefaultRoute
}

// inNetns runs fn on a fresh thread switched into ns (if open):
// /proc/sys/net shows the namespace of the thread that opens it. Should
// switching back fail, the thread stays locked and exits with its
// goroutine, so no other goroutine ever runs in the wrong namespace.
func inNetns(ns netns.NsHandle, fn func() error) error {
	if !ns.IsOpen() {
		return fn()
	}
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			done <- err
			return
		}
		runtime.UnlockOSThread()
		done <- ferr
	}()
	return <-done
}
