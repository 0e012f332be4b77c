package api

import (
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
)

// DefaultCORSOrigins lets a page of any origin call the API, as the E2B
// SDK running in a browser needs. That is safe because the API has no
// ambient authority a browser would add on its own: it authenticates by the
// X-API-KEY header alone (no cookies, and CORS answers never allow
// credentials), so a page can do only what the key it already holds
// allows. Operators who serve no browser code, or only their own, narrow it
// with --cors-origins.
var DefaultCORSOrigins = []string{"*"}

// What a browser may send and read, and no more: the methods the API
// serves, and the headers the E2B JS SDK sends (its API key, JSON bodies,
// a bearer token for the account APIs, and the SDK's identification
// headers, which it sends on every request).
var (
	corsMethods = "GET, POST, PUT, PATCH, DELETE" // PATCH: the volume content API (volumes.go)
	corsHeaders = []string{
		"X-Api-Key", "Content-Type", "Authorization", "User-Agent",
		"Browser", "Lang", "Lang_version", "Package_version", "Publisher", "Sdk_runtime", "System",
	}
	corsExposed = "X-Next-Token, X-Total-Running"
)

// corsMaxAge is how long a browser may cache a preflight answer, seconds.
const corsMaxAge = "600"

// ParseCORSOrigins checks a list of allowed origins: "*" alone, or
// scheme://host[:port] each, as browsers send them in Origin.
func ParseCORSOrigins(list []string) ([]string, error) {
	var out []string
	for _, o := range list {
		o = strings.TrimSpace(o)
		if o == "" {
			continue
		}
		if o == "*" {
			out = append(out, o)
			continue
		}
		u, err := url.Parse(o)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.User != nil ||
			(u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
			return nil, fmt.Errorf("CORS origin %q is not scheme://host[:port]", o)
		}
		out = append(out, strings.ToLower(u.Scheme+"://"+u.Host))
	}
	if slices.Contains(out, "*") && len(out) > 1 {
		return nil, fmt.Errorf("CORS origin \"*\" allows every origin: list it alone")
	}
	return out, nil
}

type corsPolicy struct {
	any     bool
	origins map[string]bool
}

func newCORSPolicy(origins []string) corsPolicy {
	p := corsPolicy{origins: map[string]bool{}}
	for _, o := range origins {
		if o == "*" {
			p.any = true
		}
		p.origins[strings.ToLower(o)] = true
	}
	return p
}

func (p corsPolicy) allows(origin string) bool {
	return p.any || p.origins[strings.ToLower(origin)]
}

// handle sets the CORS headers of a response and answers preflight
// requests itself, reporting whether it did.
func (p corsPolicy) handle(w http.ResponseWriter, r *http.Request) bool {
	h := w.Header()
	h.Add("Vary", "Origin")
	origin := r.Header.Get("Origin")
	allowed := origin != "" && p.allows(origin)
	if allowed {
		if p.any {
			h.Set("Access-Control-Allow-Origin", "*")
		} else {
			h.Set("Access-Control-Allow-Origin", origin)
		}
		h.Set("Access-Control-Expose-Headers", corsExposed)
	}
	if r.Method != http.MethodOptions {
		return false
	}
	if origin == "" || r.Header.Get("Access-Control-Request-Method") == "" {
		h.Set("Allow", corsMethods+", OPTIONS")
		w.WriteHeader(http.StatusNoContent)
		return true
	}
	if !allowed {
		writeError(w, http.StatusForbidden, fmt.Sprintf("origin %s may not call this API: the server's --cors-origins does not list it", origin))
		return true
	}
	h.Add("Vary", "Access-Control-Request-Method")
	h.Add("Vary", "Access-Control-Request-Headers")
	h.Set("Access-Control-Allow-Methods", corsMethods)
	h.Set("Access-Control-Allow-Headers", strings.Join(corsHeaders, ", "))
	h.Set("Access-Control-Max-Age", corsMaxAge)
	w.WriteHeader(http.StatusNoContent)
	return true
}
