package policy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// The fake world every test builds in namespaces of its own; nothing is
// routed outside them and the real host's routes and rules are untouched.
//
//	inet  198.51.100.10/24 (TEST-NET-2, RFC 5737) + 169.254.169.254/32: HTTP :80, echo :7000,
//	      UDP echo :9000, and TCP and UDP echo on :53 and :853 (a resolver a sandbox must not use)
//	lan   10.77.0.10/24: HTTP :80
//	router (the host): r-inet 198.51.100.1/24 (default route), r-lan 10.77.0.1/24,
//	        sba 100.96.0.1/30 + fd00:a::1/64, sbb 100.96.0.5/30; HTTP on 100.96.0.1:8080 and [fd00:a::1]:8080,
//	        TCP and UDP echo on 100.96.0.1:53 (A's resolver) and UDP echo on 100.96.0.1:5353
//	sandbox A 100.96.0.2/30 + fd00:a::2/64: HTTP :49983 ("envd")
//	sandbox B 100.96.0.6/30: HTTP :80, UDP echo :9000
var (
	inetAddr  = "198.51.100.10"
	lanAddr   = "10.77.0.10"
	aAddr     = "100.96.0.2"
	bAddr     = "100.96.0.6"
	gwA       = "100.96.0.1"
	metadata  = "169.254.169.254"
	testPool  = netip.MustParsePrefix("100.96.0.0/11")
	dialLimit = 400 * time.Millisecond
)

type world struct {
	t                  testing.TB
	router, inet, lan  netns.NsHandle
	a, b               netns.NsHandle
	rh                 *netlink.Handle // router's netlink
	sbaIndex, sbbIndex int
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces and eBPF")
	}
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		t.Skip("/sys/fs/bpf is not a bpf file system")
	}
}

// inNS runs fn on a fresh OS thread inside ns.
func inNS(ns netns.NsHandle, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			done <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			done <- err
			return
		}
		ferr := fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- ferr
	}()
	return <-done
}

func newNS(t testing.TB) netns.NsHandle {
	t.Helper()
	var ns netns.NsHandle
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // the thread is left in the new namespace and exits
		var err error
		ns, err = netns.New()
		done <- err
	}()
	if err := <-done; err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

func handle(t testing.TB, ns netns.NsHandle) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func must(t testing.TB, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// link makes a veth pair router:rname ↔ peer:eth0 and addresses both ends.
func (w *world) link(peer netns.NsHandle, rname string, raddrs, paddrs []string, gw string) int {
	t := w.t
	t.Helper()
	must(t, w.rh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: rname},
		PeerName: "eth0", PeerNamespace: netlink.NsFd(int(peer))}), "veth "+rname)
	ph := handle(t, peer)
	for _, x := range []struct {
		h     *netlink.Handle
		name  string
		addrs []string
	}{{w.rh, rname, raddrs}, {ph, "eth0", paddrs}} {
		l, err := x.h.LinkByName(x.name)
		must(t, err, "link "+x.name)
		for _, a := range x.addrs {
			addr, err := netlink.ParseAddr(a)
			must(t, err, a)
			addr.Flags = unix.IFA_F_NODAD
			must(t, x.h.AddrAdd(l, addr), "addr "+a)
		}
		must(t, x.h.LinkSetUp(l), "up "+x.name)
	}
	lo, err := ph.LinkByName("lo")
	must(t, err, "lo")
	must(t, ph.LinkSetUp(lo), "lo up")
	if gw != "" {
		eth, _ := ph.LinkByName("eth0")
		must(t, ph.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: net.ParseIP(gw)}), "default route")
	}
	l, _ := w.rh.LinkByName(rname)
	return l.Attrs().Index
}

func newWorld(t testing.TB) *world {
	requireRoot(t)
	w := &world{t: t}
	w.router, w.inet, w.lan, w.a, w.b = newNS(t), newNS(t), newNS(t), newNS(t), newNS(t)
	w.rh = handle(t, w.router)
	w.link(w.inet, "r-inet", []string{"198.51.100.1/24"}, []string{inetAddr + "/24", metadata + "/32"}, "198.51.100.1")
	w.link(w.lan, "r-lan", []string{"10.77.0.1/24"}, []string{lanAddr + "/24"}, "10.77.0.1")
	w.sbaIndex = w.link(w.a, "sba", []string{gwA + "/30", "fd00:a::1/64"}, []string{aAddr + "/30", "fd00:a::2/64"}, gwA)
	w.sbbIndex = w.link(w.b, "sbb", []string{"100.96.0.5/30"}, []string{bAddr + "/30"}, "100.96.0.5")
	inet, _ := w.rh.LinkByName("r-inet")
	must(t, w.rh.RouteAdd(&netlink.Route{LinkIndex: inet.Attrs().Index, Gw: net.ParseIP("198.51.100.254")}), "router default route")
	must(t, w.rh.RouteAdd(&netlink.Route{LinkIndex: inet.Attrs().Index, Gw: net.ParseIP(inetAddr),
		Dst: &net.IPNet{IP: net.ParseIP(metadata), Mask: net.CIDRMask(32, 32)}}), "metadata route")
	must(t, inNS(w.router, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644)
	}), "router forwarding")

	w.serveHTTP(w.inet, "tcp4", "0.0.0.0:80")
	w.serveEcho(w.inet, inetAddr+":7000")
	w.serveUDPEcho(w.inet, inetAddr+":9000")
	for _, port := range []string{":53", ":853"} {
		w.serveEcho(w.inet, inetAddr+port)
		w.serveUDPEcho(w.inet, inetAddr+port)
	}
	w.serveEcho(w.router, gwA+":53")
	w.serveUDPEcho(w.router, gwA+":53")
	w.serveUDPEcho(w.router, gwA+":5353")
	w.serveHTTP(w.lan, "tcp4", lanAddr+":80")
	w.serveHTTP(w.b, "tcp4", bAddr+":80")
	w.serveUDPEcho(w.b, bAddr+":9000")
	w.serveHTTP(w.a, "tcp4", aAddr+":49983")
	w.serveHTTP(w.router, "tcp4", gwA+":8080")
	w.serveHTTP(w.router, "tcp6", "[fd00:a::1]:8080")
	return w
}

func (w *world) listen(ns netns.NsHandle, network, addr string) net.Listener {
	var ln net.Listener
	must(w.t, inNS(ns, func() (err error) { ln, err = net.Listen(network, addr); return }), "listen "+addr)
	w.t.Cleanup(func() { ln.Close() })
	return ln
}

// serveHTTP answers every request with the client address it saw.
func (w *world) serveHTTP(ns netns.NsHandle, network, addr string) {
	ln := w.listen(ns, network, addr)
	srv := &http.Server{Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		fmt.Fprint(rw, host)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	w.t.Cleanup(func() { srv.Close() })
}

func (w *world) serveEcho(ns netns.NsHandle, addr string) {
	ln := w.listen(ns, "tcp4", addr)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
}

func (w *world) serveUDPEcho(ns netns.NsHandle, addr string) {
	var pc net.PacketConn
	must(w.t, inNS(ns, func() (err error) { pc, err = net.ListenPacket("udp4", addr); return }), "udp "+addr)
	w.t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
}

func dial(ns netns.NsHandle, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNS(ns, func() (err error) {
		c, err = net.DialTimeout(network, addr, dialLimit)
		return
	})
	return c, err
}

// get makes an HTTP/1.0 request from ns and returns the body: the client
// address the server saw.
func get(ns netns.NsHandle, network, addr string) (string, error) {
	c, err := dial(ns, network, addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.0\r\n\r\n"); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

func udpEcho(ns netns.NsHandle, addr string) error {
	c, err := dial(ns, "udp4", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	return exchange(c)
}

// exchange writes to c and reads the echo back.
func exchange(c net.Conn) error {
	c.SetDeadline(time.Now().Add(dialLimit))
	if _, err := c.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 16)
	n, err := io.ReadAtLeast(c, buf, 4)
	if err == nil && string(buf[:n]) != "ping" {
		err = fmt.Errorf("echo: got %q", buf[:n])
	}
	return err
}

// tcpEcho opens a TCP connection from ns and exchanges one message.
func tcpEcho(ns netns.NsHandle, addr string) error {
	c, err := dial(ns, "tcp4", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	return exchange(c)
}

// ping sends one ICMP echo request from ns and waits for the reply.
func ping(ns netns.NsHandle, dst string) error {
	var pc net.PacketConn
	if err := inNS(ns, func() (err error) { pc, err = net.ListenPacket("ip4:icmp", "0.0.0.0"); return }); err != nil {
		return err
	}
	defer pc.Close()
	const id = 0x4242
	msg := []byte{8, 0, 0, 0, id >> 8, id & 0xff, 0, 1, 'c', 'u', 'b', 'e'}
	var sum uint32
	for i := 0; i < len(msg); i += 2 {
		sum += uint32(msg[i])<<8 | uint32(msg[i+1])
	}
	sum = (sum >> 16) + (sum & 0xffff)
	sum += sum >> 16
	msg[2], msg[3] = byte(^sum>>8), byte(^sum)
	if _, err := pc.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(dst)}); err != nil {
		return err
	}
	pc.SetReadDeadline(time.Now().Add(dialLimit))
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return err
		}
		if from.String() == dst && n >= 8 && buf[0] == 0 && buf[4] == id>>8 && buf[5] == id&0xff {
			return nil
		}
	}
}
