package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// fuzzUpstream answers with what the fuzzer chose: an error, raw bytes,
// or the query's own header and question followed by ancount records made
// of arbitrary bytes, which is what reaches the answer parsers.
type fuzzUpstream struct {
	mode    byte
	ancount uint16
	tail    []byte
	calls   int
}

func (f *fuzzUpstream) exchange(_ context.Context, q []byte, _ dnsmessage.Question, _ bool) ([]byte, error) {
	f.calls++
	switch f.mode % 3 {
	case 0:
		return nil, errors.New("upstream down")
	case 1:
		return slices.Clone(f.tail), nil
	}
	end, err := skipName(q, headerLen)
	if err != nil || end+4 > len(q) {
		return nil, errors.New("query without a question reached the upstream")
	}
	resp := slices.Clone(q[:end+4])
	resp[2] |= 0x80 // QR
	binary.BigEndian.PutUint16(resp[4:], 1)
	binary.BigEndian.PutUint16(resp[6:], f.ancount)
	binary.BigEndian.PutUint16(resp[8:], 0)
	binary.BigEndian.PutUint16(resp[10:], 0)
	return append(resp, f.tail...), nil
}

// fuzzLearner records what was opened, and fails when told to.
type fuzzLearner struct {
	fail   bool
	opened map[netip.Addr]bool
}

func (l *fuzzLearner) Learn(_ string, addrs []netip.Addr, _ time.Time) error {
	if l.fail {
		return errors.New("map full")
	}
	for _, a := range addrs {
		l.opened[a] = true
	}
	return nil
}

func (l *fuzzLearner) Forget(string, []netip.Addr) error { return nil }

// FuzzHandleQuery feeds arbitrary queries, and arbitrary upstream replies,
// to the query handler. Besides not panicking, it checks the promises:
// a reply echoes the query's ID and is a response, a name that is not
// allowed in a closed sandbox never reaches the upstream, and every address
// on the question's chain in a successful reply was opened first.
func FuzzHandleQuery(f *testing.F) {
	answerTail := func(name string, rrs ...dnsmessage.Resource) []byte {
		r := replyWith(name, rrs...)
		end, _ := skipName(r, headerLen)
		return r[end+4:]
	}
	chain := answerTail("www.example.com.", cname("www.example.com.", 300, "cdn.other."), a("cdn.other.", 60, "192.0.2.1"), a("evil.", 60, "203.0.113.1"))
	q := newQuery(0x1234, "www.example.com.", dnsmessage.TypeA, 0)
	f.Add(q, byte(2), uint16(3), chain)
	f.Add(newQuery(1, "www.example.com.", dnsmessage.TypeA, 4096), byte(2+8), uint16(3), chain)
	f.Add(newQuery(1, "a.test.", dnsmessage.TypeA, 0), byte(2+4), uint16(1), answerTail("a.test.", a("a.test.", 1, "192.0.2.2")))
	f.Add(newQuery(1, "www.example.com.", dnsmessage.TypeAAAA, 0), byte(0), uint16(0), []byte{})
	f.Add(newQuery(1, "not.allowed.", dnsmessage.TypeA, 0), byte(2), uint16(0), []byte{})
	f.Add(newQuery(1, "not.allowed.", dnsmessage.TypeA, 0), byte(1+8), uint16(0), replyWith("not.allowed."))
	f.Add(q, byte(1), uint16(0), []byte{0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0})
	f.Add(q, byte(2), uint16(60000), chain[:7])
	f.Add([]byte{1, 2, 3}, byte(0), uint16(0), []byte{})
	f.Add([]byte("\x00\x01\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01"), byte(0), uint16(0), []byte{})
	f.Fuzz(func(t *testing.T, q []byte, mode byte, ancount uint16, tail []byte) {
		up := &fuzzUpstream{mode: mode, ancount: ancount, tail: tail}
		l := &fuzzLearner{fail: mode&4 != 0, opened: map[netip.Addr]bool{}}
		rules := Rules{Domains: []string{"*.example.com", "a.test"}, Open: mode&8 != 0}
		m, err := compile(rules)
		if err != nil {
			t.Fatal(err)
		}
		h := &handler{key: "k", up: up, learner: l, minTTL: time.Second, maxTTL: time.Hour, log: discard(),
			m: m, book: newBook(maxNames, maxPairs)}
		resp := h.handle(context.Background(), slices.Clone(q), mode&16 != 0)
		pq, rc, dropped := parseQuery(q)
		if resp == nil {
			if !dropped {
				t.Fatalf("no reply to a query (rcode %v)", rc)
			}
			return
		}
		if len(resp) < headerLen || resp[0] != q[0] || resp[1] != q[1] || resp[2]&0x80 == 0 {
			t.Fatalf("reply %x does not answer query %x", resp, q)
		}
		allowed := rc == dnsmessage.RCodeSuccess && rules.Match(pq.name)
		if !allowed && !rules.Open && up.calls > 0 {
			t.Fatalf("%q forwarded though not allowed", pq.name)
		}
		if allowed && rcode(resp) == dnsmessage.RCodeSuccess {
			got, _, err := chainAddrs(resp, pq.name)
			if err == nil {
				for _, a := range got {
					if !l.opened[a] {
						t.Fatalf("reply hands out %v without opening it", a)
					}
				}
			}
		}
	})
}
