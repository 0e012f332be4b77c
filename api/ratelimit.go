package api

import (
	"math"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// Failed authentication is throttled per source: a source that presents
// more than authBurst bad API keys gets 429 for every request until its
// budget refills at authRefill per second. A key space of 160 bits makes
// guessing hopeless anyway; the limit keeps a flood of bad keys (3000 a
// second were seen) from costing a hash and a database lookup each, and
// from filling the log. While a source is throttled its good keys are
// refused too: checking them would tell a guesser when it had hit one.
const (
	authBurst  = 20
	authRefill = 1.0 // per second
	// authSources bounds the memory the limiter holds: past it, sources
	// whose budget has refilled are forgotten first, then the stalest.
	authSources = 10000
)

// authLimiter is a token bucket per source.
type authLimiter struct {
	burst, refill float64
	max           int

	mu      sync.Mutex // guards buckets
	buckets map[netip.Prefix]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newAuthLimiter() *authLimiter {
	return &authLimiter{burst: authBurst, refill: authRefill, max: authSources, buckets: map[netip.Prefix]*bucket{}}
}

// level refills b to now and returns its tokens.
func (l *authLimiter) level(b *bucket, now time.Time) float64 {
	b.tokens = math.Min(l.burst, b.tokens+now.Sub(b.last).Seconds()*l.refill)
	b.last = now
	return b.tokens
}

// take spends one attempt of src's budget before a key is checked. It
// reports false, and how long until an attempt is due, when none is left.
func (l *authLimiter) take(src netip.Prefix, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.buckets[src]
	if !ok {
		l.makeRoom(now)
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[src] = b
	}
	if l.level(b, now) < 1 {
		return false, time.Duration((1 - b.tokens) / l.refill * float64(time.Second))
	}
	b.tokens--
	return true, 0
}

// refund gives back the attempt a good key took: only failures count.
func (l *authLimiter) refund(src netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if b, ok := l.buckets[src]; ok {
		b.tokens = math.Min(l.burst, b.tokens+1)
	}
}

// makeRoom keeps the map under its bound. Called with mu held, only when a
// new source arrives at a full map, so its linear sweep is rare.
func (l *authLimiter) makeRoom(now time.Time) {
	if len(l.buckets) < l.max {
		return
	}
	var stalest netip.Prefix
	var oldest time.Time
	for src, b := range l.buckets {
		if l.level(b, now) >= l.burst {
			delete(l.buckets, src) // a full bucket is the same as none
			continue
		}
		if oldest.IsZero() || b.last.Before(oldest) {
			stalest, oldest = src, b.last
		}
	}
	if len(l.buckets) >= l.max {
		delete(l.buckets, stalest)
	}
}

// sourceOf is who a request comes from, as the limiter counts: the peer's
// address, or, when the peer is a trusted proxy, the nearest address in
// X-Forwarded-For that is not one. IPv6 sources count per /64, the
// smallest block one host is usually given.
func sourceOf(r *http.Request, trusted []netip.Prefix) netip.Prefix {
	addr := peerAddr(r.RemoteAddr)
	if isTrusted(addr, trusted) {
		hops := strings.Split(strings.Join(r.Header.Values("X-Forwarded-For"), ","), ",")
		for i := len(hops) - 1; i >= 0; i-- {
			a, err := netip.ParseAddr(strings.TrimSpace(hops[i]))
			if err != nil {
				break // a garbled chain: stop at the last proxy we trust
			}
			addr = a.Unmap()
			if !isTrusted(addr, trusted) {
				break
			}
		}
	}
	bits := 32
	if addr.Is6() {
		bits = 64
	}
	p, _ := addr.Prefix(bits)
	return p
}

func peerAddr(remote string) netip.Addr {
	if ap, err := netip.ParseAddrPort(remote); err == nil {
		return ap.Addr().Unmap()
	}
	host, _, err := net.SplitHostPort(remote)
	if err != nil {
		host = remote
	}
	a, _ := netip.ParseAddr(host)
	return a.Unmap()
}

func isTrusted(a netip.Addr, trusted []netip.Prefix) bool {
	for _, p := range trusted {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
