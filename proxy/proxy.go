// Package proxy is cubicle's data plane: it routes client traffic to a TCP
// port inside a sandbox, chosen by the E2b-Sandbox-Id/E2b-Sandbox-Port
// headers or by a Host of the form <port>-<sandboxID>.<domain>. It speaks
// HTTP/1.1 with streaming bodies and WebSocket upgrades, answers with the
// E2B proxy's 502 JSON bodies, and resets every open connection of a
// sandbox the moment the sandbox is killed or paused.
package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// EnvdPort is the port a request goes to when it names a sandbox but no port.
const EnvdPort = 49983

// Route is where a sandbox's traffic goes.
type Route struct {
	Addr netip.Addr
	// Paused sandboxes get a 502 unless Wake brings them back.
	Paused bool
	// TrafficToken, when set, is demanded in TrafficTokenHeader on every
	// port but envd's (network.allowPublicTraffic false).
	TrafficToken string
	// AccessToken is envd's token; used to match signed /files URLs that
	// arrive without sandbox headers, and to tell which process starts
	// deserve a checkpoint.
	AccessToken string
	// Checkpoint says the sandbox is checkpointed before every command:
	// each envd process Start carrying AccessToken makes the proxy call
	// Resolver.Checkpoint before forwarding it.
	Checkpoint bool
}

// Resolver is what the proxy needs of the control plane.
type Resolver interface {
	// Route returns the route of a live sandbox.
	Route(id string) (Route, bool)
	// Wake resumes a paused sandbox whose lifecycle lets traffic wake it; it
	// reports whether the sandbox now runs.
	Wake(ctx context.Context, id string) bool
	// Each calls fn for every live sandbox until fn returns false.
	Each(fn func(id string, r Route) bool)
	// Checkpoint snapshots a sandbox whose Route says Checkpoint before a
	// command starts in it. On error the command is not forwarded.
	Checkpoint(ctx context.Context, id string) error
}

// Proxy is an http.Handler; serve it with the http.Server that Server
// returns so that connections can be tracked and reset.
type Proxy struct {
	resolver Resolver
	domain   string
	log      *slog.Logger
	rp       *httputil.ReverseProxy

	mu    sync.Mutex // guards conns
	conns map[string]map[*trackedConn]struct{}
}

// New returns a proxy for sandboxes under domain.
func New(resolver Resolver, domain string, log *slog.Logger) *Proxy {
	if log == nil {
		log = slog.Default()
	}
	p := &Proxy{resolver: resolver, domain: domain, log: log, conns: map[string]map[*trackedConn]struct{}{}}
	transport := &http.Transport{
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       60 * time.Second,
		ResponseHeaderTimeout: 0, // streams may wait a long time for headers
		DisableCompression:    true,
	}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			t := target(r.In.Context())
			r.Out.URL.Scheme = "http"
			r.Out.URL.Host = net.JoinHostPort(t.addr.String(), strconv.Itoa(t.port))
			r.Out.Host = r.In.Host
			// Keep the client's X-Forwarded-For chain; add ours.
			r.SetXForwarded()
		},
		Transport:     transport,
		FlushInterval: -1, // stream every write: Connect streams, SSE, logs
		ErrorHandler:  p.upstreamError,
	}
	return p
}

type targetKey struct{}

type routeTarget struct {
	id   string
	addr netip.Addr
	port int
}

func target(ctx context.Context) routeTarget {
	t, _ := ctx.Value(targetKey{}).(routeTarget)
	return t
}

// errorBody is the E2B proxy's error shape.
type errorBody struct {
	SandboxID string `json:"sandboxId,omitempty"`
	Message   string `json:"message"`
	Code      int    `json:"code"`
}

func writeError(w http.ResponseWriter, code int, id, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(errorBody{SandboxID: id, Message: msg, Code: code})
}

// Messages the SDKs recognise.
const (
	msgNotFound   = "The sandbox was not found"
	msgPortClosed = "The sandbox is running but port is not open"
	msgPaused     = "The sandbox is paused"
)

// ServeHTTP routes one request into a sandbox.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	id, port, ok := p.routeOf(r)
	if !ok {
		writeError(w, http.StatusBadRequest, "", "request names no sandbox: send E2b-Sandbox-Id and E2b-Sandbox-Port headers or use host <port>-<sandboxID>."+p.domain)
		return
	}
	route, found := p.resolver.Route(id)
	if !found {
		writeError(w, http.StatusBadGateway, id, msgNotFound)
		return
	}
	// Before anything else, a paused sandbox's wake-up included: a request
	// that may not reach the sandbox must not resume it either.
	if msg, ok := trafficAllowed(route, port, r); !ok {
		writeError(w, http.StatusForbidden, id, msg)
		return
	}
	if route.Paused {
		if !p.resolver.Wake(r.Context(), id) {
			writeError(w, http.StatusBadGateway, id, msgPaused)
			return
		}
		if route, found = p.resolver.Route(id); !found {
			writeError(w, http.StatusBadGateway, id, msgNotFound)
			return
		}
	}
	if route.Checkpoint && port == EnvdPort && isProcessStart(r) && tokenEqual(r.Header.Get(accessTokenHeader), route.AccessToken) {
		// A command the agent may want to undo: save the sandbox first. A
		// command run without its checkpoint would make that undo lose
		// work, so it is refused instead. Requests without the sandbox's
		// token take none: envd refuses them, and they must not push the
		// owner's checkpoints out.
		if err := p.resolver.Checkpoint(r.Context(), id); err != nil {
			writeError(w, http.StatusBadGateway, id, "The command was not started: cubicle could not checkpoint the sandbox before it: "+err.Error())
			return
		}
		// A rollback may have moved it meanwhile.
		if route, found = p.resolver.Route(id); !found {
			writeError(w, http.StatusBadGateway, id, msgNotFound)
			return
		}
	}
	tc, _ := r.Context().Value(connKey{}).(*trackedConn)
	if tc != nil {
		p.track(id, tc)
		defer p.untrack(id, tc)
	}
	// Full duplex: the upstream may answer (Connect streams do) before the
	// transport has read the request body to its EOF. Without this the
	// server, on the first write of the response, discards and closes the
	// unread request body under the transport's feet; the request write
	// then fails, the upstream connection is torn down mid-stream and the
	// client sees its stream "terminated".
	_ = http.NewResponseController(w).EnableFullDuplex()
	ctx := context.WithValue(r.Context(), targetKey{}, routeTarget{id: id, addr: route.Addr, port: port})
	p.rp.ServeHTTP(w, r.WithContext(ctx))
}

// processStartPath is envd's Connect procedure that starts a command
// (process.Process/Start; the SDKs' commands.run and pty.create).
const processStartPath = "/process.Process/Start"

// accessTokenHeader carries envd's access token.
const accessTokenHeader = "X-Access-Token"

func isProcessStart(r *http.Request) bool {
	return r.Method == http.MethodPost && r.URL.Path == processStartPath
}

// TrafficTokenHeader carries a sandbox's traffic access token, as the SDKs
// send it (the code interpreter's calls) and E2B's proxy reads it.
const TrafficTokenHeader = "E2B-Traffic-Access-Token"

// trafficAllowed enforces network.allowPublicTraffic false: every port but
// envd's demands the sandbox's traffic access token. envd's port is exempt,
// as in E2B: envd checks its own access token, and the SDKs never send the
// traffic token there. On refusal it returns E2B's message for the case.
func trafficAllowed(route Route, port int, r *http.Request) (string, bool) {
	if route.TrafficToken == "" || port == EnvdPort {
		return "", true
	}
	got := r.Header.Values(TrafficTokenHeader)
	switch {
	case len(got) == 0 || got[0] == "":
		return "Sandbox is secured with traffic access token. Token header '" + strings.ToLower(TrafficTokenHeader) + "' is missing", false
	case len(got) > 1 || !tokenEqual(got[0], route.TrafficToken):
		return "Sandbox is secured with traffic access token. Provided token in header '" + strings.ToLower(TrafficTokenHeader) + "' is invalid", false
	}
	return "", true
}

// routeOf finds the sandbox and port a request is for.
func (p *Proxy) routeOf(r *http.Request) (id string, port int, ok bool) {
	if id = r.Header.Get("E2b-Sandbox-Id"); id != "" {
		port = EnvdPort
		if ps := r.Header.Get("E2b-Sandbox-Port"); ps != "" {
			n, err := strconv.Atoi(ps)
			if err != nil || n <= 0 || n > 65535 {
				return "", 0, false
			}
			port = n
		}
		return id, port, true
	}
	if id, port, ok = parseHost(r.Host, p.domain); ok {
		return id, port, true
	}
	// An old SDK's signed /files URL carries neither: find the sandbox whose
	// token made the signature.
	if r.URL.Path == "/files" && r.URL.Query().Get("signature") != "" {
		if id, ok = p.signedSandbox(r); ok {
			return id, EnvdPort, true
		}
	}
	return "", 0, false
}

// parseHost splits "<port>-<id>.<domain>[:hostport]".
func parseHost(host, domain string) (string, int, bool) {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	label, rest, found := strings.Cut(host, ".")
	if !found || (domain != "" && !strings.EqualFold(rest, domain)) {
		return "", 0, false
	}
	ps, id, found := strings.Cut(label, "-")
	if !found || id == "" {
		return "", 0, false
	}
	port, err := strconv.Atoi(ps)
	if err != nil || port <= 0 || port > 65535 {
		return "", 0, false
	}
	return id, port, true
}

func (p *Proxy) upstreamError(w http.ResponseWriter, r *http.Request, err error) {
	t := target(r.Context())
	if errors.Is(err, syscall.ECONNREFUSED) {
		writeError(w, http.StatusBadGateway, t.id, msgPortClosed)
		return
	}
	if errors.Is(err, context.Canceled) {
		return // the client went away
	}
	if _, still := p.resolver.Route(t.id); !still {
		writeError(w, http.StatusBadGateway, t.id, msgNotFound)
		return
	}
	p.log.Debug("proxy upstream error", "sandbox", t.id, "port", t.port, "err", err)
	writeError(w, http.StatusBadGateway, t.id, "The sandbox did not answer: "+err.Error())
}
