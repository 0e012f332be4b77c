package egress

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	goruntime "runtime"
	"slices"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/net/dns/dnsmessage"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/dns"
	"github.com/cubicle-dev/cubicle/network/dns/dnstest"
	"github.com/cubicle-dev/cubicle/network/policy"
)

const pinRoot = "/sys/fs/bpf/cubicle-test"

// fixture is a pool whose devices an Enforcer prepares through the hooks
// of PoolOptions, as cubicle serve wires them, with an upstream DNS server on
// loopback that answers every A query with upstreamAnswer.
type fixture struct {
	pool *network.Pool
	enf  *Enforcer
}

var upstreamAnswer = netip.MustParseAddr("198.51.100.7")

func newFixture(tb testing.TB, prefix string, spares int) *fixture {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root: network namespaces, eBPF and port 53")
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	name := "egress" + strconv.Itoa(os.Getpid())
	tb.Cleanup(func() { os.Remove(pinRoot) }) // only once empty
	tb.Cleanup(func() { os.RemoveAll(filepath.Join(pinRoot, name)) })
	pm, err := policy.New(policy.Options{Name: name, PinRoot: pinRoot, PoolPrefix: netip.MustParsePrefix(prefix), Logger: log})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { pm.Close() })
	enf, err := New(pm, dns.Options{Upstreams: []netip.AddrPort{startUpstream(tb)}, Logger: log})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { enf.Close() })
	pool, err := network.NewPool(enf.PoolOptions(network.Options{
		Prefix: netip.MustParsePrefix(prefix), NetnsDir: tb.TempDir(), LinkPrefix: "cbeg", Spares: spares,
		Logger: log,
	}))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		for _, a := range pool.List() {
			pool.Teardown(context.Background(), a.ID)
		}
		pool.Close()
	})
	return &fixture{pool: pool, enf: enf}
}

// startUpstream serves A queries on a loopback address of its own.
func startUpstream(tb testing.TB) netip.AddrPort {
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 77, byte(os.Getpid() >> 8), byte(os.Getpid())}), 53)
	pc, err := net.ListenPacket("udp4", addr.String())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { pc.Close() })
	go dnstest.Serve(pc, func(string) (netip.Addr, bool) { return upstreamAnswer, true }, 300)
	return addr
}

// query asks the sandbox's resolver, from inside its namespace, for name's
// A records. It returns the RCODE and the addresses.
func query(a network.Attachment, name string) (dnsmessage.RCode, []netip.Addr, error) {
	var rc dnsmessage.RCode
	var addrs []netip.Addr
	err := inNetns(a.Netns, func() error {
		c, err := net.Dial("udp4", netip.AddrPortFrom(a.Gateway, 53).String())
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		q := dnsmessage.Message{Header: dnsmessage.Header{ID: 0x4242, RecursionDesired: true},
			Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(name + "."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}}}
		b, _ := q.Pack()
		if _, err := c.Write(b); err != nil {
			return err
		}
		buf := make([]byte, 1500)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		var m dnsmessage.Message
		if err := m.Unpack(buf[:n]); err != nil {
			return err
		}
		rc = m.RCode
		for _, r := range m.Answers {
			if ar, ok := r.Body.(*dnsmessage.AResource); ok {
				addrs = append(addrs, netip.AddrFrom4(ar.A))
			}
		}
		return nil
	})
	return rc, addrs, err
}

// inNetns runs fn on a throwaway OS thread inside the namespace at path.
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		goruntime.LockOSThread() // never unlocked: the thread dies with the goroutine
		ns, err := netns.GetFromPath(path)
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func TestEnforcerFollowsThePolicy(t *testing.T) {
	f := newFixture(t, "100.88.210.0/24", 1)
	ctx := context.Background()
	a, err := f.pool.Setup(ctx, "sbx1")
	if err != nil {
		t.Fatal(err)
	}
	if !f.enf.Prepared(a) {
		t.Fatal("the pool's hook did not prepare the device")
	}
	steps := []struct {
		name   string
		egress *Policy // applied before the queries; nil: as made
		want   map[string]dnsmessage.RCode
	}{
		{"default policy: every name resolves", nil,
			map[string]dnsmessage.RCode{"example.test": dnsmessage.RCodeSuccess, "other.test": dnsmessage.RCodeSuccess}},
		{"closed, with domains", &Policy{AllowInternet: false, AllowDomains: []string{"example.test", "*.wild.test"}},
			map[string]dnsmessage.RCode{"example.test": dnsmessage.RCodeSuccess, "a.b.wild.test": dnsmessage.RCodeSuccess,
				"wild.test": dnsmessage.RCodeRefused, "other.test": dnsmessage.RCodeRefused}},
		{"denyOut 0.0.0.0/0 closes like allow_internet_access=false",
			&Policy{AllowInternet: true, DenyOut: []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")}},
			map[string]dnsmessage.RCode{"example.test": dnsmessage.RCodeRefused}},
		{"open again", &Policy{AllowInternet: true},
			map[string]dnsmessage.RCode{"other.test": dnsmessage.RCodeSuccess}},
	}
	for _, s := range steps {
		if s.egress != nil {
			if err := f.enf.Apply(a, *s.egress); err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
		}
		names := make([]string, 0, len(s.want))
		for n := range s.want {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			rc, addrs, err := query(a, n)
			if err != nil {
				t.Fatalf("%s: %s: %v", s.name, n, err)
			}
			if rc != s.want[n] {
				t.Errorf("%s: %s: rcode %v, want %v", s.name, n, rc, s.want[n])
			}
			if rc == dnsmessage.RCodeSuccess && !slices.Equal(addrs, []netip.Addr{upstreamAnswer}) {
				t.Errorf("%s: %s: answer %v", s.name, n, addrs)
			}
		}
	}
	c, err := f.enf.Counters(a)
	if err != nil {
		t.Fatal(err)
	}
	if c.PassedPackets == 0 || c.PassedBytes == 0 {
		t.Errorf("queries to the resolver were not counted: %+v", c)
	}

	if err := f.enf.Apply(a, Policy{AllowDomains: []string{"*.test"}}); !errors.Is(err, dns.ErrBadDomain) {
		t.Errorf("Apply with *.test: %v, want ErrBadDomain", err)
	}

	if err := f.pool.Teardown(ctx, "sbx1"); err != nil {
		t.Fatal(err)
	}
	if f.enf.Prepared(a) {
		t.Error("the device is gone but the enforcer still holds it")
	}
	if _, err := f.enf.Counters(a); !errors.Is(err, policy.ErrNotAttached) {
		t.Errorf("Counters after teardown: %v, want ErrNotAttached", err)
	}
	// The resolver let go of the gateway address: it can be served again.
	if err := f.enf.dns.Add("probe", a.Gateway, dns.Rules{}); err != nil {
		t.Errorf("the gateway's port 53 is still held: %v", err)
	}
	f.enf.dns.Remove("probe")
}

// BenchmarkCreateNetworking is what networking adds to creating a
// sandbox with the device pool: claiming a spare and switching it to the
// sandbox's policy (eBPF maps and resolver rules). Devices are made and
// destroyed off the clock, as the pool's filler does. "cold" is the same
// with no spares (devices made and prepared on the create path), the
// baseline the pool is measured against.
func BenchmarkCreateNetworking(b *testing.B) {
	b.Run("cold", func(b *testing.B) { benchCreateNetworking(b, newFixture(b, "100.88.212.0/24", 0), false) })
	b.Run("spare", func(b *testing.B) { benchCreateNetworking(b, newFixture(b, "100.88.211.0/24", 4), true) })
}

func benchCreateNetworking(b *testing.B, f *fixture, spares bool) {
	ctx := context.Background()
	eg := Policy{AllowInternet: false,
		AllowOut:     []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")},
		AllowDomains: []string{"example.test", "*.pypi.org"}}
	samples := make([]time.Duration, 0, b.N)
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		for spares && f.pool.SparesReady() == 0 {
			time.Sleep(time.Millisecond)
		}
		id := fmt.Sprintf("bench%d", i)
		b.StartTimer()
		start := time.Now()
		a, err := f.pool.Setup(ctx, id)
		if err == nil {
			err = f.enf.Apply(a, eg)
		}
		samples = append(samples, time.Since(start))
		b.StopTimer()
		if err != nil {
			b.Fatal(err)
		}
		if err := f.pool.Teardown(ctx, id); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	slices.Sort(samples)
	b.ReportMetric(float64(samples[len(samples)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(samples[len(samples)*99/100].Microseconds()), "p99-µs")
}
