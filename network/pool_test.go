package network

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// requireRoot fails a test that needs to create network devices when it
// cannot, unless CUBICLE_SKIP_RUNSC=1 asks to skip privileged tests.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CUBICLE_SKIP_RUNSC") == "1" {
		t.Skip("needs root to create namespaces and veths; skipped by CUBICLE_SKIP_RUNSC=1")
	}
	t.Fatal("this test needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network namespaces and veths; run as root or set CUBICLE_SKIP_RUNSC=1 to skip")
}

// testPool makes a pool on a small prefix with a link prefix of its own, so
// it cannot disturb a server running on the same host, and checks at the end
// of the test that nothing of it is left. mods adjust the options.
func testPool(t *testing.T, prefix string, mods ...func(*Options)) (*Pool, Options) {
	t.Helper()
	requireRoot(t)
	opts := Options{
		Prefix:     netip.MustParsePrefix(prefix),
		NetnsDir:   t.TempDir(),
		LinkPrefix: "cbtest",
		Logger:     slog.New(slog.NewTextHandler(t.Output(), nil)),
	}
	for _, m := range mods {
		m(&opts)
	}
	p, err := NewPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		for _, a := range p.List() {
			p.Teardown(context.Background(), a.ID)
		}
		if left, err := p.Devices(); err != nil || len(left) > 0 {
			t.Errorf("pool left devices behind: %v %v", left, err)
		}
	})
	return p, opts
}

func TestNewPoolRefusesOverlap(t *testing.T) {
	requireRoot(t)
	// Every host has 127.0.0.1/8 on lo.
	_, err := NewPool(Options{Prefix: netip.MustParsePrefix("127.0.0.0/24"), NetnsDir: t.TempDir(), LinkPrefix: "cbtest"})
	var oe *OverlapError
	if !errors.Is(err, ErrPrefixOverlap) || !errors.As(err, &oe) {
		t.Fatalf("NewPool over 127.0.0.0/24: err %v, want an OverlapError", err)
	}
	if !strings.Contains(err.Error(), "127.0.0.0/8") || !strings.Contains(err.Error(), "lo") {
		t.Errorf("error does not name the colliding network: %v", err)
	}
}

func TestNewPoolRejectsLongNames(t *testing.T) {
	requireRoot(t)
	_, err := NewPool(Options{Prefix: DefaultPrefix, NetnsDir: t.TempDir(), LinkPrefix: "muchtoolongname"})
	if !errors.Is(err, ErrBadPrefix) {
		t.Fatalf("err %v, want ErrBadPrefix for names over IFNAMSIZ", err)
	}
}

func TestPoolSetupTeardown(t *testing.T) {
	ctx := context.Background()
	p, opts := testPool(t, "100.88.255.0/28") // 4 slots

	a, err := p.Setup(ctx, "sandboxa")
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Setup(ctx, "sandboxb")
	if err != nil {
		t.Fatal(err)
	}
	if a.Subnet == b.Subnet || a.HostLink == b.HostLink {
		t.Fatalf("two sandboxes share a subnet or link: %+v %+v", a, b)
	}
	if _, err := p.Setup(ctx, "sandboxa"); !errors.Is(err, ErrInUse) {
		t.Fatalf("second Setup of one id: err %v, want ErrInUse", err)
	}
	if _, err := p.Setup(ctx, "../etc"); !errors.Is(err, ErrBadID) {
		t.Fatalf("Setup with a path as id: err %v, want ErrBadID", err)
	}

	checkHostEnd(t, a)
	checkGuestEnd(t, a)
	// The host reaches a port served inside the namespace over the veth.
	serveInNetns(t, a.Netns, "hello from "+a.ID)
	if got := fetch(t, a.Addr); got != "hello from "+a.ID {
		t.Fatalf("read %q over the veth", got)
	}

	// A second pool (a server restart) finds both allocations again and
	// does not hand their subnets out twice.
	p2, err := NewPool(opts)
	if err != nil {
		t.Fatalf("NewPool after restart: %v", err)
	}
	for _, want := range []Attachment{a, b} {
		got, ok := p2.Lookup(want.ID)
		if !ok || got != want {
			t.Fatalf("after restart Lookup(%s) = %+v, %v; want %+v", want.ID, got, ok, want)
		}
	}
	// A pool over another prefix would compute other addresses for the
	// same links: it must refuse rather than adopt them.
	moved := opts
	moved.Prefix = netip.MustParsePrefix("100.88.255.16/28")
	if _, err := NewPool(moved); !errors.Is(err, ErrBadPrefix) {
		t.Fatalf("NewPool over a changed prefix: err %v, want ErrBadPrefix", err)
	}
	c, err := p2.Setup(ctx, "sandboxc")
	if err != nil {
		t.Fatal(err)
	}
	d, err := p2.Setup(ctx, "sandboxd")
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range []Attachment{c, d} {
		if x.Subnet == a.Subnet || x.Subnet == b.Subnet {
			t.Fatalf("restarted pool handed out a used subnet: %+v", x)
		}
	}
	if _, err := p2.Setup(ctx, "sandboxe"); !errors.Is(err, ErrExhausted) {
		t.Fatalf("fifth Setup on a /28: err %v, want ErrExhausted", err)
	}

	for _, id := range []string{"sandboxa", "sandboxb", "sandboxc", "sandboxd"} {
		if err := p2.Teardown(ctx, id); err != nil {
			t.Fatal(err)
		}
		if err := p2.Teardown(ctx, id); err != nil {
			t.Fatalf("second Teardown of %s: %v", id, err)
		}
	}
	if left, err := p2.Devices(); err != nil || len(left) > 0 {
		t.Fatalf("devices left after teardown: %v %v", left, err)
	}
	if mounts := mountsUnder(t, opts.NetnsDir); len(mounts) > 0 {
		t.Fatalf("netns mounts left: %v", mounts)
	}
	// Freed subnets are handed out again.
	e, err := p2.Setup(ctx, "sandboxe")
	if err != nil {
		t.Fatalf("Setup after freeing everything: %v", err)
	}
	if err := p2.Teardown(ctx, e.ID); err != nil {
		t.Fatal(err)
	}
	// p (the pre-restart pool) still believes in a and b; its cleanup
	// Teardowns must not fail on devices already gone.
}

func checkHostEnd(t *testing.T, a Attachment) {
	t.Helper()
	l, err := netlink.LinkByName(a.HostLink)
	if err != nil {
		t.Fatalf("host end %s: %v", a.HostLink, err)
	}
	if l.Attrs().OperState == netlink.OperDown || l.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("host end %s is not up", a.HostLink)
	}
	if l.Attrs().Alias != a.ID {
		t.Errorf("host end alias %q, want %q", l.Attrs().Alias, a.ID)
	}
	addrs, _ := netlink.AddrList(l, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != fmt.Sprintf("%v/30", a.Gateway) {
		t.Errorf("host end addresses %v, want %v/30", addrs, a.Gateway)
	}
}

// netnsHandle is a netlink handle in a's namespace, closed with the test.
func netnsHandle(t *testing.T, a Attachment) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(a.Netns)
	if err != nil {
		t.Fatalf("open netns: %v", err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

func checkGuestEnd(t *testing.T, a Attachment) {
	t.Helper()
	h := netnsHandle(t, a)
	lo, err := h.LinkByName("lo")
	if err != nil || lo.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("lo in netns missing or down: %v", err)
	}
	eth, err := h.LinkByName(GuestLink)
	if err != nil {
		t.Fatalf("%s in netns: %v", GuestLink, err)
	}
	addrs, _ := h.AddrList(eth, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != fmt.Sprintf("%v/30", a.Addr) {
		t.Errorf("guest addresses %v, want %v/30", addrs, a.Addr)
	}
	routes, _ := h.RouteList(eth, netlink.FAMILY_V4)
	var def bool
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.String() == a.Gateway.String() {
			def = true
		}
	}
	if !def {
		t.Errorf("no default route via %v in netns: %v", a.Gateway, routes)
	}
}

// serveInNetns answers every TCP connection to port 8080 in the namespace
// at path with msg.
func serveInNetns(t *testing.T, path, msg string) {
	t.Helper()
	var ln net.Listener
	err := onFreshThread(func() error {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return err
		}
		ln, err = net.Listen("tcp", ":8080") // the socket stays in the netns
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, msg)
			c.Close()
		}
	}()
}

func fetch(t *testing.T, addr netip.Addr) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, 8080).String(), 2*time.Second)
	if err != nil {
		t.Fatalf("dial sandbox: %v", err)
	}
	defer c.Close()
	b, _ := io.ReadAll(c)
	return string(b)
}

// mountsUnder lists the mount points below dir.
func mountsUnder(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir) {
			out = append(out, f[4])
		}
	}
	return out
}

// BenchmarkSetup measures Setup: "cold" makes every sandbox's devices,
// "spare" claims a spare the filler made beforehand (waiting for it is off
// the clock); "-tap" in ModeTap. Teardown runs off the clock. Besides the mean it reports the
// median, the figure the create path is judged by.
func BenchmarkSetup(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	for _, bc := range []struct {
		name   string
		mode   Mode
		spares int
	}{{"cold", ModeVeth, 0}, {"spare", ModeVeth, 1}, {"cold-tap", ModeTap, 0}, {"spare-tap", ModeTap, 1}} {
		b.Run(bc.name, func(b *testing.B) {
			p, err := NewPool(Options{Prefix: netip.MustParsePrefix("100.88.254.0/24"), NetnsDir: b.TempDir(), LinkPrefix: "cbbench", Mode: bc.mode, Spares: bc.spares})
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			ctx := context.Background()
			var took []time.Duration
			for i := 0; b.Loop(); i++ {
				b.StopTimer()
				waitSpares(b, p, bc.spares)
				id := fmt.Sprintf("bench%d", i)
				b.StartTimer()
				start := time.Now()
				_, err := p.Setup(ctx, id)
				took = append(took, time.Since(start))
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				if err := p.Teardown(ctx, id); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			slices.Sort(took)
			b.ReportMetric(float64(took[len(took)/2].Nanoseconds()), "median-ns/op")
		})
	}
}
