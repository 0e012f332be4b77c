package dns

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// handler turns one sandbox's queries into replies: the policy decision,
// forwarding, and what is learned. It owns no sockets, so the fuzz test
// drives it directly with a fake upstream.
type handler struct {
	key            string
	up             exchanger
	learner        Learner
	minTTL, maxTTL time.Duration
	log            *slog.Logger

	mu     sync.Mutex // guards the fields below; Learner calls are made with it held
	m      *matcher
	book   *book
	closed bool
}

// verdict is what to do with an upstream reply.
type verdict int

const (
	pass     verdict = iota // send it
	refuse                  // the rules no longer allow the name and the sandbox is closed
	servfail                // the answer cannot be recorded
	drop                    // the sandbox is being removed
)

// handle answers one query, b, received over TCP if tcp. A nil reply means
// none is sent: b is not a DNS query (UDP drops it, TCP closes the
// connection) or the sandbox is going away.
func (h *handler) handle(ctx context.Context, b []byte, tcp bool) []byte {
	pq, rc, dropIt := parseQuery(b)
	if dropIt {
		return nil
	}
	if rc != dnsmessage.RCodeSuccess {
		return pq.reply(rc, false)
	}
	h.mu.Lock()
	closed, allowed, open := h.closed, h.m.match(pq.name), h.m.open
	h.mu.Unlock()
	switch {
	case closed:
		return nil
	case !allowed && !open:
		h.log.Debug("refused", "sandbox", h.key, "name", pq.name, "type", pq.q.Type)
		return pq.reply(dnsmessage.RCodeRefused, false)
	case pq.q.Type == dnsmessage.TypeAAAA:
		// No IPv6 egress: an empty answer sends clients straight to IPv4.
		return pq.reply(dnsmessage.RCodeSuccess, false)
	case pq.q.Type == dnsmessage.TypeAXFR || pq.q.Type == typeIXFR:
		return pq.reply(dnsmessage.RCodeRefused, false)
	}

	resp, err := h.up.exchange(ctx, b, pq.q, tcp)
	if err != nil {
		if ctx.Err() == nil {
			h.log.Warn("upstream failed", "sandbox", h.key, "name", pq.name, "err", err)
		}
		return pq.reply(dnsmessage.RCodeServerFailure, false)
	}
	if !matchesQuery(resp, pq.hdr.ID, pq.q) {
		h.log.Warn("upstream reply does not match the query", "sandbox", h.key, "name", pq.name)
		return pq.reply(dnsmessage.RCodeServerFailure, false)
	}
	up := rcode(resp)
	var addrs []netip.Addr
	var ttl uint32
	var perr error
	if up == dnsmessage.RCodeSuccess {
		addrs, ttl, perr = chainAddrs(resp, pq.name)
	}
	switch h.record(pq.name, addrs, ttl, perr) {
	case drop:
		return nil
	case refuse:
		return pq.reply(dnsmessage.RCodeRefused, false)
	case servfail:
		return pq.reply(dnsmessage.RCodeServerFailure, false)
	}
	// A reply capTTLs cannot walk was not recorded (chainAddrs failed on it
	// too, or the name is not recorded): it goes out as the upstream sent it.
	_ = capTTLs(resp, uint32(h.maxTTL/time.Second))
	if !tcp && len(resp) > pq.maxUDP() {
		// Too big for the client (an answer fetched over TCP after a
		// truncated UDP one): tell it to ask over TCP.
		return pq.reply(up, true)
	}
	return resp
}

// record learns addrs, the answer's addresses for name, before the reply
// goes out. The rules are checked again here, under the lock, so that an
// answer racing SetRules opens nothing the new rules forbid.
func (h *handler) record(name string, addrs []netip.Addr, ttl uint32, perr error) verdict {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.closed:
		return drop
	case !h.m.match(name):
		if h.m.open {
			return pass
		}
		return refuse
	case perr != nil:
		h.log.Warn("unreadable answer for an allowed name", "sandbox", h.key, "name", name, "err", perr)
		return servfail
	case len(addrs) == 0:
		return pass
	}
	until := now.Add(h.clamp(ttl))
	for _, g := range h.book.plan(addrs, until, now) {
		if err := h.learner.Learn(h.key, g.addrs, g.until); err != nil {
			h.log.Error("opening learned addresses failed", "sandbox", h.key, "name", name, "addrs", g.addrs, "err", err)
			return servfail
		}
	}
	e := h.book.commit(name, addrs, until)
	touched := map[netip.Addr]time.Time{}
	h.book.evict(e, touched)
	if len(touched) > 0 {
		if err := h.settle(touched, now); err != nil {
			h.log.Error("closing evicted addresses failed", "sandbox", h.key, "err", err)
		}
	}
	return pass
}

// clamp turns an answer's TTL into how long its addresses stay open.
func (h *handler) clamp(ttl uint32) time.Duration {
	return min(max(time.Duration(ttl)*time.Second, h.minTTL), h.maxTTL)
}

// settle makes the Learner follow the removal of the deadlines in touched.
// Called with h.mu held.
func (h *handler) settle(touched map[netip.Addr]time.Time, now time.Time) error {
	forget, shorten := h.book.settle(touched, now)
	// A Learner may keep the later of two deadlines (network/policy does),
	// so shortening is a Forget followed by a Learn. Both happen under h.mu,
	// before any other answer of this sandbox is sent; only connections
	// opened in that instant can miss the address.
	for _, g := range shorten {
		forget = append(forget, g.addrs...)
	}
	var errs []error
	if len(forget) > 0 {
		if err := h.learner.Forget(h.key, forget); err != nil {
			errs = append(errs, err)
		}
	}
	for _, g := range shorten {
		if err := h.learner.Learn(h.key, g.addrs, g.until); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// setRules replaces the rules and closes what they no longer justify.
func (h *handler) setRules(m *matcher) error {
	now := time.Now()
	h.mu.Lock()
	defer h.mu.Unlock()
	h.m = m
	touched := map[netip.Addr]time.Time{}
	h.book.retain(m, touched)
	return h.settle(touched, now)
}

// close stops learning and forgets everything learned.
func (h *handler) close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.closed = true
	all := h.book.all()
	h.book = newBook(h.book.maxNames, h.book.maxPairs)
	if len(all) == 0 {
		return nil
	}
	return h.learner.Forget(h.key, all)
}

// sweep drops expired book entries.
func (h *handler) sweep(now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.book.sweep(now)
}
