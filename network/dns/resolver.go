package dns

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/sys/unix"
)

// Defaults for Options' zero fields.
const (
	// DefaultPort is the DNS port, RFC 1035 §4.2.
	DefaultPort = 53
	// DefaultMinTTL keeps addresses open at least this long, whatever the
	// answer's TTL: clients and language runtimes cache answers beyond
	// their TTL (Cilium's tofqdns-min-ttl has the same purpose).
	DefaultMinTTL = 60 * time.Second
	// DefaultMaxTTL bounds how long one answer keeps addresses open.
	DefaultMaxTTL = 24 * time.Hour
	// DefaultTimeout is the wait for one upstream attempt.
	DefaultTimeout = 2 * time.Second
	// DefaultMaxInflight is the number of queries one sandbox may have in
	// flight.
	DefaultMaxInflight = 64
	// DefaultQueryRate and DefaultQueryBurst are each sandbox's query
	// budget: 100 queries a second, 200 at once. A lookup is usually two
	// queries (A and AAAA), so that is 50 names a second sustained and
	// 100 in a burst, far above what package managers, browsers and
	// crawlers ask of a resolver, while a flood of thousands a second is
	// cut down to it.
	DefaultQueryRate  = 100
	DefaultQueryBurst = 200
)

const (
	// tcpIdleTimeout closes a client's TCP connection that sends nothing
	// for this long (RFC 7766 §6.2.3 suggests seconds, not minutes).
	tcpIdleTimeout = 10 * time.Second
	// tcpWriteTimeout bounds writing one reply to a client that does not
	// read.
	tcpWriteTimeout = 5 * time.Second
	// maxQueryUDP is the receive buffer of each sandbox's UDP socket. A
	// query holds one question and perhaps an OPT record, well under this;
	// a longer datagram arrives cut short and is answered FORMERR. Kept
	// small because every sandbox holds one.
	maxQueryUDP = 4096
	// sweepInterval is how often expired book entries are dropped.
	sweepInterval = time.Minute
)

// Learner opens addrs for the sandbox behind key until the given time
// (monotonic deadline expressed as time.Time from time.Now().Add(ttl)). It
// is called before the answer is sent to the sandbox, so it must be quick
// (an eBPF map write). Forget closes addrs again (on rule change or Remove).
//
// The resolver always passes the latest deadline any still-allowed name
// justifies, so it does not matter whether Learn replaces a deadline or
// keeps the later one; to shorten what a name that is no longer allowed
// had opened, it calls Forget and then Learn. Calls for one key never
// overlap.
type Learner interface {
	Learn(key string, addrs []netip.Addr, until time.Time) error
	Forget(key string, addrs []netip.Addr) error
}

// Options configures a Resolver.
type Options struct {
	// Upstreams are where queries are forwarded, tried in order (fail over
	// on timeout, SERVFAIL or network error); required.
	Upstreams []netip.AddrPort
	// Port is the port to listen on at each sandbox's address
	// (DefaultPort).
	Port uint16
	// MinTTL and MaxTTL clamp the time an answer's addresses stay open
	// (DefaultMinTTL, DefaultMaxTTL). Forwarded answers' TTLs are lowered
	// to MaxTTL.
	MinTTL, MaxTTL time.Duration
	// Timeout is the wait for one upstream attempt (DefaultTimeout).
	Timeout time.Duration
	// MaxInflight bounds the queries in flight per sandbox
	// (DefaultMaxInflight); beyond it a query gets SERVFAIL at once. It also
	// bounds each sandbox's open TCP connections, and so the upstream
	// sockets and goroutines one sandbox can hold.
	MaxInflight int
	// QueryRate (queries per second) and QueryBurst are each sandbox's
	// token bucket (DefaultQueryRate, DefaultQueryBurst), UDP and TCP
	// together, taken from as a query arrives, before it is parsed or
	// forwarded. A UDP query over it is dropped; a TCP one is answered
	// REFUSED (see the package documentation). Stats counts them.
	QueryRate  float64
	QueryBurst int
	// Learner opens and closes learned addresses; required.
	Learner Learner
	// Logger receives refused queries (debug) and failures (slog.Default()).
	Logger *slog.Logger
}

// Resolver serves DNS to sandboxes, each on its own address with its own
// rules. All methods are safe for concurrent use.
type Resolver struct {
	opts Options
	up   *upstreams
	log  *slog.Logger

	mu     sync.Mutex // guards boxes and closed; taken before any sandbox's mu
	boxes  map[string]*sandbox
	closed bool

	stopSweep chan struct{}
	sweepDone chan struct{}
}

// sandbox is one served sandbox: its handler and its sockets.
type sandbox struct {
	*handler
	addr  netip.AddrPort
	udp   *net.UDPConn
	tcp   *net.TCPListener
	sem   chan struct{} // one token per query in flight
	limit *bucket       // QueryRate and QueryBurst
	// limited and overloaded count queries refused for the rate limit
	// and for MaxInflight (Stats).
	limited, overloaded atomic.Uint64
	ctx                 context.Context
	cancel              context.CancelFunc
	wg                  sync.WaitGroup // every goroutine serving this sandbox

	connMu sync.Mutex // guards conns and stopping
	conns  map[net.Conn]struct{}
	// stopping refuses new connections once stop has closed the old ones.
	stopping bool
}

// New makes a Resolver. Close releases it.
func New(opts Options) (*Resolver, error) {
	if len(opts.Upstreams) == 0 {
		return nil, fmt.Errorf("%w: no upstreams", ErrBadOptions)
	}
	for _, u := range opts.Upstreams {
		if !u.IsValid() || u.Port() == 0 {
			return nil, fmt.Errorf("%w: upstream %s", ErrBadOptions, u)
		}
	}
	if opts.Learner == nil {
		return nil, fmt.Errorf("%w: no Learner", ErrBadOptions)
	}
	if opts.Port == 0 {
		opts.Port = DefaultPort
	}
	if opts.MinTTL == 0 {
		opts.MinTTL = DefaultMinTTL
	}
	if opts.MaxTTL == 0 {
		opts.MaxTTL = DefaultMaxTTL
	}
	if opts.MinTTL < 0 || opts.MaxTTL < opts.MinTTL || opts.MaxTTL > math.MaxUint32*time.Second {
		return nil, fmt.Errorf("%w: TTL clamp [%v, %v]", ErrBadOptions, opts.MinTTL, opts.MaxTTL)
	}
	if opts.Timeout == 0 {
		opts.Timeout = DefaultTimeout
	}
	if opts.Timeout < 0 {
		return nil, fmt.Errorf("%w: timeout %v", ErrBadOptions, opts.Timeout)
	}
	if opts.MaxInflight == 0 {
		opts.MaxInflight = DefaultMaxInflight
	}
	if opts.MaxInflight < 0 {
		return nil, fmt.Errorf("%w: MaxInflight %d", ErrBadOptions, opts.MaxInflight)
	}
	if opts.QueryRate == 0 {
		opts.QueryRate = DefaultQueryRate
	}
	if opts.QueryBurst == 0 {
		opts.QueryBurst = DefaultQueryBurst
	}
	if !(opts.QueryRate > 0) || math.IsInf(opts.QueryRate, 0) || opts.QueryBurst < 1 {
		return nil, fmt.Errorf("%w: query rate %v, burst %d", ErrBadOptions, opts.QueryRate, opts.QueryBurst)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	r := &Resolver{
		opts:      opts,
		up:        &upstreams{addrs: append([]netip.AddrPort(nil), opts.Upstreams...), timeout: opts.Timeout},
		log:       opts.Logger.With("component", "network/dns"),
		boxes:     map[string]*sandbox{},
		stopSweep: make(chan struct{}),
		sweepDone: make(chan struct{}),
	}
	go r.sweeper()
	return r, nil
}

// sweeper drops expired book entries every sweepInterval, so that memory
// stays bounded by what is live, not by what was ever resolved.
func (r *Resolver) sweeper() {
	defer close(r.sweepDone)
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-r.stopSweep:
			return
		case now := <-t.C:
			r.mu.Lock()
			boxes := make([]*sandbox, 0, len(r.boxes))
			for _, s := range r.boxes {
				boxes = append(boxes, s)
			}
			r.mu.Unlock()
			for _, s := range boxes {
				s.sweep(now)
			}
		}
	}
}

// Add starts serving the sandbox identified by key (cubicle passes the
// host-end link name) on listen:Port, UDP and TCP (RFC 7766 framing,
// several queries per connection, idle timeout), with rules. Binding uses
// IP_FREEBIND so it may precede the address. The error wraps ErrExists if
// key is served, ErrBadDomain for a bad rule, and names the address if
// binding fails.
func (r *Resolver) Add(key string, listen netip.Addr, rules Rules) error {
	m, err := compile(rules)
	if err != nil {
		return fmt.Errorf("dns: add %q: %w", key, err)
	}
	listen = listen.Unmap()
	if !listen.IsValid() {
		return fmt.Errorf("dns: add %q: invalid listen address", key)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return fmt.Errorf("dns: add %q: %w", key, ErrClosed)
	}
	if _, ok := r.boxes[key]; ok {
		return fmt.Errorf("dns: add %q: %w", key, ErrExists)
	}
	ap := netip.AddrPortFrom(listen, r.opts.Port)
	suffix := "4"
	if listen.Is6() {
		suffix = "6"
	}
	lc := net.ListenConfig{Control: freebind}
	pc, err := lc.ListenPacket(context.Background(), "udp"+suffix, ap.String())
	if err != nil {
		return fmt.Errorf("dns: add %q: %w", key, err) // net.OpError names the address
	}
	ln, err := lc.Listen(context.Background(), "tcp"+suffix, ap.String())
	if err != nil {
		pc.Close()
		return fmt.Errorf("dns: add %q: %w", key, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &sandbox{
		handler: &handler{
			key:     key,
			up:      r.up,
			learner: r.opts.Learner,
			minTTL:  r.opts.MinTTL,
			maxTTL:  r.opts.MaxTTL,
			log:     r.log,
			m:       m,
			book:    newBook(maxNames, maxPairs),
		},
		addr:   ap,
		udp:    pc.(*net.UDPConn),
		tcp:    ln.(*net.TCPListener),
		sem:    make(chan struct{}, r.opts.MaxInflight),
		limit:  newBucket(r.opts.QueryRate, r.opts.QueryBurst, time.Now()),
		ctx:    ctx,
		cancel: cancel,
		conns:  map[net.Conn]struct{}{},
	}
	s.wg.Add(2)
	go s.serveUDP()
	go s.serveTCP()
	r.boxes[key] = s
	return nil
}

// freebind lets a socket bind an address the host does not (yet) have, so
// Add may run before the sandbox's veth is configured (ip(7) IP_FREEBIND).
func freebind(network, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if network == "udp6" || network == "tcp6" {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
		}
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("setsockopt FREEBIND: %w", serr)
	}
	return nil
}

// SetRules replaces the rules of key live. Addresses learned for names no
// longer allowed are forgotten (an address stays open while any
// still-allowed name it was learned for has not expired); still-allowed
// ones stay. The error wraps ErrUnknown for a key not served, ErrBadDomain
// for a bad rule (the old rules stay then), or the Learner's error.
func (r *Resolver) SetRules(key string, rules Rules) error {
	m, err := compile(rules)
	if err != nil {
		return fmt.Errorf("dns: set rules of %q: %w", key, err)
	}
	r.mu.Lock()
	s := r.boxes[key]
	r.mu.Unlock()
	if s == nil {
		return fmt.Errorf("dns: set rules of %q: %w", key, ErrUnknown)
	}
	if err := s.setRules(m); err != nil {
		return fmt.Errorf("dns: set rules of %q: %w", key, err)
	}
	return nil
}

// Remove stops serving key, closes its sockets, waits for its goroutines
// and forgets everything it learned. Removing an unknown key is not an
// error.
func (r *Resolver) Remove(key string) error {
	r.mu.Lock()
	s := r.boxes[key]
	delete(r.boxes, key)
	r.mu.Unlock()
	if s == nil {
		return nil
	}
	if err := s.stop(); err != nil {
		return fmt.Errorf("dns: remove %q: %w", key, err)
	}
	return nil
}

// Close removes every sandbox and stops the resolver.
func (r *Resolver) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	boxes := r.boxes
	r.boxes = map[string]*sandbox{}
	r.mu.Unlock()
	close(r.stopSweep)
	<-r.sweepDone
	var errs []error
	for key, s := range boxes {
		if err := s.stop(); err != nil {
			errs = append(errs, fmt.Errorf("dns: remove %q: %w", key, err))
		}
	}
	return errors.Join(errs...)
}

// stop closes the sockets, cancels upstream attempts in flight, waits for
// every goroutine and then forgets everything learned.
func (s *sandbox) stop() error {
	s.cancel()
	s.udp.Close()
	s.tcp.Close()
	s.connMu.Lock()
	s.stopping = true
	for c := range s.conns {
		c.Close()
	}
	s.connMu.Unlock()
	s.wg.Wait()
	return s.close()
}

// serveUDP reads queries and answers each in its own goroutine.
func (s *sandbox) serveUDP() {
	defer s.wg.Done()
	buf := make([]byte, maxQueryUDP)
	for {
		n, from, err := s.udp.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Warn("reading UDP", "sandbox", s.key, "err", err)
			if !s.pause() {
				return
			}
			continue
		}
		if !s.allow() {
			continue // dropped: a reply would only feed the flood
		}
		q := append([]byte(nil), buf[:n]...)
		select {
		case s.sem <- struct{}{}:
		default:
			s.overloaded.Add(1)
			if resp := overloaded(q); resp != nil {
				_, _ = s.udp.WriteToUDPAddrPort(resp, from)
			}
			continue
		}
		s.wg.Add(1) // serveUDP's own count keeps the group above zero
		go func() {
			defer s.wg.Done()
			defer func() { <-s.sem }()
			if resp := s.handle(s.ctx, q, false); resp != nil {
				_, _ = s.udp.WriteToUDPAddrPort(resp, from)
			}
		}()
	}
}

// allow takes a query from the sandbox's rate limit, counting and (at
// most once a minute) logging a query over it.
func (s *sandbox) allow() bool {
	ok, warn := s.limit.take(time.Now())
	if !ok {
		n := s.limited.Add(1)
		if warn {
			s.log.Warn("sandbox over its DNS query rate; dropping UDP and refusing TCP queries over it",
				"sandbox", s.key, "limited_total", n)
		}
	}
	return ok
}

// Stats are one sandbox's resolver counters since Add.
type Stats struct {
	// RateLimited counts queries over Options.QueryRate and QueryBurst:
	// UDP ones dropped, TCP ones answered REFUSED.
	RateLimited uint64
	// Overloaded counts queries answered SERVFAIL because MaxInflight
	// were in flight already.
	Overloaded uint64
}

// Stats returns the counters of the sandbox served as key; the error
// wraps ErrUnknown for a key not served.
func (r *Resolver) Stats(key string) (Stats, error) {
	r.mu.Lock()
	s := r.boxes[key]
	r.mu.Unlock()
	if s == nil {
		return Stats{}, fmt.Errorf("dns: stats of %q: %w", key, ErrUnknown)
	}
	return Stats{RateLimited: s.limited.Load(), Overloaded: s.overloaded.Load()}, nil
}

// pause waits a little after a socket error that may repeat (Accept out
// of descriptors), so that a loop does not spin; false once stopping.
func (s *sandbox) pause() bool {
	t := time.NewTimer(100 * time.Millisecond)
	defer t.Stop()
	select {
	case <-s.ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// overloaded answers SERVFAIL at once to a query beyond MaxInflight.
func overloaded(q []byte) []byte {
	pq, rc, dropIt := parseQuery(q)
	if dropIt {
		return nil
	}
	if rc == dnsmessage.RCodeSuccess {
		rc = dnsmessage.RCodeServerFailure
	}
	return pq.reply(rc, false)
}

// serveTCP accepts connections, at most MaxInflight at a time.
func (s *sandbox) serveTCP() {
	defer s.wg.Done()
	for {
		c, err := s.tcp.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			s.log.Warn("accepting TCP", "sandbox", s.key, "err", err)
			if !s.pause() {
				return
			}
			continue
		}
		s.connMu.Lock()
		ok := !s.stopping && len(s.conns) < cap(s.sem)
		if ok {
			s.conns[c] = struct{}{}
		}
		s.connMu.Unlock()
		if !ok {
			c.Close()
			continue
		}
		s.wg.Add(1)
		go s.serveConn(c)
	}
}

// serveConn reads length-prefixed queries (RFC 1035 §4.2.2) until the
// client closes, goes idle, or sends something that is not a query, and
// answers them concurrently, in any order (RFC 7766 §6.2.1.1).
func (s *sandbox) serveConn(c net.Conn) {
	defer s.wg.Done()
	var inflight sync.WaitGroup
	var wmu sync.Mutex // one reply written at a time
	defer func() {
		// Queries read before the client closed its side still get their
		// replies (a write to a client that does not read times out).
		inflight.Wait()
		c.Close()
		s.connMu.Lock()
		delete(s.conns, c)
		s.connMu.Unlock()
	}()
	write := func(resp []byte) {
		msg := make([]byte, 2+len(resp))
		binary.BigEndian.PutUint16(msg, uint16(len(resp)))
		copy(msg[2:], resp)
		wmu.Lock()
		defer wmu.Unlock()
		_ = c.SetWriteDeadline(time.Now().Add(tcpWriteTimeout))
		if _, err := c.Write(msg); err != nil {
			c.Close()
		}
	}
	rd := bufio.NewReader(c)
	for {
		_ = c.SetReadDeadline(time.Now().Add(tcpIdleTimeout))
		var lb [2]byte
		if _, err := io.ReadFull(rd, lb[:]); err != nil {
			return
		}
		q := make([]byte, binary.BigEndian.Uint16(lb[:]))
		if _, err := io.ReadFull(rd, q); err != nil {
			return
		}
		pq, _, dropIt := parseQuery(q)
		if dropIt {
			return
		}
		if !s.allow() {
			// Over TCP a query left unanswered would stall the ones
			// after it on the connection until the client gives up.
			if resp := pq.reply(dnsmessage.RCodeRefused, false); resp != nil {
				write(resp)
			}
			continue
		}
		select {
		case s.sem <- struct{}{}:
		default:
			s.overloaded.Add(1)
			if resp := overloaded(q); resp != nil {
				write(resp)
			}
			continue
		}
		inflight.Add(1)
		go func() {
			defer inflight.Done()
			defer func() { <-s.sem }()
			if resp := s.handle(s.ctx, q, true); resp != nil {
				write(resp)
			} else {
				c.Close()
			}
		}()
	}
}
