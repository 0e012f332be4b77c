package network

import (
	"context"
	"net"
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// trackHost makes sure the host namespace tracks connections while the test
// runs. The kernel only does once some rule needs it (in production,
// network/nat's masquerading); the test's own table reads the state of
// incoming packets and counts them, and changes nothing else.
func trackHost(t *testing.T) {
	t.Helper()
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	tbl := c.AddTable(&nftables.Table{Name: "cbtest_conntrack", Family: nftables.TableFamilyIPv4})
	accept := nftables.ChainPolicyAccept
	in := c.AddChain(&nftables.Chain{Name: "input", Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: tbl, Chain: in, Exprs: []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Counter{},
	}})
	if err := c.Flush(); err != nil {
		t.Fatalf("add a conntrack-using table to the host: %v", err)
	}
	t.Cleanup(func() {
		c.DelTable(tbl)
		if err := c.Flush(); err != nil {
			t.Errorf("delete table %s: %v", tbl.Name, err)
		}
	})
}

// flowsOf lists the host's conntrack entries with addr at either end of
// the original direction.
func flowsOf(t *testing.T, addr netip.Addr) []*netlink.ConntrackFlow {
	t.Helper()
	flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
	if err != nil {
		t.Fatalf("list conntrack: %v", err)
	}
	var out []*netlink.ConntrackFlow
	for _, f := range flows {
		if addrFlows(addr).MatchConntrackFlow(f) {
			out = append(out, f)
		}
	}
	return out
}

func TestTeardownForgetsConntrack(t *testing.T) {
	ctx := context.Background()
	p, _ := testPool(t, "100.88.248.32/28")
	trackHost(t)
	a, err := p.Setup(ctx, "tracked")
	if err != nil {
		t.Fatal(err)
	}
	// Keep another sandbox's flows, to see that Teardown picks the right ones.
	b, err := p.Setup(ctx, "bystander")
	if err != nil {
		t.Fatal(err)
	}

	// The sandbox sends to the host (UDP), and the host connects to it
	// (TCP): both make entries.
	srv := listenUDP(t, netip.AddrPortFrom(a.Gateway, 0))
	to := addrPort(srv.LocalAddr())
	for _, x := range []Attachment{a, b} {
		err := inNetns(x.Netns, func() error {
			c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(to))
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("hello " + x.ID))
			return err
		})
		if err != nil {
			t.Fatalf("send from %s: %v", x.ID, err)
		}
	}
	for range 2 {
		if got, src := recvFrom(t, srv); src.Addr() != a.Addr && src.Addr() != b.Addr {
			t.Fatalf("datagram %q from %v", got, src)
		}
	}
	serveInNetns(t, a.Netns, "tracked")
	if got := fetch(t, a.Addr); got != "tracked" {
		t.Fatalf("read %q from the sandbox", got)
	}

	var fromSandbox, toSandbox bool
	for _, f := range flowsOf(t, a.Addr) {
		fromSandbox = fromSandbox || f.Forward.SrcIP.Equal(a.Addr.AsSlice())
		toSandbox = toSandbox || f.Forward.DstIP.Equal(a.Addr.AsSlice())
	}
	if !fromSandbox || !toSandbox {
		t.Fatalf("conntrack entries of %v: from it %v, to it %v; want both", a.Addr, fromSandbox, toSandbox)
	}
	if len(flowsOf(t, b.Addr)) == 0 {
		t.Fatalf("no conntrack entry of %v", b.Addr)
	}

	if err := p.Teardown(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if left := flowsOf(t, a.Addr); len(left) > 0 {
		t.Fatalf("conntrack entries outlive the sandbox: %v", left)
	}
	if len(flowsOf(t, b.Addr)) == 0 {
		t.Fatalf("Teardown of %s removed the entries of %s", a.ID, b.ID)
	}
	if err := p.Teardown(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	if left := flowsOf(t, b.Addr); len(left) > 0 {
		t.Fatalf("conntrack entries outlive the sandbox: %v", left)
	}
}
