package dns

import (
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// TestFloodRateLimited: one sandbox floods its resolver with thousands of
// queries while a neighbour looks names up. Every neighbour lookup is
// answered, each well within a generous bound; the flood is cut down to
// its budget before it reaches the upstream, and counted.
func TestFloodRateLimited(t *testing.T) {
	w := newWorld(t, Options{})
	w.up.set("flood.example.com", a("flood.example.com.", 300, "192.0.2.60"))
	w.up.set("www.example.com", a("www.example.com.", 300, "192.0.2.61"))
	start := time.Now()
	flood := w.add(t, "flood", Rules{Open: true})
	nb := w.add(t, "neighbour", Rules{Open: true})

	c, err := net.Dial("udp4", flood.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Replies the flood gets back are read and thrown away, so that its
	// socket never backs up.
	go func() {
		buf := make([]byte, 1500)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
		}
	}()
	const minFlood = 5000
	var sent atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		q := newQuery(1, "flood.example.com.", dnsmessage.TypeA, 0)
		for i := 0; ; i++ {
			if i >= minFlood {
				select {
				case <-stop:
					return
				default:
				}
			}
			if _, err := c.Write(q); err == nil {
				sent.Add(1)
			}
		}
	})

	const lookups = 100
	var ok, failed int
	for i := range lookups {
		t0 := time.Now()
		resp, err := tryExchange(nb, newQuery(uint16(i), "www.example.com.", dnsmessage.TypeA, 0), i%2 == 1)
		took := time.Since(t0)
		var m dnsmessage.Message
		switch {
		case err != nil:
			t.Errorf("neighbour lookup %d: %v", i, err)
			failed++
		case m.Unpack(resp) != nil || m.RCode != dnsmessage.RCodeSuccess || len(answerAddrs(m)) != 1:
			t.Errorf("neighbour lookup %d: rcode %v, %d answers", i, m.RCode, len(m.Answers))
			failed++
		case took > 2*time.Second:
			t.Errorf("neighbour lookup %d took %v", i, took)
			failed++
		default:
			ok++
		}
	}
	close(stop)
	wg.Wait()
	elapsed := time.Since(start)

	st, err := w.r.Stats("flood")
	if err != nil {
		t.Fatal(err)
	}
	nst, _ := w.r.Stats("neighbour")
	var upstreamFlood int
	for _, q := range w.up.queries() {
		if strings.HasPrefix(q.name, "flood.") {
			upstreamFlood++
		}
	}
	// What the bucket lets through: the burst and the rate since Add.
	budget := DefaultQueryBurst + int(elapsed.Seconds()*DefaultQueryRate) + 1
	t.Logf("neighbour: %d answered, %d failed; flood: %d sent, %d rate-limited, %d overloaded, %d reached the upstream (budget %d in %v)",
		ok, failed, sent.Load(), st.RateLimited, st.Overloaded, upstreamFlood, budget, elapsed.Round(time.Millisecond))
	if st.RateLimited == 0 {
		t.Error("the flood was never rate-limited")
	}
	if upstreamFlood > budget {
		t.Errorf("%d flood queries reached the upstream, more than the budget %d", upstreamFlood, budget)
	}
	if nst.RateLimited != 0 || nst.Overloaded != 0 {
		t.Errorf("neighbour limited: %+v", nst)
	}
}

// TestRateLimitReplies: over its budget, a sandbox's UDP queries get no
// reply and its TCP queries are answered REFUSED; both are counted.
func TestRateLimitReplies(t *testing.T) {
	// One token per 1000 s: the budget is the burst for the whole test.
	w := newWorld(t, Options{QueryRate: 0.001, QueryBurst: 2})
	w.up.set("www.example.com", a("www.example.com.", 300, "192.0.2.61"))
	srv := w.add(t, "sb", Rules{Open: true})
	for i := range 2 {
		if m := parse(t, exchange(t, srv, newQuery(uint16(i), "www.example.com.", dnsmessage.TypeA, 0), i == 1)); m.RCode != dnsmessage.RCodeSuccess {
			t.Fatalf("query %d within the burst: rcode %v", i, m.RCode)
		}
	}
	if m := parse(t, exchange(t, srv, newQuery(7, "www.example.com.", dnsmessage.TypeA, 0), true)); m.RCode != dnsmessage.RCodeRefused || m.ID != 7 {
		t.Errorf("TCP over the limit: id %d rcode %v, want REFUSED", m.ID, m.RCode)
	}
	c, err := net.Dial("udp4", srv.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(newQuery(8, "www.example.com.", dnsmessage.TypeA, 0)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(time.Second))
	if n, err := c.Read(make([]byte, 512)); err == nil {
		t.Errorf("UDP over the limit got a %d-byte reply", n)
	}
	if st, _ := w.r.Stats("sb"); st.RateLimited != 2 {
		t.Errorf("rate-limited %d, want 2", st.RateLimited)
	}
	if len(w.up.queries()) != 2 {
		t.Errorf("upstream saw %d queries, want the 2 within the burst", len(w.up.queries()))
	}
	if _, err := w.r.Stats("nope"); err == nil {
		t.Error("Stats of an unknown sandbox: no error")
	}
}
