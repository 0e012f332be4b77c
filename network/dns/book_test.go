package dns

import (
	"slices"
	"testing"
	"time"
)

// TestBookEvictAndSweep drives a handler's bookkeeping directly: eviction
// at the bounds forgets only what no remaining name justifies, and sweep
// drops expired pairs without Learner calls.
func TestBookEvictAndSweep(t *testing.T) {
	l := &recLearner{}
	m, err := compile(Rules{Domains: []string{"*.test.com"}})
	if err != nil {
		t.Fatal(err)
	}
	h := &handler{key: "k", learner: l, minTTL: time.Second, maxTTL: time.Hour, log: discard(), m: m, book: newBook(2, 3)}
	rec := func(name string, ttl uint32, as ...string) {
		t.Helper()
		if v := h.record(name, addrs(as...), ttl, nil); v != pass {
			t.Fatalf("record %s: %v", name, v)
		}
	}
	rec("n1.test.com", 100, "192.0.2.1", "192.0.2.2")
	rec("n2.test.com", 100, "192.0.2.2")
	// A third name: n1, the oldest, is evicted; 192.0.2.2 is still n2's.
	rec("n3.test.com", 100, "192.0.2.3")
	_, _, forgets := l.snapshot()
	if len(forgets) != 1 || !slices.Equal(forgets[0], addrs("192.0.2.1")) {
		t.Fatalf("forgets %v, want [[192.0.2.1]]", forgets)
	}
	if len(h.book.names) != 2 || h.book.pairs != 2 {
		t.Errorf("book holds %d names %d pairs", len(h.book.names), h.book.pairs)
	}
	// Learning n2 again makes n3 the oldest; too many pairs evicts it.
	rec("n2.test.com", 100, "192.0.2.2", "192.0.2.4", "192.0.2.5")
	_, _, forgets = l.snapshot()
	if len(forgets) != 2 || !slices.Equal(forgets[1], addrs("192.0.2.3")) {
		t.Fatalf("forgets %v, want 192.0.2.3 next", forgets)
	}
	// An answer larger than the bound is still recorded whole; everything
	// older goes.
	rec("big.test.com", 100, "192.0.2.6", "192.0.2.7", "192.0.2.8", "192.0.2.9")
	if _, ok := h.book.names["big.test.com"]; !ok || len(h.book.names) != 1 || h.book.pairs != 4 {
		t.Errorf("big answer: names %v pairs %d", h.book.names, h.book.pairs)
	}
	_, _, forgets = l.snapshot()
	if len(forgets) != 3 || !slices.Equal(forgets[2], addrs("192.0.2.2", "192.0.2.4", "192.0.2.5")) {
		t.Fatalf("forgets %v, want n2's addresses last", forgets)
	}

	h.sweep(time.Now().Add(2 * time.Hour))
	if len(h.book.names) != 0 || h.book.pairs != 0 || len(h.book.byAddr) != 0 || h.book.lru.Len() != 0 {
		t.Errorf("after sweep: %d names %d pairs %d addrs", len(h.book.names), h.book.pairs, len(h.book.byAddr))
	}
	_, _, after := l.snapshot()
	if len(after) != len(forgets) {
		t.Errorf("sweep called Forget: %v", after[len(forgets):])
	}
}

// TestRecordRacesSetRules: an answer arriving after its name was removed
// from the rules is neither learned nor handed out to a closed sandbox.
func TestRecordRacesSetRules(t *testing.T) {
	l := &recLearner{}
	h := &handler{key: "k", learner: l, minTTL: time.Second, maxTTL: time.Hour, log: discard(), book: newBook(maxNames, maxPairs)}
	m, _ := compile(Rules{Domains: []string{"other.com"}})
	h.m = m
	if v := h.record("gone.com", addrs("192.0.2.1"), 60, nil); v != refuse {
		t.Errorf("closed sandbox: %v, want refuse", v)
	}
	m, _ = compile(Rules{Domains: []string{"other.com"}, Open: true})
	h.m = m
	if v := h.record("gone.com", addrs("192.0.2.1"), 60, nil); v != pass {
		t.Errorf("open sandbox: %v, want pass", v)
	}
	if _, learns, _ := l.snapshot(); len(learns) != 0 {
		t.Errorf("learned %+v", learns)
	}
	if err := h.close(); err != nil {
		t.Fatal(err)
	}
	if v := h.record("other.com", addrs("192.0.2.1"), 60, nil); v != drop {
		t.Errorf("closed handler: %v, want drop", v)
	}
}

func TestClamp(t *testing.T) {
	h := &handler{minTTL: time.Minute, maxTTL: time.Hour}
	for _, tc := range []struct {
		ttl  uint32
		want time.Duration
	}{{0, time.Minute}, {59, time.Minute}, {61, 61 * time.Second}, {3600, time.Hour}, {^uint32(0), time.Hour}} {
		if got := h.clamp(tc.ttl); got != tc.want {
			t.Errorf("clamp(%d) = %v, want %v", tc.ttl, got, tc.want)
		}
	}
}
