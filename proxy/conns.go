package proxy

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// trackedConn is a client connection; the proxy remembers which sandbox it
// is serving so that killing the sandbox can reset it.
type trackedConn struct {
	net.Conn
}

type connKey struct{}

// Server returns an http.Server for the proxy that records each client
// connection so it can be reset later.
func (p *Proxy) Server(addr string) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           p,
		ReadHeaderTimeout: 30 * time.Second,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connKey{}, &trackedConn{Conn: c})
		},
	}
}

func (p *Proxy) track(id string, c *trackedConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	set := p.conns[id]
	if set == nil {
		set = map[*trackedConn]struct{}{}
		p.conns[id] = set
	}
	set[c] = struct{}{}
}

func (p *Proxy) untrack(id string, c *trackedConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if set := p.conns[id]; set != nil {
		delete(set, c)
		if len(set) == 0 {
			delete(p.conns, id)
		}
	}
}

// Evict resets every client connection that is serving a request of the
// sandbox: the client sees a connection reset, not a clean end of stream,
// which is how the SDKs know the sandbox was killed.
func (p *Proxy) Evict(id string) {
	p.mu.Lock()
	set := p.conns[id]
	delete(p.conns, id)
	p.mu.Unlock()
	for c := range set {
		if tcp, ok := c.Conn.(*net.TCPConn); ok {
			tcp.SetLinger(0) // close sends RST
		}
		c.Close()
	}
}

// Connections reports how many client connections are serving a sandbox.
func (p *Proxy) Connections(id string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns[id])
}

func tokenEqual(got, want string) bool {
	return subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

// signedSandbox finds the sandbox whose envd token produced the request's
// /files signature: "v1_" + base64(sha256("<path>:<op>:<user>:<token>[:<exp>]")).
func (p *Proxy) signedSandbox(r *http.Request) (string, bool) {
	q := r.URL.Query()
	sig := q.Get("signature")
	if !strings.HasPrefix(sig, "v1_") {
		return "", false
	}
	op := "read"
	if r.Method == http.MethodPost {
		op = "write"
	}
	var exp string
	if e := q.Get("signature_expiration"); e != "" {
		if _, err := strconv.ParseInt(e, 10, 64); err != nil {
			return "", false
		}
		exp = e
	}
	var found string
	p.resolver.Each(func(id string, rt Route) bool {
		if rt.AccessToken == "" {
			return true
		}
		if tokenEqual(sig, FileSignature(q.Get("path"), op, q.Get("username"), rt.AccessToken, exp)) {
			found = id
			return false
		}
		return true
	})
	return found, found != ""
}

// FileSignature computes envd's /files URL signature.
func FileSignature(path, op, user, token, exp string) string {
	s := path + ":" + op + ":" + user + ":" + token
	if exp != "" {
		s += ":" + exp
	}
	sum := sha256.Sum256([]byte(s))
	return "v1_" + strings.TrimRight(base64.StdEncoding.EncodeToString(sum[:]), "=")
}
