package dnstest

import (
	"net/netip"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

func TestAnswer(t *testing.T) {
	lookup := func(name string) (netip.Addr, bool) {
		if name == "known.test" {
			return netip.MustParseAddr("192.0.2.7"), true
		}
		return netip.Addr{}, false
	}
	for _, tc := range []struct {
		name  string
		typ   dnsmessage.Type
		rcode dnsmessage.RCode
		addrs int
	}{
		{"KNOWN.test.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 1},
		{"known.test.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, 0},
		{"unknown.test.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0},
	} {
		q := dnsmessage.Message{Header: dnsmessage.Header{ID: 7},
			Questions: []dnsmessage.Question{{Name: dnsmessage.MustNewName(tc.name), Type: tc.typ, Class: dnsmessage.ClassINET}}}
		b, _ := q.Pack()
		out, ok := Answer(b, lookup, 30)
		if !ok {
			t.Fatalf("%s: no answer", tc.name)
		}
		var m dnsmessage.Message
		if err := m.Unpack(out); err != nil {
			t.Fatal(err)
		}
		if m.ID != 7 || !m.Response || m.RCode != tc.rcode || len(m.Answers) != tc.addrs {
			t.Errorf("%s %v: %+v", tc.name, tc.typ, m)
		}
	}
	if _, ok := Answer([]byte{1, 2, 3}, lookup, 30); ok {
		t.Error("garbage answered")
	}
}
