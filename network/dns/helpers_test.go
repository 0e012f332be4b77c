package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// ioTimeout bounds every wait in the tests; it is a safety net against a
// hang, never an assertion.
const ioTimeout = 5 * time.Second

var ipSeq atomic.Uint32

// loopback returns a 127.0.0.0/8 address no other test (of this process, or
// likely of another test binary running at the same time) uses, so that
// every test can listen on port 53.
func loopback() netip.Addr {
	n := ipSeq.Add(1)
	return netip.AddrFrom4([4]byte{127, byte(100 + os.Getpid()%100), byte(n >> 8), byte(n)})
}

// seen is one query the test upstream received.
type seen struct {
	name string
	typ  dnsmessage.Type
	tcp  bool
	id   uint16
}

// testUpstream is an authoritative-looking DNS server on loopback, UDP and
// TCP on one address, answering from a table.
type testUpstream struct {
	addr netip.AddrPort

	mu sync.Mutex
	// answers maps a question name (normName form) to the answer section
	// for any query type.
	answers map[string][]dnsmessage.Resource
	// truncUDP lists names answered over UDP with TC set and no records.
	truncUDP map[string]bool
	// rcode, if not success, is every reply's RCODE.
	rcode dnsmessage.RCode
	// hold, if set, is waited on before answering a query for holdName;
	// arrived is signalled first.
	holdName string
	hold     chan struct{}
	arrived  chan struct{}
	seen     []seen
}

func newTestUpstream(t testing.TB) *testUpstream {
	t.Helper()
	u := &testUpstream{
		addr:     netip.AddrPortFrom(loopback(), 53),
		answers:  map[string][]dnsmessage.Resource{},
		truncUDP: map[string]bool{},
	}
	pc, err := net.ListenPacket("udp4", u.addr.String())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp4", u.addr.String())
	if err != nil {
		pc.Close()
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		pc.Close()
		ln.Close()
		u.mu.Lock()
		if u.hold != nil {
			select {
			case <-u.hold:
			default:
				close(u.hold)
			}
		}
		u.mu.Unlock()
		wg.Wait()
	})
	wg.Add(2)
	go func() {
		defer wg.Done()
		buf := make([]byte, 1<<16)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			q := append([]byte(nil), buf[:n]...)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if resp := u.answer(q, false); resp != nil {
					_, _ = pc.WriteTo(resp, from)
				}
			}()
		}
	}()
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(ioTimeout))
				q, err := readTCP(c)
				if err != nil {
					return
				}
				if resp := u.answer(q, true); resp != nil {
					_ = writeTCP(c, resp)
				}
			}()
		}
	}()
	return u
}

// set makes the upstream answer name with rrs.
func (u *testUpstream) set(name string, rrs ...dnsmessage.Resource) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.answers[name] = rrs
}

// with changes the upstream's behaviour under its lock.
func (u *testUpstream) with(f func(u *testUpstream)) {
	u.mu.Lock()
	defer u.mu.Unlock()
	f(u)
}

// queries returns what the upstream has received so far.
func (u *testUpstream) queries() []seen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.seen)
}

func (u *testUpstream) answer(q []byte, tcp bool) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(q)
	if err != nil {
		return nil
	}
	qs, err := p.AllQuestions()
	if err != nil || len(qs) != 1 {
		return nil
	}
	name := normName(qs[0].Name.String())
	u.mu.Lock()
	u.seen = append(u.seen, seen{name: name, typ: qs[0].Type, tcp: tcp, id: h.ID})
	rrs, trunc, rc := u.answers[name], u.truncUDP[name] && !tcp, u.rcode
	var hold, arrived chan struct{}
	if name == u.holdName {
		hold, arrived = u.hold, u.arrived
	}
	u.mu.Unlock()
	if hold != nil {
		arrived <- struct{}{}
		<-hold
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: h.ID, Response: true, RecursionDesired: h.RecursionDesired,
		RecursionAvailable: true, Truncated: trunc, RCode: rc})
	must(b.StartQuestions())
	must(b.Question(qs[0]))
	must(b.StartAnswers())
	if !trunc && rc == dnsmessage.RCodeSuccess {
		for _, r := range rrs {
			switch body := r.Body.(type) {
			case *dnsmessage.AResource:
				must(b.AResource(r.Header, *body))
			case *dnsmessage.CNAMEResource:
				must(b.CNAMEResource(r.Header, *body))
			default:
				panic(fmt.Sprintf("test upstream: unsupported %T", body))
			}
		}
	}
	msg, err := b.Finish()
	must(err)
	return msg
}

func must(err error) {
	if err != nil {
		panic(err)
	}
}

func mustName(s string) dnsmessage.Name {
	n, err := dnsmessage.NewName(s)
	must(err)
	return n
}

// a and cname build answer records.
func a(owner string, ttl uint32, addr string) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: mustName(owner), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: ttl},
		Body:   &dnsmessage.AResource{A: netip.MustParseAddr(addr).As4()},
	}
}

func cname(owner string, ttl uint32, target string) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: mustName(owner), Type: dnsmessage.TypeCNAME, Class: dnsmessage.ClassINET, TTL: ttl},
		Body:   &dnsmessage.CNAMEResource{CNAME: mustName(target)},
	}
}

func readTCP(c io.Reader) ([]byte, error) {
	var lb [2]byte
	if _, err := io.ReadFull(c, lb[:]); err != nil {
		return nil, err
	}
	m := make([]byte, binary.BigEndian.Uint16(lb[:]))
	_, err := io.ReadFull(c, m)
	return m, err
}

func writeTCP(c io.Writer, m []byte) error {
	_, err := c.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...))
	return err
}

// learnCall is one Learner.Learn call.
type learnCall struct {
	key   string
	addrs []netip.Addr
	until time.Time
}

// recLearner records every call, in order, with the test's own events.
type recLearner struct {
	mu      sync.Mutex
	events  []string
	learns  []learnCall
	forgets [][]netip.Addr
	// open models network/policy's state: Learn keeps the later deadline,
	// Forget deletes.
	open map[netip.Addr]time.Time
	err  error
	// pause is slept inside Learn, between "learn" and "learned", so that
	// an implementation answering before Learn returns shows up as "reply"
	// between the two.
	pause time.Duration
}

func (l *recLearner) event(e string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, e)
}

func (l *recLearner) Learn(key string, addrs []netip.Addr, until time.Time) error {
	l.event("learn")
	time.Sleep(l.pause)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.events = append(l.events, "learned")
	l.learns = append(l.learns, learnCall{key, slices.Clone(addrs), until})
	if l.err != nil {
		return l.err
	}
	if l.open == nil {
		l.open = map[netip.Addr]time.Time{}
	}
	for _, a := range addrs {
		if until.After(l.open[a]) {
			l.open[a] = until
		}
	}
	return nil
}

func (l *recLearner) Forget(key string, addrs []netip.Addr) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.forgets = append(l.forgets, slices.Clone(addrs))
	for _, a := range addrs {
		delete(l.open, a)
	}
	return nil
}

// openState returns the modelled open addresses and their deadlines.
func (l *recLearner) openState() map[netip.Addr]time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	m := make(map[netip.Addr]time.Time, len(l.open))
	for a, u := range l.open {
		m[a] = u
	}
	return m
}

func (l *recLearner) snapshot() (events []string, learns []learnCall, forgets [][]netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.events), slices.Clone(l.learns), slices.Clone(l.forgets)
}

// newQuery builds a query with one question (and EDNS0 when edns > 0).
func newQuery(id uint16, name string, typ dnsmessage.Type, edns uint16) []byte {
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	must(b.StartQuestions())
	must(b.Question(dnsmessage.Question{Name: mustName(name), Type: typ, Class: dnsmessage.ClassINET}))
	if edns > 0 {
		var rh dnsmessage.ResourceHeader
		must(rh.SetEDNS0(int(edns), dnsmessage.RCodeSuccess, false))
		must(b.StartAdditionals())
		must(b.OPTResource(rh, dnsmessage.OPTResource{}))
	}
	m, err := b.Finish()
	must(err)
	return m
}

// exchange sends raw query bytes to a served sandbox address and returns
// the raw reply.
func exchange(t testing.TB, server netip.AddrPort, q []byte, tcp bool) []byte {
	t.Helper()
	resp, err := tryExchange(server, q, tcp)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func tryExchange(server netip.AddrPort, q []byte, tcp bool) ([]byte, error) {
	network := "udp"
	if tcp {
		network = "tcp"
	}
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, network, server.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if tcp {
		if err := writeTCP(c, q); err != nil {
			return nil, err
		}
		return readTCP(c)
	}
	if _, err := c.Write(q); err != nil {
		return nil, err
	}
	buf := make([]byte, 1<<16)
	n, err := c.Read(buf)
	if err != nil {
		return nil, err
	}
	return buf[:n], nil
}

// parse unpacks a reply, failing the test if it is not one.
func parse(t testing.TB, resp []byte) dnsmessage.Message {
	t.Helper()
	var m dnsmessage.Message
	if err := m.Unpack(resp); err != nil {
		t.Fatalf("reply does not parse: %v", err)
	}
	if !m.Response {
		t.Fatal("reply is not a response")
	}
	return m
}

// answerAddrs lists the A records of a reply.
func answerAddrs(m dnsmessage.Message) []netip.Addr {
	var as []netip.Addr
	for _, r := range m.Answers {
		if b, ok := r.Body.(*dnsmessage.AResource); ok {
			as = append(as, netip.AddrFrom4(b.A))
		}
	}
	return as
}

func addrs(ss ...string) []netip.Addr {
	as := make([]netip.Addr, len(ss))
	for i, s := range ss {
		as[i] = netip.MustParseAddr(s)
	}
	return as
}

// world is a Resolver with one test upstream and a recording Learner.
type world struct {
	r  *Resolver
	up *testUpstream
	l  *recLearner
}

func newWorld(t testing.TB, opts Options) *world {
	t.Helper()
	w := &world{up: newTestUpstream(t), l: &recLearner{}}
	if opts.Upstreams == nil {
		opts.Upstreams = []netip.AddrPort{w.up.addr}
	}
	opts.Learner = w.l
	opts.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
	if opts.Timeout == 0 {
		opts.Timeout = ioTimeout / 2
	}
	r, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	w.r = r
	t.Cleanup(func() {
		if err := r.Close(); err != nil && !errors.Is(err, ErrClosed) {
			t.Error(err)
		}
	})
	return w
}

// add serves a sandbox on a fresh loopback address and returns where.
func (w *world) add(t testing.TB, key string, rules Rules) netip.AddrPort {
	t.Helper()
	ip := loopback()
	if err := w.r.Add(key, ip, rules); err != nil {
		t.Fatal(err)
	}
	return netip.AddrPortFrom(ip, DefaultPort)
}
