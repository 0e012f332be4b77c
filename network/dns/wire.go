package dns

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"slices"

	"golang.org/x/net/dns/dnsmessage"
)

const (
	// headerLen is the fixed DNS header, RFC 1035 §4.1.1.
	headerLen = 12
	// minUDPSize is what every client accepts over UDP, RFC 1035 §4.2.1.
	minUDPSize = 512
	// maxUDPSize is the largest IPv4 UDP payload.
	maxUDPSize = 65507
	// ednsSize is the UDP payload size this resolver advertises in its own
	// replies: the DNS Flag Day 2020 value, which avoids IP fragmentation.
	ednsSize = 1232
	// maxChain bounds the CNAME hops followed from the question name.
	maxChain = 16
	// rcodeMask selects RCODE in the second flags byte, RFC 1035 §4.1.1.
	rcodeMask = 0x0f
	// flagTC is the TC bit in the first flags byte, RFC 1035 §4.1.1.
	flagTC = 0x02
	// typeIXFR is the incremental zone transfer, RFC 1995 §3.
	typeIXFR dnsmessage.Type = 251
)

// query is what the resolver needs of a parsed query.
type query struct {
	hdr dnsmessage.Header
	q   dnsmessage.Question
	// hasQ says q was parsed and belongs in replies.
	hasQ bool
	// edns says the query carried an OPT record, udpSize its payload size.
	edns    bool
	udpSize int
	// name is q.Name normalised (normName).
	name string
}

// parseQuery reads a query. drop is true for input that gets no answer at
// all: no DNS header, or a response (answering those could make two
// resolvers bounce messages forever). Otherwise rc is RCodeSuccess for a
// query this resolver serves, or the error to answer with. The whole
// message must parse, so that only well-formed queries are forwarded.
func parseQuery(b []byte) (pq query, rc dnsmessage.RCode, drop bool) {
	var p dnsmessage.Parser
	h, err := p.Start(b)
	if err != nil || h.Response {
		return pq, 0, true
	}
	pq.hdr = h
	if h.OpCode != 0 {
		return pq, dnsmessage.RCodeNotImplemented, false
	}
	if binary.BigEndian.Uint16(b[4:6]) != 1 {
		return pq, dnsmessage.RCodeFormatError, false
	}
	q, err := p.Question()
	if err != nil {
		return pq, dnsmessage.RCodeFormatError, false
	}
	pq.q, pq.hasQ = q, true
	if p.SkipAllQuestions() != nil || p.SkipAllAnswers() != nil || p.SkipAllAuthorities() != nil {
		return pq, dnsmessage.RCodeFormatError, false
	}
	for {
		ah, err := p.AdditionalHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return pq, dnsmessage.RCodeFormatError, false
		}
		if ah.Type == dnsmessage.TypeOPT {
			if pq.edns { // RFC 6891 §6.1.1: more than one OPT is FORMERR.
				return pq, dnsmessage.RCodeFormatError, false
			}
			pq.edns, pq.udpSize = true, int(ah.Class)
		}
		if err := p.SkipAdditional(); err != nil {
			return pq, dnsmessage.RCodeFormatError, false
		}
	}
	if q.Class != dnsmessage.ClassINET {
		return pq, dnsmessage.RCodeNotImplemented, false
	}
	pq.name = normName(q.Name.String())
	return pq, dnsmessage.RCodeSuccess, false
}

// maxUDP is the largest reply the client takes over UDP.
func (pq *query) maxUDP() int {
	if !pq.edns {
		return minUDPSize
	}
	return min(max(pq.udpSize, minUDPSize), maxUDPSize)
}

// reply builds a local reply carrying no records: the query's ID, opcode,
// RD and CD, its question when it had a readable one, and an OPT record if
// it had one (RFC 6891 §6.1.1). nil only if building fails, which input
// that parsed cannot cause.
func (pq *query) reply(rc dnsmessage.RCode, truncated bool) []byte {
	b := dnsmessage.NewBuilder(make([]byte, 0, 128), dnsmessage.Header{
		ID:                 pq.hdr.ID,
		Response:           true,
		OpCode:             pq.hdr.OpCode,
		Truncated:          truncated,
		RecursionDesired:   pq.hdr.RecursionDesired,
		RecursionAvailable: true,
		CheckingDisabled:   pq.hdr.CheckingDisabled,
		RCode:              rc,
	})
	if pq.hasQ {
		if b.StartQuestions() != nil || b.Question(pq.q) != nil {
			return nil
		}
	}
	if pq.edns {
		var rh dnsmessage.ResourceHeader
		if rh.SetEDNS0(ednsSize, dnsmessage.RCodeSuccess, false) != nil ||
			b.StartAdditionals() != nil || b.OPTResource(rh, dnsmessage.OPTResource{}) != nil {
			return nil
		}
	}
	msg, err := b.Finish()
	if err != nil {
		return nil
	}
	return msg
}

// matchesQuery reports whether resp answers the query with this ID and
// question: a response with the same ID and one question equal to q (name
// compared case-insensitively). An error response without a question is
// accepted too, as some servers send FORMERR or NOTIMP that way.
func matchesQuery(resp []byte, id uint16, q dnsmessage.Question) bool {
	var p dnsmessage.Parser
	h, err := p.Start(resp)
	if err != nil || !h.Response || h.ID != id {
		return false
	}
	switch binary.BigEndian.Uint16(resp[4:6]) {
	case 0:
		return h.RCode != dnsmessage.RCodeSuccess
	case 1:
	default:
		return false
	}
	rq, err := p.Question()
	return err == nil && rq.Type == q.Type && rq.Class == q.Class &&
		normName(rq.Name.String()) == normName(q.Name.String())
}

// rcode is the (non-extended) RCODE of a message at least headerLen long.
func rcode(msg []byte) dnsmessage.RCode {
	return dnsmessage.RCode(msg[3] & rcodeMask)
}

// truncated reports the TC bit of a message at least headerLen long.
func truncated(msg []byte) bool {
	return msg[2]&flagTC != 0
}

// chainAddrs returns the IPv4 addresses an answer gives for qname (in
// normName form): the A records whose owner is qname or a name its CNAME
// chain in the answer section leads to, at most maxChain hops; any other A
// record is ignored, since it was not asked for and a resolver must not
// trust it (RFC 2181 §5.4.1). ttl is the least TTL over the records used.
func chainAddrs(resp []byte, qname string) (addrs []netip.Addr, ttl uint32, err error) {
	type rr struct {
		owner string
		ttl   uint32
		cname string // normName form; "" for an A record
		a     netip.Addr
		isA   bool
	}
	var p dnsmessage.Parser
	if _, err := p.Start(resp); err != nil {
		return nil, 0, err
	}
	if err := p.SkipAllQuestions(); err != nil {
		return nil, 0, err
	}
	var rrs []rr
	for {
		h, err := p.AnswerHeader()
		if errors.Is(err, dnsmessage.ErrSectionDone) {
			break
		}
		if err != nil {
			return nil, 0, err
		}
		switch {
		case h.Class == dnsmessage.ClassINET && h.Type == dnsmessage.TypeA:
			r, err := p.AResource()
			if err != nil {
				return nil, 0, err
			}
			rrs = append(rrs, rr{owner: normName(h.Name.String()), ttl: h.TTL, a: netip.AddrFrom4(r.A), isA: true})
		case h.Class == dnsmessage.ClassINET && h.Type == dnsmessage.TypeCNAME:
			r, err := p.CNAMEResource()
			if err != nil {
				return nil, 0, err
			}
			rrs = append(rrs, rr{owner: normName(h.Name.String()), ttl: h.TTL, cname: normName(r.CNAME.String())})
		default:
			if err := p.SkipAnswer(); err != nil {
				return nil, 0, err
			}
		}
	}
	ttl = ^uint32(0)
	chain := []string{qname}
	for cur := qname; len(chain) <= maxChain; {
		i := slices.IndexFunc(rrs, func(r rr) bool { return !r.isA && r.owner == cur })
		if i < 0 || slices.Contains(chain, rrs[i].cname) {
			break
		}
		ttl = min(ttl, rrs[i].ttl)
		cur = rrs[i].cname
		chain = append(chain, cur)
	}
	for _, r := range rrs {
		if r.isA && slices.Contains(chain, r.owner) {
			ttl = min(ttl, r.ttl)
			if !slices.Contains(addrs, r.a) {
				addrs = append(addrs, r.a)
			}
		}
	}
	return addrs, ttl, nil
}

// errMalformed reports a message capTTLs cannot walk.
var errMalformed = errors.New("dns: malformed message")

// capTTLs lowers, in place, every answer-section TTL above limit to limit.
// It walks the wire format itself because rewriting a message through a
// parser and builder would re-encode every record it does not know.
func capTTLs(msg []byte, limit uint32) error {
	if len(msg) < headerLen {
		return errMalformed
	}
	qd := int(binary.BigEndian.Uint16(msg[4:6]))
	an := int(binary.BigEndian.Uint16(msg[6:8]))
	off := headerLen
	var err error
	for range qd {
		if off, err = skipName(msg, off); err != nil {
			return err
		}
		if off += 4; off > len(msg) { // QTYPE, QCLASS
			return errMalformed
		}
	}
	for range an {
		if off, err = skipName(msg, off); err != nil {
			return err
		}
		if off+10 > len(msg) { // TYPE, CLASS, TTL, RDLENGTH
			return errMalformed
		}
		if binary.BigEndian.Uint32(msg[off+4:]) > limit {
			binary.BigEndian.PutUint32(msg[off+4:], limit)
		}
		if off += 10 + int(binary.BigEndian.Uint16(msg[off+8:])); off > len(msg) {
			return errMalformed
		}
	}
	return nil
}

// skipName returns the offset just past the name at off (RFC 1035 §4.1.4:
// labels ending in the root label or in a compression pointer).
func skipName(msg []byte, off int) (int, error) {
	for {
		if off >= len(msg) {
			return 0, errMalformed
		}
		c := msg[off]
		switch c & 0xc0 {
		case 0x00:
			if c == 0 {
				return off + 1, nil
			}
			off += 1 + int(c)
		case 0xc0:
			if off+2 > len(msg) {
				return 0, errMalformed
			}
			return off + 2, nil
		default: // 0x40 and 0x80 are reserved
			return 0, errMalformed
		}
	}
}
