package policy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// dumpRetries bounds how often a netlink dump interrupted by a concurrent
// change (every sandbox create or delete adds or removes an address) is
// retried before its error is returned.
const dumpRetries = 5

// addrList lists link's IPv4 addresses (all links' if link is nil) through
// h, or the caller's namespace if h is nil, retrying interrupted dumps:
// their results may be inconsistent.
func addrList(h *netlink.Handle, link netlink.Link) ([]netlink.Addr, error) {
	list := netlink.AddrList
	if h != nil {
		list = h.AddrList
	}
	var addrs []netlink.Addr
	var err error
	for range dumpRetries {
		addrs, err = list(link, unix.AF_INET)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return addrs, err
}

// HostAddrs lists the host's own IPv4 addresses outside pool (whose
// gateways the pool's hard deny covers already) as /32s, sorted and
// without duplicates: the set no sandbox may reach, for Options.HostAddrs
// and SetHostAddrs. h names the host's namespace; nil means the caller's.
func HostAddrs(h *netlink.Handle, pool netip.Prefix) ([]netip.Prefix, error) {
	addrs, err := addrList(h, nil)
	if err != nil {
		return nil, fmt.Errorf("policy: listing host addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok || pool.Contains(ip) {
			continue
		}
		out = append(out, netip.PrefixFrom(ip, 32))
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return slices.Compact(out), nil
}

// resubscribeDelay is how long FollowHostAddrs waits before subscribing
// again after the kernel dropped its subscription (e.g. on a receive
// buffer overrun), so that a persistent failure does not spin.
const resubscribeDelay = time.Second

// FollowHostAddrs keeps what the host itself is closed to sandboxes by in
// step with the host: the hard-denied host addresses equal to HostAddrs,
// and the closed host networks equal to HostLAN, of the Manager's
// namespace (Options.NetNS). It subscribes to address and route changes
// there, applies the current sets, and returns; from then on a goroutine
// re-lists and applies both after every change, until ctx is done. It
// replaces Options.HostAddrs, Options.HostLAN and any SetHostAddrs.
// Errors after the return are logged; a subscription the kernel drops is
// renewed. Cancel ctx before Close, which waits for the goroutine to end.
func (m *Manager) FollowHostAddrs(ctx context.Context) error {
	sub, err := m.subscribe(ctx)
	if err != nil {
		return err
	}
	// Subscribed before listing, so no change falls between the two.
	if err := m.refreshHost(); err != nil {
		sub.stop()
		return err
	}
	m.following.Add(1)
	go func() {
		defer m.following.Done()
		m.followHost(ctx, sub)
	}()
	return nil
}

// hostSub is one netlink subscription to address and route changes; both
// readers stop when done is closed.
type hostSub struct {
	addrs  chan netlink.AddrUpdate
	routes chan netlink.RouteUpdate
	done   chan struct{}
}

// stop closes the subscription's sockets and drains its channels, which
// the netlink package's readers close when they exit: they block on
// sending otherwise.
func (s *hostSub) stop() {
	close(s.done)
	for range s.addrs {
	}
	for range s.routes {
	}
}

func (m *Manager) subscribe(ctx context.Context) (*hostSub, error) {
	s := &hostSub{
		addrs:  make(chan netlink.AddrUpdate, 64),
		routes: make(chan netlink.RouteUpdate, 64),
		done:   make(chan struct{}),
	}
	ns := m.ns
	errCB := func(what string) func(error) {
		return func(err error) {
			if ctx.Err() == nil { // a closed socket at shutdown is no news
				m.log.Warn(what, "err", err)
			}
		}
	}
	err := netlink.AddrSubscribeWithOptions(s.addrs, s.done, netlink.AddrSubscribeOptions{
		Namespace: &ns, ErrorCallback: errCB("host address subscription"),
	})
	if err != nil {
		close(s.done)
		return nil, fmt.Errorf("policy: subscribe to host address changes: %w", err)
	}
	err = netlink.RouteSubscribeWithOptions(s.routes, s.done, netlink.RouteSubscribeOptions{
		Namespace: &ns, ErrorCallback: errCB("host route subscription"),
	})
	if err != nil {
		close(s.routes) // never handed to a reader
		s.stop()
		return nil, fmt.Errorf("policy: subscribe to host route changes: %w", err)
	}
	return s, nil
}

func (m *Manager) followHost(ctx context.Context, sub *hostSub) {
	for {
		relevant, lost := false, false
		select {
		case <-ctx.Done():
			sub.stop()
			return
		case u, ok := <-sub.addrs:
			relevant, lost = ok && m.affectsHost(u), !ok
		case u, ok := <-sub.routes:
			relevant, lost = ok && m.routeAffectsHost(u), !ok
		}
		if lost {
			// A reader gave up (its error was logged); events may have
			// been lost, so subscribe again and re-list.
			sub.stop()
			if sub = m.resubscribe(ctx); sub == nil {
				return
			}
		} else if !relevant {
			continue
		}
		// A burst of changes needs one re-list: take what is queued.
		for drained := false; !drained; {
			select {
			case _, ok := <-sub.addrs:
				drained = !ok
			case _, ok := <-sub.routes:
				drained = !ok
			default:
				drained = true
			}
		}
		if err := m.refreshHost(); err != nil {
			m.log.Warn("update host addresses and networks", "err", err)
		}
	}
}

// affectsHost reports whether an address change can change HostAddrs or
// HostLAN: sandbox gateways in the pool come and go with every sandbox and
// are denied as a whole already, and IPv6 is dropped wholesale.
func (m *Manager) affectsHost(u netlink.AddrUpdate) bool {
	ip, ok := netip.AddrFromSlice(u.LinkAddress.IP.To4())
	return ok && !m.pool.Contains(ip)
}

// resubscribe subscribes again after resubscribeDelay, retrying until it
// works or ctx is done (then it returns nil).
func (m *Manager) resubscribe(ctx context.Context) *hostSub {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(resubscribeDelay):
		}
		sub, err := m.subscribe(ctx)
		if err == nil {
			return sub
		}
		m.log.Warn("renew host address and route subscription", "err", err)
	}
}

// refreshHost lists the host's addresses and networks and applies each
// set that changed since the last time.
func (m *Manager) refreshHost() error {
	addrs, err := HostAddrs(m.nl, m.pool)
	if err != nil {
		return err
	}
	lan, err := HostLAN(m.nl, m.pool)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.hostAddr == nil || !slices.Equal(addrs, m.hostAddr) {
		if err := m.setHardLocked(addrs); err != nil {
			return err
		}
		m.hostAddr = addrs
		if m.hostAddr == nil {
			m.hostAddr = []netip.Prefix{}
		}
		m.log.Info("host addresses denied to sandboxes", "addrs", addrs)
	}
	if m.hostLAN == nil || !slices.Equal(lan, m.hostLAN) {
		if err := m.setClosedLocked(lan); err != nil {
			return err
		}
		m.hostLAN = lan
		if m.hostLAN == nil {
			m.hostLAN = []netip.Prefix{}
		}
		m.log.Info("host networks and gateways closed to sandboxes", "networks", lan)
	}
	return nil
}
