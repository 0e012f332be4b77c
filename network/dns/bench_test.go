package dns

import (
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// countLearner only counts, so that the benchmark measures the resolver.
type countLearner struct{ learns atomic.Int64 }

func (c *countLearner) Learn(string, []netip.Addr, time.Time) error { c.learns.Add(1); return nil }
func (c *countLearner) Forget(string, []netip.Addr) error           { return nil }

// BenchmarkResolveAllowed measures one allowed UDP query end to end over
// loopback: client → resolver → upstream (UDP) → Learn → client.
func BenchmarkResolveAllowed(b *testing.B) {
	up := newTestUpstream(b)
	up.set("www.example.com", cname("www.example.com.", 300, "cdn.example.net."), a("cdn.example.net.", 300, "192.0.2.1"))
	l := &countLearner{}
	r, err := New(Options{Upstreams: []netip.AddrPort{up.addr}, Learner: l, Logger: discard()})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	ip := loopback()
	if err := r.Add("bench", ip, Rules{Domains: []string{"*.example.com"}}); err != nil {
		b.Fatal(err)
	}
	c, err := net.Dial("udp", netip.AddrPortFrom(ip, DefaultPort).String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	q := newQuery(1, "www.example.com.", dnsmessage.TypeA, 1232)
	buf := make([]byte, 1500)
	b.ReportAllocs()
	for b.Loop() {
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
		if _, err := c.Write(q); err != nil {
			b.Fatal(err)
		}
		n, err := c.Read(buf)
		if err != nil {
			b.Fatal(err)
		}
		if n < headerLen || rcode(buf[:n]) != dnsmessage.RCodeSuccess {
			b.Fatalf("bad reply %x", buf[:n])
		}
	}
	if l.learns.Load() == 0 {
		b.Fatal("nothing learned")
	}
}
