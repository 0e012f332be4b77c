package dns

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrBadDomain is returned (wrapped) for a domain entry ParseDomain
	// rejects.
	ErrBadDomain = errors.New("dns: invalid domain")
	// ErrExists is returned (wrapped) by Add for a key already served.
	ErrExists = errors.New("dns: sandbox already served")
	// ErrUnknown is returned (wrapped) by SetRules for a key not served.
	ErrUnknown = errors.New("dns: sandbox not served")
	// ErrClosed is returned (wrapped) by Add after Close.
	ErrClosed = errors.New("dns: resolver closed")
	// ErrBadOptions is returned (wrapped) by New for unusable options.
	ErrBadOptions = errors.New("dns: invalid options")
)

const (
	// maxNameLen is the longest domain name in text form without the
	// trailing dot: 255 octets on the wire (RFC 1035 §2.3.4) less the
	// length octet of the first label and the root label.
	maxNameLen = 253
	// maxLabelLen is RFC 1035 §2.3.4's limit on one label.
	maxLabelLen = 63
)

// Rules is what one sandbox may resolve.
type Rules struct {
	// Domains are allowOut domain entries: "example.com" (exact) or
	// "*.example.com" (every subdomain). Case-insensitive, an optional
	// trailing dot ignored.
	Domains []string
	// Open reports that the sandbox may reach the internet at large
	// (allow_internet_access and no deny of 0.0.0.0/0): every name is
	// forwarded. Answers are still recorded (Learn) only for names matching
	// Domains.
	Open bool
}

// ParseDomain validates and normalises one domain entry: lower case, no
// trailing dot, labels of 1-63 characters from [a-z0-9-] not starting or
// ending with '-', at most 253 characters in all, at least two labels, and
// "*." only as the whole first label, followed by at least two labels. A
// numeric last label is refused, which rules out IPv4 addresses (no
// top-level domain is all digits). The error wraps ErrBadDomain.
func ParseDomain(s string) (string, error) {
	d := asciiLower(strings.TrimSuffix(s, "."))
	bad := func(why string) (string, error) {
		return "", fmt.Errorf("%w %s: %s", ErrBadDomain, quote(s), why)
	}
	if len(d) > maxNameLen {
		return bad(fmt.Sprintf("longer than %d characters", maxNameLen))
	}
	rest, wild := strings.CutPrefix(d, "*.")
	labels := strings.Split(rest, ".")
	for _, l := range labels {
		if why := checkLabel(l); why != "" {
			return bad(why)
		}
	}
	if len(labels) < 2 {
		if wild {
			return bad(`a wildcard needs at least two labels after "*."`)
		}
		return bad("needs at least two labels")
	}
	if allDigits(labels[len(labels)-1]) {
		return bad("numeric top-level label (an IP address is not a domain)")
	}
	return d, nil
}

// checkLabel says what is wrong with one label, or "".
func checkLabel(l string) string {
	switch {
	case l == "":
		return "empty label"
	case len(l) > maxLabelLen:
		return fmt.Sprintf("label longer than %d characters", maxLabelLen)
	case l[0] == '-' || l[len(l)-1] == '-':
		return "label starts or ends with '-'"
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
		case c == '*':
			return `"*" is allowed only as the whole first label`
		default:
			return fmt.Sprintf("character %q not allowed", c)
		}
	}
	return ""
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// quote renders untrusted input for an error message, cut short so that a
// huge entry does not make a huge error.
func quote(s string) string {
	const max = 80
	if len(s) > max {
		return fmt.Sprintf("%q…", s[:max])
	}
	return fmt.Sprintf("%q", s)
}

// Match reports whether name (any case, optional trailing dot) matches one
// of the entries in r.Domains, which are expected in ParseDomain's form (case
// and a trailing dot in them are tolerated too).
func (r Rules) Match(name string) bool {
	n := normName(name)
	if n == "" {
		return false
	}
	for _, d := range r.Domains {
		d = asciiLower(strings.TrimSuffix(d, "."))
		if suffix, ok := strings.CutPrefix(d, "*"); ok && strings.HasPrefix(suffix, ".") {
			// suffix is ".example.com": a subdomain ends with it and is longer.
			if len(n) > len(suffix) && strings.HasSuffix(n, suffix) {
				return true
			}
		} else if n == d {
			return true
		}
	}
	return false
}

// matcher is Rules compiled for the per-query path: a lookup per label
// instead of a scan over every entry.
type matcher struct {
	exact map[string]struct{}
	// wild holds "example.com" for the entry "*.example.com".
	wild map[string]struct{}
	open bool
}

// compile validates every entry of r.
func compile(r Rules) (*matcher, error) {
	m := &matcher{exact: map[string]struct{}{}, wild: map[string]struct{}{}, open: r.Open}
	for _, d := range r.Domains {
		n, err := ParseDomain(d)
		if err != nil {
			return nil, err
		}
		if rest, ok := strings.CutPrefix(n, "*."); ok {
			m.wild[rest] = struct{}{}
		} else {
			m.exact[n] = struct{}{}
		}
	}
	return m, nil
}

// match reports whether the normalised name n is allowed by Domains.
func (m *matcher) match(n string) bool {
	if n == "" {
		return false
	}
	if _, ok := m.exact[n]; ok {
		return true
	}
	for i := 0; i < len(n); i++ {
		if n[i] == '.' {
			if _, ok := m.wild[n[i+1:]]; ok {
				return true
			}
		}
	}
	return false
}

// normName lowers ASCII letters (DNS names compare case-insensitively in
// ASCII only, RFC 4343) and drops one trailing dot.
func normName(s string) string {
	return asciiLower(strings.TrimSuffix(s, "."))
}

// asciiLower lowers A-Z only; strings.ToLower would also fold non-ASCII
// letters such as the Kelvin sign into 'k', letting look-alike input pass.
func asciiLower(s string) string {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if c := b[j]; c >= 'A' && c <= 'Z' {
					b[j] = c + 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}
