package policy

import (
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"
)

// BenchmarkRoundTrip measures a 1-byte TCP echo round trip from sandbox A
// through the router to the internet host, without and with the program
// attached, in one run. It reports p50 and p99 (ns); the difference of the
// p50s is the program's added latency for two packets (request and ACK
// piggybacked reply go through it once each way out). "policy" takes the
// address rules (allowOut, denyOut, closed: three trie lookups; the
// world's internet is TEST-NET-2, opened as newManager does);
// "learned" has the internet closed and the host's address learned, so
// every packet passes on its flow (ktime, one hash lookup and a store).
func BenchmarkRoundTrip(b *testing.B) {
	w := newWorld(b)
	run := func(b *testing.B) {
		c, err := dial(w.a, "tcp4", inetAddr+":7000")
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		buf := []byte{'x'}
		d := make([]time.Duration, 0, b.N)
		b.ResetTimer()
		for range b.N {
			t0 := time.Now()
			if _, err := c.Write(buf); err != nil {
				b.Fatal(err)
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				b.Fatal(err)
			}
			d = append(d, time.Since(t0))
		}
		slices.Sort(d)
		b.ReportMetric(float64(d[len(d)/2].Nanoseconds()), "p50-ns")
		b.ReportMetric(float64(d[len(d)*99/100].Nanoseconds()), "p99-ns")
	}
	b.Run("bare", run)
	m, err := New(Options{Name: "bench" + strconv.Itoa(os.Getpid()), PinRoot: "/sys/fs/bpf/cubicle-test",
		PoolPrefix: testPool, AllowCIDRs: pfx("198.51.100.0/24"), NetNS: w.router})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Remove()
	if err := m.Attach(w.sbaIndex, Policy{AllowInternet: true, DenyOut: pfx("8.8.8.8/32")}); err != nil {
		b.Fatal(err)
	}
	b.Run("policy", run)
	if err := m.Update(w.sbaIndex, Policy{}); err != nil {
		b.Fatal(err)
	}
	if err := m.Learn(w.sbaIndex, []netip.Addr{netip.MustParseAddr(inetAddr)}, time.Now().Add(time.Hour)); err != nil {
		b.Fatal(err)
	}
	b.Run("learned", run)
	if err := m.Detach(w.sbaIndex); err != nil {
		b.Fatal(err)
	}
	b.Run("bare-again", run)
}
