package dns

import (
	"encoding/binary"
	"fmt"
	"slices"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// reply builds an upstream reply to name/A with the given answers.
func replyWith(name string, rrs ...dnsmessage.Resource) []byte {
	m := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: 7, Response: true},
		Questions: []dnsmessage.Question{{Name: mustName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}},
		Answers:   rrs,
	}
	b, err := m.Pack()
	must(err)
	return b
}

func TestChainAddrs(t *testing.T) {
	loop := []dnsmessage.Resource{cname("q.test.", 300, "x.test."), cname("x.test.", 300, "q.test."), a("x.test.", 300, "192.0.2.9")}
	var long []dnsmessage.Resource
	for i := range maxChain + 1 {
		long = append(long, cname(fmt.Sprintf("h%d.test.", i), 300, fmt.Sprintf("h%d.test.", i+1)))
	}
	long = append(long, a(fmt.Sprintf("h%d.test.", maxChain+1), 300, "192.0.2.77"))
	for _, tc := range []struct {
		name  string
		qname string
		rrs   []dnsmessage.Resource
		want  []string
		ttl   uint32
	}{
		{"direct", "q.test", []dnsmessage.Resource{a("q.test.", 300, "192.0.2.1"), a("Q.TEST.", 200, "192.0.2.2")}, []string{"192.0.2.1", "192.0.2.2"}, 200},
		{"duplicates once", "q.test", []dnsmessage.Resource{a("q.test.", 300, "192.0.2.1"), a("q.test.", 300, "192.0.2.1")}, []string{"192.0.2.1"}, 300},
		{"chain", "q.test", []dnsmessage.Resource{
			cname("q.test.", 300, "c1.other."), a("evil.test.", 1, "203.0.113.1"),
			cname("c1.other.", 50, "c2.third."), a("c2.third.", 600, "192.0.2.3"), a("q2.test.", 1, "203.0.113.2"),
		}, []string{"192.0.2.3"}, 50},
		{"chain out of order", "q.test", []dnsmessage.Resource{
			a("c2.third.", 600, "192.0.2.3"), cname("c1.other.", 50, "c2.third."), cname("q.test.", 300, "c1.other."),
		}, []string{"192.0.2.3"}, 50},
		{"unrelated only", "q.test", []dnsmessage.Resource{a("other.test.", 300, "203.0.113.1")}, nil, 0},
		{"loop", "q.test", loop, []string{"192.0.2.9"}, 300},
		{"too long", "h0.test", long, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ttl, err := chainAddrs(replyWith(tc.qname+".", tc.rrs...), tc.qname)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, addrs(tc.want...)) {
				t.Errorf("addrs %v, want %v", got, tc.want)
			}
			if len(got) > 0 && ttl != tc.ttl {
				t.Errorf("ttl %d, want %d", ttl, tc.ttl)
			}
		})
	}
	if _, _, err := chainAddrs([]byte{1, 2, 3}, "q.test"); err == nil {
		t.Error("chainAddrs of garbage: no error")
	}
}

func TestCapTTLs(t *testing.T) {
	msg := replyWith("q.test.", cname("q.test.", 90000, "c.test."), a("c.test.", 10, "192.0.2.1"), a("c.test.", 4000, "192.0.2.2"))
	if err := capTTLs(msg, 3600); err != nil {
		t.Fatal(err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(msg); err != nil {
		t.Fatal(err)
	}
	var ttls []uint32
	for _, r := range m.Answers {
		ttls = append(ttls, r.Header.TTL)
	}
	if want := []uint32{3600, 10, 3600}; !slices.Equal(ttls, want) {
		t.Errorf("TTLs %v, want %v", ttls, want)
	}
	// Every truncation of a valid message is rejected or walked without a
	// panic, never read past its end.
	for i := range msg {
		_ = capTTLs(slices.Clone(msg[:i]), 1)
	}
	bad := slices.Clone(msg)
	binary.BigEndian.PutUint16(bad[6:], 100) // more answers than present
	if err := capTTLs(bad, 1); err == nil {
		t.Error("capTTLs with a wrong ANCOUNT: no error")
	}
}

func TestParseQuery(t *testing.T) {
	multi := func() []byte {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 9})
		must(b.StartQuestions())
		for _, n := range []string{"a.test.", "b.test."} {
			must(b.Question(dnsmessage.Question{Name: mustName(n), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET}))
		}
		m, err := b.Finish()
		must(err)
		return m
	}
	withOpcode := func(op dnsmessage.OpCode) []byte {
		q := newQuery(9, "a.test.", dnsmessage.TypeA, 0)
		q[2] |= byte(op) << 3
		return q
	}
	chaos := func() []byte {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 9})
		must(b.StartQuestions())
		must(b.Question(dnsmessage.Question{Name: mustName("version.bind."), Type: dnsmessage.TypeTXT, Class: dnsmessage.ClassCHAOS}))
		m, err := b.Finish()
		must(err)
		return m
	}
	noQuestion := newQuery(9, "a.test.", dnsmessage.TypeA, 0)[:headerLen]
	binary.BigEndian.PutUint16(noQuestion[4:], 0)
	asResponse := newQuery(9, "a.test.", dnsmessage.TypeA, 0)
	asResponse[2] |= 0x80
	twoOPT := func() []byte {
		q := newQuery(9, "a.test.", dnsmessage.TypeA, 1232)
		opt := q[len(newQuery(9, "a.test.", dnsmessage.TypeA, 0)):]
		q = append(q, opt...)
		binary.BigEndian.PutUint16(q[10:], 2)
		return q
	}
	for _, tc := range []struct {
		name string
		q    []byte
		drop bool
		rc   dnsmessage.RCode
		edns int
	}{
		{"plain", newQuery(9, "A.test.", dnsmessage.TypeA, 0), false, dnsmessage.RCodeSuccess, 0},
		{"edns", newQuery(9, "a.test.", dnsmessage.TypeA, 4096), false, dnsmessage.RCodeSuccess, 4096},
		{"short", []byte{0, 9, 1}, true, 0, 0},
		{"response", asResponse, true, 0, 0},
		{"two questions", multi(), false, dnsmessage.RCodeFormatError, 0},
		{"no question", noQuestion, false, dnsmessage.RCodeFormatError, 0},
		{"cut question", newQuery(9, "a.test.", dnsmessage.TypeA, 0)[:15], false, dnsmessage.RCodeFormatError, 0},
		{"two OPT", twoOPT(), false, dnsmessage.RCodeFormatError, 0},
		{"status opcode", withOpcode(2), false, dnsmessage.RCodeNotImplemented, 0},
		{"update opcode", withOpcode(5), false, dnsmessage.RCodeNotImplemented, 0},
		{"chaos class", chaos(), false, dnsmessage.RCodeNotImplemented, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pq, rc, drop := parseQuery(tc.q)
			if drop != tc.drop || (!drop && rc != tc.rc) {
				t.Fatalf("drop %v rcode %v, want %v %v", drop, rc, tc.drop, tc.rc)
			}
			if drop {
				return
			}
			if tc.rc == dnsmessage.RCodeSuccess && (pq.edns != (tc.edns > 0) || pq.udpSize != tc.edns) {
				t.Errorf("edns %v size %d, want %d", pq.edns, pq.udpSize, tc.edns)
			}
			m := parse(t, pq.reply(rc, false))
			if m.ID != 9 || m.RCode != tc.rc {
				t.Errorf("reply ID %d rcode %v, want 9 %v", m.ID, m.RCode, tc.rc)
			}
			if tc.rc == dnsmessage.RCodeSuccess && pq.name != "a.test" {
				t.Errorf("name %q", pq.name)
			}
		})
	}
}
