package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// MaxRulesPerList bounds AllowOut and DenyOut each, so one sandbox cannot
// fill the shared rule maps (whose size is Options.MaxRules).
const MaxRulesPerList = 1024

var (
	// ErrDomainRule is returned by ParseRules for a domain entry
	// (example.com, *.example.com). E2B allows them in allowOut, where
	// they are enforced by cubicle's resolver (package network/dns), which
	// opens their answers with Manager.Learn; callers split them out
	// before ParseRules. In denyOut E2B allows none.
	ErrDomainRule = errors.New("policy: a domain is not a CIDR rule")
	// ErrBadRule is returned for an entry that is neither a CIDR, an IP nor
	// a domain, for a domain in denyOut (E2B allows only CIDRs and IPs
	// there), and for lists longer than MaxRulesPerList.
	ErrBadRule = errors.New("policy: invalid network rule")
	// ErrIPv6Rule is returned for an IPv6 entry: sandboxes have no IPv6
	// egress at all (the program drops every IPv6 packet), so an IPv6 rule
	// could never take effect and is refused rather than ignored.
	ErrIPv6Rule = errors.New("policy: IPv6 rules are not supported (sandboxes have no IPv6 egress)")
)

// Policy is one sandbox's egress policy, with E2B's semantics:
//
//   - AllowOut always wins over DenyOut and over AllowInternet=false;
//   - DenyOut wins over the default;
//   - the default is to pass public addresses when AllowInternet is set and
//     to drop everything otherwise. Private ranges (RFC 1918, RFC 6598) are
//     dropped by default even with AllowInternet; only AllowOut opens them.
//
// AllowInternet=false is therefore exactly E2B's "denyOut 0.0.0.0/0".
// Nothing in a Policy can open the hard-denied destinations (see the
// package documentation). Prefixes must be IPv4; ParseRules builds them
// from API input.
type Policy struct {
	AllowInternet bool
	AllowOut      []netip.Prefix
	DenyOut       []netip.Prefix
}

// ParseRules parses E2B's network.allowOut and network.denyOut lists: each
// entry a CIDR ("10.0.0.0/8") or a bare IP ("1.1.1.1", taken as a /32).
// Host bits of a CIDR are masked off. A domain entry returns an error
// wrapping ErrDomainRule; anything else unparsable, ErrBadRule.
// The result has AllowInternet=true; the caller sets it from
// allow_internet_access.
func ParseRules(allowOut, denyOut []string) (Policy, error) {
	p := Policy{AllowInternet: true}
	var err error
	if p.AllowOut, err = parseList("allowOut", allowOut, true); err != nil {
		return Policy{}, err
	}
	if p.DenyOut, err = parseList("denyOut", denyOut, false); err != nil {
		return Policy{}, err
	}
	return p, nil
}

func parseList(field string, entries []string, domainsAllowed bool) ([]netip.Prefix, error) {
	if len(entries) > MaxRulesPerList {
		return nil, fmt.Errorf("%w: %s has %d entries, at most %d are allowed", ErrBadRule, field, len(entries), MaxRulesPerList)
	}
	var out []netip.Prefix
	for _, e := range entries {
		pfx, err := parseEntry(strings.TrimSpace(e))
		if errors.Is(err, ErrDomainRule) && !domainsAllowed {
			err = fmt.Errorf("%w: %s accepts only CIDRs and IPs, not the domain %q", ErrBadRule, field, e)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		out = append(out, pfx)
	}
	return out, nil
}

func parseEntry(e string) (netip.Prefix, error) {
	var pfx netip.Prefix
	if strings.Contains(e, "/") {
		p, err := netip.ParsePrefix(e)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%w: %q: %v", ErrBadRule, e, err)
		}
		pfx = p.Masked()
	} else if a, err := netip.ParseAddr(e); err == nil {
		pfx = netip.PrefixFrom(a, a.BitLen())
	} else if isDomain(e) {
		return netip.Prefix{}, fmt.Errorf("%w: %q", ErrDomainRule, e)
	} else {
		return netip.Prefix{}, fmt.Errorf("%w: %q is not a CIDR, an IP or a domain", ErrBadRule, e)
	}
	if pfx.Addr().Is4In6() {
		pfx = netip.PrefixFrom(pfx.Addr().Unmap(), pfx.Bits()-96)
	}
	if !pfx.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("%w: %q", ErrIPv6Rule, e)
	}
	return pfx, nil
}

// isDomain reports whether e looks like an E2B domain entry: "example.com"
// or "*.example.com", labels of letters, digits and hyphens (RFC 1123).
func isDomain(e string) bool {
	e = strings.TrimPrefix(e, "*.")
	if len(e) == 0 || len(e) > 253 || !strings.Contains(e, ".") {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(e, "."), ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

func (p Policy) validate() error {
	for _, l := range [][]netip.Prefix{p.AllowOut, p.DenyOut} {
		if len(l) > MaxRulesPerList {
			return fmt.Errorf("%w: %d entries, at most %d are allowed", ErrBadRule, len(l), MaxRulesPerList)
		}
		for _, pfx := range l {
			if !pfx.IsValid() || !pfx.Addr().Is4() {
				return fmt.Errorf("%w: %v", ErrIPv6Rule, pfx)
			}
		}
	}
	return nil
}
