package dns

import (
	"errors"
	"math"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// TestResolveAllowed: an allowed name is forwarded, exactly the CNAME
// chain's A records are learned with the clamped TTL, and the Learner
// returns before the client has its answer.
func TestResolveAllowed(t *testing.T) {
	for _, tcp := range []bool{false, true} {
		name := "udp"
		if tcp {
			name = "tcp"
		}
		t.Run(name, func(t *testing.T) {
			w := newWorld(t, Options{MinTTL: 60 * time.Second, MaxTTL: time.Hour})
			w.l.pause = 20 * time.Millisecond
			w.up.set("www.example.com",
				cname("www.example.com.", 300, "cdn.example.net."),
				a("unrelated.example.com.", 300, "203.0.113.1"), // not on the chain
				cname("cdn.example.net.", 30, "edge.provider.org."),
				a("edge.provider.org.", 120, "192.0.2.1"),
				a("www.example.com.evil.", 300, "203.0.113.2"), // not on the chain
				a("edge.provider.org.", 120, "192.0.2.2"),
			)
			w.up.set("long.example.com", a("long.example.com.", 90000, "192.0.2.3"))
			srv := w.add(t, "sb", Rules{Domains: []string{"*.example.com"}})

			before := time.Now()
			resp := exchange(t, srv, newQuery(0xbeef, "www.example.com.", dnsmessage.TypeA, 0), tcp)
			after := time.Now()
			w.l.event("reply")
			m := parse(t, resp)
			if m.ID != 0xbeef || m.RCode != dnsmessage.RCodeSuccess {
				t.Fatalf("reply ID %#x rcode %v", m.ID, m.RCode)
			}
			if got := answerAddrs(m); len(got) != 4 {
				t.Errorf("reply lost records: %v", got)
			}
			events, learns, _ := w.l.snapshot()
			if want := []string{"learn", "learned", "reply"}; !slices.Equal(events, want) {
				t.Errorf("events %v, want %v (Learn must return before the reply is sent)", events, want)
			}
			if len(learns) != 1 {
				t.Fatalf("Learn calls %+v, want 1", learns)
			}
			l := learns[0]
			if l.key != "sb" || !slices.Equal(l.addrs, addrs("192.0.2.1", "192.0.2.2")) {
				t.Errorf("learned %s %v, want sb [192.0.2.1 192.0.2.2]", l.key, l.addrs)
			}
			// The chain's least TTL is 30 s, clamped up to MinTTL.
			if l.until.Before(before.Add(60*time.Second)) || l.until.After(after.Add(60*time.Second)) {
				t.Errorf("until %v not %v + 60s", l.until, before)
			}
			q := w.up.queries()
			if len(q) != 1 || q[0].tcp != tcp || q[0].name != "www.example.com" {
				t.Errorf("upstream saw %+v", q)
			}

			// A TTL above MaxTTL is clamped down, in the Learn and in the reply.
			before = time.Now()
			m = parse(t, exchange(t, srv, newQuery(2, "LONG.example.com.", dnsmessage.TypeA, 0), tcp))
			after = time.Now()
			if len(m.Answers) != 1 || m.Answers[0].Header.TTL != 3600 {
				t.Errorf("reply answers %+v, want one with TTL 3600", m.Answers)
			}
			_, learns, _ = w.l.snapshot()
			if len(learns) != 2 || !slices.Equal(learns[1].addrs, addrs("192.0.2.3")) ||
				learns[1].until.Before(before.Add(time.Hour)) || learns[1].until.After(after.Add(time.Hour)) {
				t.Errorf("second Learn %+v, want [192.0.2.3] until now+1h", learns[1:])
			}
		})
	}
}

// TestDecisions covers the answers given without learning.
func TestDecisions(t *testing.T) {
	w := newWorld(t, Options{})
	w.up.set("open.test", a("open.test.", 300, "192.0.2.5"))
	w.up.set("ok.example.com", a("ok.example.com.", 300, "192.0.2.6"))
	closed := w.add(t, "closed", Rules{Domains: []string{"ok.example.com"}})
	open := w.add(t, "open", Rules{Domains: []string{"ok.example.com"}, Open: true})

	for _, tc := range []struct {
		name      string
		srv       netip.AddrPort
		qname     string
		qtype     dnsmessage.Type
		rcode     dnsmessage.RCode
		answers   int
		forwarded bool
	}{
		{"closed refuses", closed, "open.test.", dnsmessage.TypeA, dnsmessage.RCodeRefused, 0, false},
		{"closed refuses subdomain of exact", closed, "x.ok.example.com.", dnsmessage.TypeA, dnsmessage.RCodeRefused, 0, false},
		{"closed refuses AAAA of others", closed, "open.test.", dnsmessage.TypeAAAA, dnsmessage.RCodeRefused, 0, false},
		{"closed refuses TXT", closed, "open.test.", dnsmessage.TypeTXT, dnsmessage.RCodeRefused, 0, false},
		{"AAAA is NODATA", closed, "ok.example.com.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, 0, false},
		{"AXFR refused", closed, "ok.example.com.", dnsmessage.TypeAXFR, dnsmessage.RCodeRefused, 0, false},
		{"open forwards", open, "open.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 1, true},
		{"open AAAA is NODATA", open, "open.test.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := len(w.up.queries())
			m := parse(t, exchange(t, tc.srv, newQuery(77, tc.qname, tc.qtype, 1232), false))
			if m.ID != 77 || m.RCode != tc.rcode || len(m.Answers) != tc.answers {
				t.Errorf("reply ID %d rcode %v answers %d, want 77 %v %d", m.ID, m.RCode, len(m.Answers), tc.rcode, tc.answers)
			}
			if len(m.Questions) != 1 || normName(m.Questions[0].Name.String()) != normName(tc.qname) {
				t.Errorf("question not echoed: %+v", m.Questions)
			}
			if forwarded := len(w.up.queries()) > n; forwarded != tc.forwarded {
				t.Errorf("forwarded %v, want %v", forwarded, tc.forwarded)
			}
		})
	}
	if _, learns, _ := w.l.snapshot(); len(learns) != 0 {
		t.Errorf("learned %+v for names not in Domains", learns)
	}
}

// TestMalformed: bad queries get FORMERR or NOTIMP with their ID, garbage
// gets nothing (UDP) or a closed connection (TCP), and nothing is forwarded.
func TestMalformed(t *testing.T) {
	w := newWorld(t, Options{})
	srv := w.add(t, "sb", Rules{Open: true})

	two := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 5})
	must(two.StartQuestions())
	must(two.Question(dnsmessage.Question{Name: mustName("a.test."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}))
	must(two.Question(dnsmessage.Question{Name: mustName("b.test."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}))
	twoQ, err := two.Finish()
	must(err)
	notify := newQuery(5, "a.test.", dnsmessage.TypeSOA, 0)
	notify[2] |= 4 << 3 // opcode NOTIFY
	for _, tcp := range []bool{false, true} {
		for _, tc := range []struct {
			q  []byte
			rc dnsmessage.RCode
		}{{twoQ, dnsmessage.RCodeFormatError}, {notify, dnsmessage.RCodeNotImplemented}} {
			m := parse(t, exchange(t, srv, tc.q, tcp))
			if m.ID != 5 || m.RCode != tc.rc {
				t.Errorf("tcp=%v: reply ID %d rcode %v, want 5 %v", tcp, m.ID, m.RCode, tc.rc)
			}
		}
	}

	// UDP: garbage is dropped; the next query on the socket is answered,
	// and its reply is the first to arrive.
	c, err := net.Dial("udp", srv.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	response := newQuery(99, "a.test.", dnsmessage.TypeA, 0)
	response[2] |= 0x80 // QR: a response is never answered
	for _, g := range [][]byte{{1, 2, 3}, response} {
		if _, err := c.Write(g); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Write(newQuery(6, "a.test.", dnsmessage.TypeAAAA, 0)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if m := parse(t, buf[:n]); m.ID != 6 {
		t.Errorf("first reply has ID %d, want 6", m.ID)
	}

	// TCP: garbage closes the connection.
	tc, err := net.Dial("tcp", srv.String())
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	_ = tc.SetDeadline(time.Now().Add(ioTimeout))
	if err := writeTCP(tc, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if _, err := readTCP(tc); err == nil {
		t.Error("TCP connection still answers after garbage")
	}
	if q := w.up.queries(); len(q) != 0 {
		t.Errorf("forwarded %+v", q)
	}
}

// TestTCPPipelined: several queries on one connection, each answered.
func TestTCPPipelined(t *testing.T) {
	w := newWorld(t, Options{})
	for _, n := range []string{"a", "b", "c"} {
		w.up.set(n+".example.com", a(n+".example.com.", 300, "192.0.2.10"))
	}
	srv := w.add(t, "sb", Rules{Domains: []string{"*.example.com"}})
	c, err := net.Dial("tcp", srv.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	for i, n := range []string{"a", "b", "c"} {
		if err := writeTCP(c, newQuery(uint16(100+i), n+".example.com.", dnsmessage.TypeA, 0)); err != nil {
			t.Fatal(err)
		}
	}
	var ids []uint16
	for range 3 {
		resp, err := readTCP(c)
		if err != nil {
			t.Fatal(err)
		}
		m := parse(t, resp)
		if len(answerAddrs(m)) != 1 {
			t.Errorf("reply %d has answers %v", m.ID, m.Answers)
		}
		ids = append(ids, m.ID)
	}
	slices.Sort(ids)
	if !slices.Equal(ids, []uint16{100, 101, 102}) {
		t.Errorf("reply IDs %v", ids)
	}
}

// TestTruncatedRetry: a truncated UDP upstream reply is fetched again over
// TCP, and the UDP client gets the whole answer.
func TestTruncatedRetry(t *testing.T) {
	w := newWorld(t, Options{})
	w.up.set("big.example.com", a("big.example.com.", 300, "192.0.2.20"), a("big.example.com.", 300, "192.0.2.21"))
	w.up.with(func(u *testUpstream) { u.truncUDP["big.example.com"] = true })
	srv := w.add(t, "sb", Rules{Domains: []string{"big.example.com"}})
	m := parse(t, exchange(t, srv, newQuery(3, "big.example.com.", dnsmessage.TypeA, 0), false))
	if m.Truncated || !slices.Equal(answerAddrs(m), addrs("192.0.2.20", "192.0.2.21")) {
		t.Errorf("reply TC=%v answers %v", m.Truncated, answerAddrs(m))
	}
	q := w.up.queries()
	if len(q) != 2 || q[0].tcp || !q[1].tcp {
		t.Errorf("upstream saw %+v, want UDP then TCP", q)
	}
	if q[0].id == 3 && q[1].id == 3 {
		t.Errorf("upstream saw the client's ID on both attempts")
	}
	if _, learns, _ := w.l.snapshot(); len(learns) != 1 || len(learns[0].addrs) != 2 {
		t.Errorf("learned %+v", learns)
	}
}

// TestFailover: a dead first upstream (closed port) is skipped, and an
// upstream answering SERVFAIL too.
func TestFailover(t *testing.T) {
	failing := newTestUpstream(t)
	failing.with(func(u *testUpstream) { u.rcode = dnsmessage.RCodeServerFailure })
	dead := netip.AddrPortFrom(loopback(), 53) // nothing listens there
	live := newTestUpstream(t)
	live.set("x.example.com", a("x.example.com.", 300, "192.0.2.30"))
	w := newWorld(t, Options{Upstreams: []netip.AddrPort{dead, failing.addr, live.addr}})
	srv := w.add(t, "sb", Rules{Domains: []string{"x.example.com"}})
	for _, tcp := range []bool{false, true} {
		m := parse(t, exchange(t, srv, newQuery(4, "x.example.com.", dnsmessage.TypeA, 0), tcp))
		if m.RCode != dnsmessage.RCodeSuccess || !slices.Equal(answerAddrs(m), addrs("192.0.2.30")) {
			t.Errorf("tcp=%v: rcode %v answers %v", tcp, m.RCode, answerAddrs(m))
		}
	}
	if len(failing.queries()) != 2 {
		t.Errorf("SERVFAIL upstream saw %d queries, want 2", len(failing.queries()))
	}

	// Every upstream failing: SERVFAIL, the upstream's own.
	w2 := newWorld(t, Options{Upstreams: []netip.AddrPort{dead, failing.addr}})
	srv2 := w2.add(t, "sb", Rules{Domains: []string{"x.example.com"}})
	if m := parse(t, exchange(t, srv2, newQuery(4, "x.example.com.", dnsmessage.TypeA, 0), false)); m.RCode != dnsmessage.RCodeServerFailure {
		t.Errorf("all failing: rcode %v", m.RCode)
	}
	w3 := newWorld(t, Options{Upstreams: []netip.AddrPort{dead}})
	srv3 := w3.add(t, "sb", Rules{Domains: []string{"x.example.com"}})
	if m := parse(t, exchange(t, srv3, newQuery(4, "x.example.com.", dnsmessage.TypeA, 0), false)); m.RCode != dnsmessage.RCodeServerFailure {
		t.Errorf("all dead: rcode %v", m.RCode)
	}
}

// TestSetRulesAndRemove: removing a domain forgets the addresses only it
// justified, shortens those another name still justifies for less long,
// and Remove forgets everything and frees the address.
func TestSetRulesAndRemove(t *testing.T) {
	w := newWorld(t, Options{MinTTL: time.Second, MaxTTL: time.Hour})
	w.up.set("a.example.com", a("a.example.com.", 600, "192.0.2.1"), a("a.example.com.", 600, "192.0.2.2"))
	w.up.set("b.example.org", a("b.example.org.", 300, "192.0.2.2"), a("b.example.org.", 300, "192.0.2.3"))
	ip := loopback()
	if err := w.r.Add("sb", ip, Rules{Domains: []string{"a.example.com", "b.example.org"}}); err != nil {
		t.Fatal(err)
	}
	srv := netip.AddrPortFrom(ip, DefaultPort)
	for _, n := range []string{"a.example.com.", "b.example.org."} {
		if m := parse(t, exchange(t, srv, newQuery(1, n, dnsmessage.TypeA, 0), false)); m.RCode != dnsmessage.RCodeSuccess {
			t.Fatalf("%s: %v", n, m.RCode)
		}
	}
	// b's answer must not cut short what a's opened: 192.0.2.2 is learned
	// again with a's later deadline, 192.0.2.3 with b's own.
	_, learns, _ := w.l.snapshot()
	if len(learns) != 3 {
		t.Fatalf("learns %+v, want 3 calls", learns)
	}
	aUntil := learns[0].until
	if !slices.Equal(learns[0].addrs, addrs("192.0.2.1", "192.0.2.2")) ||
		!slices.Equal(learns[1].addrs, addrs("192.0.2.2")) || !learns[1].until.Equal(aUntil) ||
		!slices.Equal(learns[2].addrs, addrs("192.0.2.3")) || !learns[2].until.Before(aUntil) {
		t.Errorf("learns %+v", learns)
	}

	if err := w.r.SetRules("sb", Rules{Domains: []string{"b.example.org"}}); err != nil {
		t.Fatal(err)
	}
	// 192.0.2.1 is closed; 192.0.2.2 stays open, but only until b's answer
	// expires, like 192.0.2.3.
	bUntil := learns[2].until
	open := w.l.openState()
	if _, ok := open[netip.MustParseAddr("192.0.2.1")]; ok || len(open) != 2 ||
		!open[netip.MustParseAddr("192.0.2.2")].Equal(bUntil) || !open[netip.MustParseAddr("192.0.2.3")].Equal(bUntil) {
		t.Errorf("open after SetRules %v, want 192.0.2.2 and .3 until %v", open, bUntil)
	}
	// The removed name is refused now; the kept one still answers.
	if m := parse(t, exchange(t, srv, newQuery(1, "a.example.com.", dnsmessage.TypeA, 0), false)); m.RCode != dnsmessage.RCodeRefused {
		t.Errorf("a after SetRules: %v", m.RCode)
	}
	if err := w.r.SetRules("nope", Rules{}); !errors.Is(err, ErrUnknown) {
		t.Errorf("SetRules of unknown key: %v", err)
	}
	if err := w.r.SetRules("sb", Rules{Domains: []string{"*"}}); !errors.Is(err, ErrBadDomain) {
		t.Errorf("SetRules with a bad domain: %v", err)
	}

	if err := w.r.Remove("sb"); err != nil {
		t.Fatal(err)
	}
	_, _, forgets := w.l.snapshot()
	if open := w.l.openState(); len(open) != 0 || !slices.Equal(forgets[len(forgets)-1], addrs("192.0.2.2", "192.0.2.3")) {
		t.Errorf("after Remove: open %v, forgets %v", open, forgets)
	}
	if _, err := tryExchange(srv, newQuery(1, "b.example.org.", dnsmessage.TypeA, 0), true); err == nil {
		t.Error("TCP still served after Remove")
	}
	if err := w.r.Remove("sb"); err != nil {
		t.Errorf("second Remove: %v", err)
	}
	// The address is free again.
	if err := w.r.Add("sb", ip, Rules{Domains: []string{"b.example.org"}}); err != nil {
		t.Fatalf("Add after Remove: %v", err)
	}
	if m := parse(t, exchange(t, srv, newQuery(1, "b.example.org.", dnsmessage.TypeA, 0), false)); m.RCode != dnsmessage.RCodeSuccess {
		t.Errorf("after re-Add: %v", m.RCode)
	}
}

// TestLearnError: an answer whose addresses cannot be opened is SERVFAIL.
func TestLearnError(t *testing.T) {
	w := newWorld(t, Options{})
	w.l.err = errors.New("map full")
	w.up.set("x.example.com", a("x.example.com.", 300, "192.0.2.40"))
	srv := w.add(t, "sb", Rules{Domains: []string{"x.example.com"}})
	for _, tcp := range []bool{false, true} {
		m := parse(t, exchange(t, srv, newQuery(8, "x.example.com.", dnsmessage.TypeA, 0), tcp))
		if m.RCode != dnsmessage.RCodeServerFailure || len(m.Answers) != 0 || m.ID != 8 {
			t.Errorf("tcp=%v: rcode %v answers %v", tcp, m.RCode, m.Answers)
		}
	}
	// Nothing was recorded, so Remove has nothing to forget.
	if err := w.r.Remove("sb"); err != nil {
		t.Fatal(err)
	}
	if _, _, forgets := w.l.snapshot(); len(forgets) != 0 {
		t.Errorf("forgets %v", forgets)
	}
}

// TestMaxInflight: a query beyond the limit is SERVFAIL at once.
func TestMaxInflight(t *testing.T) {
	w := newWorld(t, Options{MaxInflight: 1})
	w.up.set("slow.example.com", a("slow.example.com.", 300, "192.0.2.50"))
	hold, arrived := make(chan struct{}), make(chan struct{}, 1)
	w.up.with(func(u *testUpstream) { u.holdName, u.hold, u.arrived = "slow.example.com", hold, arrived })
	srv := w.add(t, "sb", Rules{Domains: []string{"*.example.com"}})

	done := make(chan dnsmessage.RCode, 1)
	go func() {
		resp, err := tryExchange(srv, newQuery(1, "slow.example.com.", dnsmessage.TypeA, 0), false)
		var m dnsmessage.Message
		if err != nil || m.Unpack(resp) != nil {
			done <- 255
			return
		}
		done <- m.RCode
	}()
	select {
	case <-arrived:
	case <-time.After(ioTimeout):
		t.Fatal("first query never reached the upstream")
	}
	for _, tcp := range []bool{false, true} {
		if m := parse(t, exchange(t, srv, newQuery(2, "fast.example.com.", dnsmessage.TypeA, 0), tcp)); m.RCode != dnsmessage.RCodeServerFailure || m.ID != 2 {
			t.Errorf("tcp=%v: over the limit: rcode %v", tcp, m.RCode)
		}
	}
	w.up.with(func(u *testUpstream) { close(u.hold); u.hold = nil })
	if rc := <-done; rc != dnsmessage.RCodeSuccess {
		t.Errorf("held query: rcode %v", rc)
	}
}

func TestAddErrors(t *testing.T) {
	w := newWorld(t, Options{})
	ip := loopback()
	if err := w.r.Add("sb", ip, Rules{}); err != nil {
		t.Fatal(err)
	}
	if err := w.r.Add("sb", loopback(), Rules{}); !errors.Is(err, ErrExists) {
		t.Errorf("second Add of a key: %v", err)
	}
	err := w.r.Add("other", ip, Rules{})
	if err == nil || !strings.Contains(err.Error(), ip.String()+":53") || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("Add on a taken address: %v", err)
	}
	if err := w.r.Add("bad", loopback(), Rules{Domains: []string{"*.com"}}); !errors.Is(err, ErrBadDomain) {
		t.Errorf("Add with a bad domain: %v", err)
	}
	// IP_FREEBIND: an address this host does not have (TEST-NET-2) binds.
	if err := w.r.Add("freebind", netip.MustParseAddr("198.51.100.53"), Rules{}); err != nil {
		t.Errorf("Add on a foreign address: %v", err)
	}
	if err := w.r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.r.Add("late", loopback(), Rules{}); !errors.Is(err, ErrClosed) {
		t.Errorf("Add after Close: %v", err)
	}
}

func TestNewErrors(t *testing.T) {
	up := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:53")}
	l := &recLearner{}
	for _, o := range []Options{
		{Learner: l},
		{Upstreams: up},
		{Upstreams: []netip.AddrPort{{}}, Learner: l},
		{Upstreams: up, Learner: l, MinTTL: time.Hour, MaxTTL: time.Minute},
		{Upstreams: up, Learner: l, MaxInflight: -1},
		{Upstreams: up, Learner: l, QueryRate: -1},
		{Upstreams: up, Learner: l, QueryRate: math.Inf(1)},
		{Upstreams: up, Learner: l, QueryRate: math.NaN()},
		{Upstreams: up, Learner: l, QueryBurst: -1},
	} {
		if r, err := New(o); !errors.Is(err, ErrBadOptions) {
			t.Errorf("New(%+v): %v", o, err)
			if r != nil {
				r.Close()
			}
		}
	}
}

func TestUpstreamsFromResolvConf(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, text string
		want       []string
	}{
		{"mixed", "# comment\nsearch example.com\nnameserver 192.0.2.1\nnameserver  2001:db8::1 \nnameserver bogus\noptions ndots:2\nnameserver\t198.51.100.1 # trailing\n",
			[]string{"192.0.2.1:53", "[2001:db8::1]:53", "198.51.100.1:53"}},
		{"none", "search example.com\n", nil},
		{"empty", "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name)
			if err := os.WriteFile(p, []byte(tc.text), 0o644); err != nil {
				t.Fatal(err)
			}
			got, err := UpstreamsFromResolvConf(p)
			if tc.want == nil {
				if err == nil {
					t.Errorf("got %v, want an error", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var s []string
			for _, g := range got {
				s = append(s, g.String())
			}
			if !slices.Equal(s, tc.want) {
				t.Errorf("got %v, want %v", s, tc.want)
			}
		})
	}
	if _, err := UpstreamsFromResolvConf(filepath.Join(dir, "missing")); err == nil {
		t.Error("missing file: no error")
	}
}

// TestConcurrentRulesChange: queries over UDP and TCP race SetRules. Once
// the rules allow nothing and the queries are done, nothing may be open:
// an answer that raced the change must not have opened its addresses.
func TestConcurrentRulesChange(t *testing.T) {
	w := newWorld(t, Options{})
	names := []string{"a.example.com", "b.example.com", "c.example.org"}
	for i, n := range names {
		w.up.set(n, a(n+".", 300, netip.AddrFrom4([4]byte{192, 0, 2, byte(i + 1)}).String()), a(n+".", 300, "192.0.2.100"))
	}
	srv := w.add(t, "sb", Rules{Domains: []string{"*.example.com", "c.example.org"}})

	done := make(chan struct{})
	errs := make(chan error, 8)
	for g := range 6 {
		go func() {
			for i := range 15 {
				n := names[(g+i)%len(names)]
				if _, err := tryExchange(srv, newQuery(uint16(i), n+".", dnsmessage.TypeA, 0), g%2 == 0); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	go func() {
		defer close(done)
		for i := range 30 {
			rules := Rules{Domains: []string{"*.example.com"}}
			if i%2 == 1 {
				rules = Rules{Domains: []string{"c.example.org", "a.example.com"}, Open: true}
			}
			if err := w.r.SetRules("sb", rules); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for range 6 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	<-done
	if err := w.r.SetRules("sb", Rules{}); err != nil {
		t.Fatal(err)
	}
	if open := w.l.openState(); len(open) != 0 {
		t.Errorf("open with no rules: %v", open)
	}
	if _, learns, _ := w.l.snapshot(); len(learns) == 0 {
		t.Error("nothing was ever learned")
	}
}
