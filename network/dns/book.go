package dns

import (
	"container/list"
	"net/netip"
	"slices"
	"time"
)

const (
	// maxNames bounds the names one sandbox's book remembers.
	maxNames = 4096
	// maxPairs bounds its (name, address) pairs; one answer holds at most
	// about 4000 A records (64 KiB over TCP at 16 bytes each), so the
	// answer being recorded always fits.
	maxPairs = 16384
)

// entry is what one question name justified: each address with the
// deadline until which the latest answer naming it lives.
type entry struct {
	name  string
	addrs map[netip.Addr]time.Time
	elem  *list.Element // in book.lru
}

// grant is one Learner.Learn call: addrs open until until.
type grant struct {
	until time.Time
	addrs []netip.Addr
}

// book remembers, for one sandbox, which names justified which addresses
// until when, so that the resolver can tell the Learner exactly what to
// close when rules change. Not safe for concurrent use: the sandbox's mutex
// guards it.
type book struct {
	names  map[string]*entry
	byAddr map[netip.Addr]map[*entry]struct{}
	// lru orders entries by their last answer, oldest first: the eviction
	// order.
	lru                list.List
	pairs              int
	maxNames, maxPairs int
}

func newBook(maxNames, maxPairs int) *book {
	return &book{
		names:    map[string]*entry{},
		byAddr:   map[netip.Addr]map[*entry]struct{}{},
		maxNames: maxNames,
		maxPairs: maxPairs,
	}
}

// latest is the latest unexpired deadline any name holds for a, or zero.
func (b *book) latest(a netip.Addr, now time.Time) time.Time {
	var t time.Time
	for e := range b.byAddr[a] {
		if u := e.addrs[a]; u.After(now) && u.After(t) {
			t = u
		}
	}
	return t
}

// plan returns the Learn calls that open addrs until at least until. Each
// address gets the latest deadline any name justifies, because a Learner
// sets deadlines rather than extending them: learning a short-lived answer
// must not cut short an address a longer-lived one opened.
func (b *book) plan(addrs []netip.Addr, until, now time.Time) []grant {
	var gs grants
	for _, a := range addrs {
		t := until
		if l := b.latest(a, now); l.After(t) {
			t = l
		}
		gs.add(t, a)
	}
	return gs.list
}

// grants groups addresses by deadline, so that one Learner call covers
// all addresses sharing one (usually all of an answer).
type grants struct {
	list []grant
	// index maps a deadline to its place in list. Deadlines that are Equal
	// but not == (other monotonic reading) only make an extra call.
	index map[time.Time]int
}

func (gs *grants) add(t time.Time, a netip.Addr) {
	i, ok := gs.index[t]
	if !ok {
		if gs.index == nil {
			gs.index = map[time.Time]int{}
		}
		i = len(gs.list)
		gs.index[t] = i
		gs.list = append(gs.list, grant{until: t})
	}
	gs.list[i].addrs = append(gs.list[i].addrs, a)
}

// commit records that an answer for name justified addrs until until, and
// makes name the most recently learned.
func (b *book) commit(name string, addrs []netip.Addr, until time.Time) *entry {
	e := b.names[name]
	if e == nil {
		e = &entry{name: name, addrs: map[netip.Addr]time.Time{}}
		e.elem = b.lru.PushBack(e)
		b.names[name] = e
	} else {
		b.lru.MoveToBack(e.elem)
	}
	for _, a := range addrs {
		old, ok := e.addrs[a]
		if !ok {
			b.pairs++
			h := b.byAddr[a]
			if h == nil {
				h = map[*entry]struct{}{}
				b.byAddr[a] = h
			}
			h[e] = struct{}{}
		}
		if !ok || until.After(old) {
			e.addrs[a] = until
		}
	}
	return e
}

// remove takes e out of the book, noting in touched the latest deadline it
// held for each of its addresses (for settle).
func (b *book) remove(e *entry, touched map[netip.Addr]time.Time) {
	for a, u := range e.addrs {
		b.unlink(e, a)
		if u.After(touched[a]) {
			touched[a] = u
		}
	}
	b.pairs -= len(e.addrs)
	b.lru.Remove(e.elem)
	delete(b.names, e.name)
}

func (b *book) unlink(e *entry, a netip.Addr) {
	h := b.byAddr[a]
	delete(h, e)
	if len(h) == 0 {
		delete(b.byAddr, a)
	}
}

// evict removes the least recently learned names while the book is over
// its bounds, never keep (the name just learned).
func (b *book) evict(keep *entry, touched map[netip.Addr]time.Time) {
	for len(b.names) > b.maxNames || b.pairs > b.maxPairs {
		e := b.lru.Front().Value.(*entry)
		if e == keep {
			return
		}
		b.remove(e, touched)
	}
}

// retain removes every name m no longer allows.
func (b *book) retain(m *matcher, touched map[netip.Addr]time.Time) {
	for n, e := range b.names {
		if !m.match(n) {
			b.remove(e, touched)
		}
	}
}

// settle says what removing the deadlines in touched means for the
// Learner: addresses no remaining name justifies are forgotten, and those
// whose remaining justification ends earlier than the removed one are
// learned again with the earlier deadline.
func (b *book) settle(touched map[netip.Addr]time.Time, now time.Time) (forget []netip.Addr, shorten []grant) {
	var gs grants
	for a, u := range touched {
		l := b.latest(a, now)
		switch {
		case l.IsZero():
			forget = append(forget, a)
		case u.After(l):
			gs.add(l, a)
		}
	}
	// Sorted so that Learner calls are deterministic.
	slices.SortFunc(forget, netip.Addr.Compare)
	for _, g := range gs.list {
		slices.SortFunc(g.addrs, netip.Addr.Compare)
	}
	return forget, gs.list
}

// sweep drops expired pairs, and names left without any, so that a
// sandbox resolving ever new names keeps a bounded book. Expired addresses
// need no Learner call: their deadline already closed them.
func (b *book) sweep(now time.Time) {
	for n, e := range b.names {
		for a, u := range e.addrs {
			if !u.After(now) {
				delete(e.addrs, a)
				b.unlink(e, a)
				b.pairs--
			}
		}
		if len(e.addrs) == 0 {
			b.lru.Remove(e.elem)
			delete(b.names, n)
		}
	}
}

// all lists every address the book holds, expired or not, sorted.
func (b *book) all() []netip.Addr {
	as := make([]netip.Addr, 0, len(b.byAddr))
	for a := range b.byAddr {
		as = append(as, a)
	}
	slices.SortFunc(as, netip.Addr.Compare)
	return as
}
