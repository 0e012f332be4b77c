package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/cubicle-dev/cubicle/network/dns"
)

// MaxRulesPerList bounds AllowOut and DenyOut each, so one sandbox cannot
// fill the shared rule maps (whose size is Options.MaxRules).
const MaxRulesPerList = 1024

var (
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
//     to drop everything otherwise. Closed ranges (RFC 1918, RFC 6598, the
//     special-purpose ranges and the host's LAN, rule 11 of the package
//     documentation) are dropped by default even with AllowInternet; only
//     AllowOut opens them.
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

// ParseRules parses E2B's network.allowOut and network.denyOut lists. An
// entry is a CIDR ("10.0.0.0/8", host bits masked off), a bare IP
// ("1.1.1.1", taken as a /32) or, in allowOut only, a domain
// ("example.com", "*.example.com"; see dns.ParseDomain). Domains are not
// the program's business: they come back apart, normalised, for the
// sandbox's resolver, which opens their answers with Manager.Learn. The
// Policy has AllowInternet=true; the caller sets it from
// allow_internet_access. Bad entries return ErrBadRule or ErrIPv6Rule.
func ParseRules(allowOut, denyOut []string) (p Policy, domains []string, err error) {
	p = Policy{AllowInternet: true}
	if p.AllowOut, domains, err = parseList("allowOut", allowOut, true); err != nil {
		return Policy{}, nil, err
	}
	if p.DenyOut, _, err = parseList("denyOut", denyOut, false); err != nil {
		return Policy{}, nil, err
	}
	return p, domains, nil
}

func parseList(field string, entries []string, domainsAllowed bool) (pfxs []netip.Prefix, domains []string, err error) {
	if len(entries) > MaxRulesPerList {
		return nil, nil, fmt.Errorf("%w: %s has %d entries, at most %d are allowed", ErrBadRule, field, len(entries), MaxRulesPerList)
	}
	for _, e := range entries {
		e = strings.TrimSpace(e)
		if !isAddress(e) {
			d, err := dns.ParseDomain(e)
			switch {
			case err != nil:
				return nil, nil, fmt.Errorf("%s: %w: %q is not a CIDR, an IP or a domain (%v)", field, ErrBadRule, e, err)
			case !domainsAllowed:
				return nil, nil, fmt.Errorf("%s: %w: only CIDRs and IPs are accepted, not the domain %q", field, ErrBadRule, e)
			}
			domains = append(domains, d)
			continue
		}
		pfx, err := parseAddress(e)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", field, err)
		}
		pfxs = append(pfxs, pfx)
	}
	return pfxs, domains, nil
}

// isAddress tells an address entry from a domain: CIDRs have a slash, IPs
// parse. Anything else is a domain or nothing.
func isAddress(e string) bool {
	if strings.Contains(e, "/") {
		return true
	}
	_, err := netip.ParseAddr(e)
	return err == nil
}

func parseAddress(e string) (netip.Prefix, error) {
	var pfx netip.Prefix
	if strings.Contains(e, "/") {
		p, err := netip.ParsePrefix(e)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%w: %q: %v", ErrBadRule, e, err)
		}
		pfx = p.Masked()
	} else {
		a := netip.MustParseAddr(e) // isAddress parsed it
		pfx = netip.PrefixFrom(a, a.BitLen())
	}
	if pfx.Addr().Is4In6() {
		pfx = netip.PrefixFrom(pfx.Addr().Unmap(), pfx.Bits()-96)
	}
	if !pfx.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("%w: %q", ErrIPv6Rule, e)
	}
	return pfx, nil
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
