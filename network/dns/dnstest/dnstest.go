// Package dnstest is a small DNS server for tests, in the spirit of
// net/http/httptest: it answers A queries over UDP from a lookup function,
// so that tests of the sandbox resolver, or of whole sandboxes, have an
// upstream to forward to inside a namespace or on loopback.
package dnstest

import (
	"net"
	"net/netip"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

// Lookup gives the address of a name (lower case, no trailing dot), or
// false for a name that does not exist.
type Lookup func(name string) (netip.Addr, bool)

// Serve answers queries on conn until it is closed: A queries for names
// Lookup knows with their address (TTL ttl), other types of known names
// with no records, unknown names with NXDOMAIN. Unparsable datagrams are
// ignored.
func Serve(conn net.PacketConn, lookup Lookup, ttl uint32) {
	buf := make([]byte, 1500)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			return
		}
		if out, ok := Answer(buf[:n], lookup, ttl); ok {
			conn.WriteTo(out, from)
		}
	}
}

// Answer builds Serve's reply to one query.
func Answer(query []byte, lookup Lookup, ttl uint32) ([]byte, bool) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, false
	}
	q, err := p.Question()
	if err != nil {
		return nil, false
	}
	resp := dnsmessage.Message{
		Header: dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true,
			RecursionDesired: h.RecursionDesired, RecursionAvailable: true},
		Questions: []dnsmessage.Question{q},
	}
	addr, known := lookup(strings.TrimSuffix(strings.ToLower(q.Name.String()), "."))
	switch {
	case !known:
		resp.RCode = dnsmessage.RCodeNameError
	case q.Type == dnsmessage.TypeA && addr.Is4():
		resp.Answers = []dnsmessage.Resource{{
			Header: dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET, TTL: ttl},
			Body:   &dnsmessage.AResource{A: addr.As4()},
		}}
	}
	out, err := resp.Pack()
	return out, err == nil
}
