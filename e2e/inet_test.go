package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/cubicle-dev/cubicle/network/dns/dnstest"
)

// The fake internet the e2e sandboxes talk to: a network namespace the
// suite makes, reached from the host over a veth, with addresses from
// TEST-NET-2 (RFC 5737: never routed anywhere). It serves HTTP on every
// address and DNS on the first; cubicle serve forwards sandbox queries
// there (--dns-upstream). Nothing leaves the host. Being a special-purpose
// range and a subnet connected to the host, it is closed to sandboxes by
// default; the suite opens it as an operator would, with --allow-cidr.
const (
	inetLink     = "cbeinet"
	inetNet      = "198.51.100.0/24"
	inetHostAddr = "198.51.100.1/24" // the host end, a host address: hard-denied
	inetHTTPPort = 8080
)

// inetNames are the names the fake internet's DNS server answers, and
// their addresses (all on the namespace's end of the veth).
var inetNames = map[string]string{
	"allowed.test": "198.51.100.2", // also the DNS server's address
	"other.test":   "198.51.100.3",
	"wild.test":    "198.51.100.5",
	"*.wild.test":  "198.51.100.4",
}

// inet is the running fake internet.
type inet struct {
	ns      netns.NsHandle
	dns     netip.AddrPort
	closers []io.Closer
}

// startInet builds the namespace and starts its servers. Close removes it.
func startInet(pool netip.Prefix) (_ *inet, err error) {
	in := &inet{dns: netip.MustParseAddrPort(inetNames["allowed.test"] + ":53")}
	defer func() {
		if err != nil {
			in.Close()
		}
	}()
	if err := inThread(func() error {
		ns, err := netns.New() // moves this (discarded) thread into it
		if err != nil {
			return err
		}
		in.ns = ns
		return nil
	}); err != nil {
		return nil, fmt.Errorf("fake internet namespace: %w", err)
	}
	if l, err := netlink.LinkByName(inetLink); err == nil {
		_ = netlink.LinkDel(l) // left by an earlier, killed run
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: inetLink}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(in.ns))}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("fake internet veth: %w", err)
	}
	in.closers = append(in.closers, closerFunc(func() error { return netlink.LinkDel(veth) }))
	hostAddr, _ := netlink.ParseAddr(inetHostAddr)
	if err := netlink.AddrAdd(veth, hostAddr); err != nil {
		return nil, fmt.Errorf("fake internet host address: %w", err)
	}
	if err := netlink.LinkSetUp(veth); err != nil {
		return nil, err
	}
	nh, err := netlink.NewHandleAt(in.ns)
	if err != nil {
		return nil, err
	}
	defer nh.Close()
	peer, err := nh.LinkByName("eth0")
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, a := range inetNames {
		if seen[a] {
			continue
		}
		seen[a] = true
		if err := nh.AddrAdd(peer, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP(a), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return nil, fmt.Errorf("fake internet address %s: %w", a, err)
		}
	}
	for _, name := range []string{"lo", "eth0"} {
		l, err := nh.LinkByName(name)
		if err != nil {
			return nil, err
		}
		if err := nh.LinkSetUp(l); err != nil {
			return nil, err
		}
	}
	// Sandbox traffic arrives from the pool unmasqueraded (cubicle
	// masquerades only out of the default route): route it back.
	_, poolNet, _ := net.ParseCIDR(pool.String())
	if err := nh.RouteAdd(&netlink.Route{LinkIndex: peer.Attrs().Index, Dst: poolNet, Gw: net.ParseIP(strings.Split(inetHostAddr, "/")[0])}); err != nil {
		return nil, fmt.Errorf("fake internet route back: %w", err)
	}

	var lns []net.Listener
	var dnsConn net.PacketConn
	if err := inNamespace(in.ns, func() error {
		for a := range seen {
			ln, err := net.Listen("tcp4", fmt.Sprintf("%s:%d", a, inetHTTPPort))
			if err != nil {
				return err
			}
			lns = append(lns, ln)
		}
		var err error
		dnsConn, err = net.ListenPacket("udp4", in.dns.String())
		return err
	}); err != nil {
		for _, ln := range lns {
			ln.Close()
		}
		return nil, fmt.Errorf("fake internet servers: %w", err)
	}
	for _, ln := range lns {
		hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello from %s\n", r.Context().Value(http.LocalAddrContextKey))
		})}
		go hs.Serve(ln)
		in.closers = append(in.closers, hs)
	}
	in.closers = append(in.closers, dnsConn)
	go dnstest.Serve(dnsConn, lookupInet, 300)
	return in, nil
}

// Close stops the servers and removes the veth and the namespace.
func (in *inet) Close() error {
	var errs []error
	for i := len(in.closers) - 1; i >= 0; i-- {
		if err := in.closers[i].Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	if in.ns.IsOpen() {
		errs = append(errs, in.ns.Close())
	}
	return errors.Join(errs...)
}

// env tells the node tests about the fake internet.
func (in *inet) env() []string {
	return []string{
		"E2E_INET_PORT=" + fmt.Sprint(inetHTTPPort),
		"E2E_INET_ALLOWED=" + inetNames["allowed.test"],
		"E2E_INET_OTHER=" + inetNames["other.test"],
		"E2E_INET_WILD=" + inetNames["*.wild.test"],
	}
}

// lookupInet resolves inetNames, wildcard included.
func lookupInet(name string) (netip.Addr, bool) {
	a, ok := inetNames[name]
	if !ok && strings.HasSuffix(name, ".wild.test") {
		a, ok = inetNames["*.wild.test"]
	}
	if !ok {
		return netip.Addr{}, false
	}
	return netip.MustParseAddr(a), true
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

// inThread runs fn on a locked OS thread that is discarded afterwards, so
// a namespace change inside fn never leaks to other goroutines.
func inThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		errc <- fn()
	}()
	return <-errc
}

// inNamespace runs fn inside ns; sockets fn opens stay in ns.
func inNamespace(ns netns.NsHandle, fn func() error) error {
	return inThread(func() error {
		if err := netns.Set(ns); err != nil {
			return err
		}
		return fn()
	})
}
