package dns

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// exchanger sends a query upstream and returns the reply, with the ID of q
// put back. The handler treats what it returns as untrusted all the same.
type exchanger interface {
	exchange(ctx context.Context, q []byte, qn dnsmessage.Question, tcp bool) ([]byte, error)
}

// upstreams forwards to a list of servers, in order.
type upstreams struct {
	addrs   []netip.AddrPort
	timeout time.Duration
}

// errServFail marks an upstream that answered SERVFAIL.
var errServFail = errors.New("upstream answered SERVFAIL")

// exchange tries each upstream in turn, going on after a network error, a
// timeout or SERVFAIL. If every one fails and some answered SERVFAIL, the
// last such reply is returned, so the client sees the upstream's own answer.
func (u *upstreams) exchange(ctx context.Context, q []byte, qn dnsmessage.Question, tcp bool) ([]byte, error) {
	var errs []error
	var servfail []byte
	for _, a := range u.addrs {
		resp, err := u.one(ctx, a, q, qn, tcp)
		if err == nil && rcode(resp) == dnsmessage.RCodeServerFailure {
			servfail, err = resp, errServFail
		}
		if err == nil {
			return resp, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", a, err))
		if ctx.Err() != nil {
			break
		}
	}
	if servfail != nil {
		return servfail, nil
	}
	return nil, fmt.Errorf("dns: every upstream failed: %w", errors.Join(errs...))
}

// one asks a single upstream: over UDP, then again over TCP if the UDP
// reply was truncated (RFC 7766 §5), or over TCP only for a TCP client.
func (u *upstreams) one(ctx context.Context, a netip.AddrPort, q []byte, qn dnsmessage.Question, tcp bool) ([]byte, error) {
	if !tcp {
		resp, err := u.attempt(ctx, a, q, qn, false)
		if err != nil || !truncated(resp) {
			return resp, err
		}
	}
	return u.attempt(ctx, a, q, qn, true)
}

// bufPool holds UDP receive buffers: a reply may be as large as the
// client's EDNS0 size, up to 64 KiB.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 1<<16); return &b }}

// attempt sends q with a fresh random ID over one connection and waits for
// the reply with that ID and question until the per-attempt timeout. Over
// UDP, datagrams that do not match are skipped: the fresh ID and the
// kernel's random source port are what stand between the sandbox and a
// spoofed answer.
func (u *upstreams) attempt(ctx context.Context, a netip.AddrPort, q []byte, qn dnsmessage.Question, tcp bool) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, u.timeout)
	defer cancel()
	var idb [2]byte
	_, _ = rand.Read(idb[:]) // never fails (crypto/rand since Go 1.24)
	id := binary.BigEndian.Uint16(idb[:])
	network := "udp"
	if tcp {
		network = "tcp"
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, network, a.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	// Cancellation (Remove, Close) must end a read that is blocked.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var msg []byte
	if tcp {
		msg = make([]byte, 2+len(q))
		binary.BigEndian.PutUint16(msg, uint16(len(q)))
		copy(msg[2:], q)
		binary.BigEndian.PutUint16(msg[2:], id)
	} else {
		msg = append([]byte(nil), q...)
		binary.BigEndian.PutUint16(msg, id)
	}
	if _, err := c.Write(msg); err != nil {
		return nil, err
	}

	var resp []byte
	if tcp {
		var lb [2]byte
		if _, err := io.ReadFull(c, lb[:]); err != nil {
			return nil, err
		}
		resp = make([]byte, binary.BigEndian.Uint16(lb[:]))
		if _, err := io.ReadFull(c, resp); err != nil {
			return nil, err
		}
		if !matchesQuery(resp, id, qn) {
			return nil, errors.New("reply over TCP does not match the query")
		}
	} else {
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		for {
			n, err := c.Read(*bp)
			if err != nil {
				if ctx.Err() != nil {
					return nil, fmt.Errorf("no reply: %w", ctx.Err())
				}
				return nil, err
			}
			if matchesQuery((*bp)[:n], id, qn) {
				resp = append([]byte(nil), (*bp)[:n]...)
				break
			}
		}
	}
	copy(resp[:2], q[:2]) // the client's own ID
	return resp, nil
}
