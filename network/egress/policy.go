package egress

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/cubicle-dev/cubicle/network/dns"
	"github.com/cubicle-dev/cubicle/network/policy"
)

// Policy is a sandbox's outbound network policy in E2B's terms: whether
// it may reach the internet at all, and CIDRs (AllowOut) and domain names
// (AllowDomains: "example.com" or "*.example.com") it may reach, which win
// over the CIDRs it may not (DenyOut). Hard rules no policy opens (other
// sandboxes, the host, link-local and metadata addresses) are package
// policy's own.
//
// Parse makes one from API input; it is the only parser of E2B's lists.
// The JSON form is what the store keeps of a sandbox: its field names
// must not change, or records written earlier no longer read back.
type Policy struct {
	AllowInternet bool           `json:"allowInternet"`
	AllowOut      []netip.Prefix `json:"allowOut,omitempty"`
	AllowDomains  []string       `json:"allowDomains,omitempty"`
	DenyOut       []netip.Prefix `json:"denyOut,omitempty"`
}

// Default is the policy of a sandbox nobody asked anything of: every
// device is put under it when it is made (PoolOptions), before anything
// runs behind it.
var Default = Policy{AllowInternet: true}

// Counters are packets and bytes a sandbox sent that its policy let out
// (Passed) and dropped (Dropped, IPv6 included), since its device was
// prepared.
type Counters struct {
	PassedPackets, PassedBytes   uint64
	DroppedPackets, DroppedBytes uint64
}

// Parse turns E2B's network fields into a Policy: allow_internet_access,
// network.allowOut and network.denyOut. An entry is a CIDR ("10.0.0.0/8",
// host bits masked off), a bare IP ("1.1.1.1", taken as a /32) or, in
// allowOut only, a domain ("example.com", "*.example.com"; see
// dns.ParseDomain), which comes back normalised in AllowDomains. Bad
// entries return errors wrapping policy.ErrBadRule or policy.ErrIPv6Rule;
// they are the client's mistake.
func Parse(allowInternet bool, allowOut, denyOut []string) (Policy, error) {
	p := Policy{AllowInternet: allowInternet}
	var err error
	if p.AllowOut, p.AllowDomains, err = parseList("allowOut", allowOut, true); err != nil {
		return Policy{}, err
	}
	if p.DenyOut, _, err = parseList("denyOut", denyOut, false); err != nil {
		return Policy{}, err
	}
	return p, nil
}

func parseList(field string, entries []string, domainsAllowed bool) (pfxs []netip.Prefix, domains []string, err error) {
	if len(entries) > policy.MaxRulesPerList {
		return nil, nil, fmt.Errorf("%w: %s has %d entries, at most %d are allowed", policy.ErrBadRule, field, len(entries), policy.MaxRulesPerList)
	}
	for _, e := range entries {
		e = strings.TrimSpace(e)
		if !isAddress(e) {
			d, err := dns.ParseDomain(e)
			switch {
			case err != nil:
				return nil, nil, fmt.Errorf("%s: %w: %q is not a CIDR, an IP or a domain (%v)", field, policy.ErrBadRule, e, err)
			case !domainsAllowed:
				return nil, nil, fmt.Errorf("%s: %w: only CIDRs and IPs are accepted, not the domain %q", field, policy.ErrBadRule, e)
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
			return netip.Prefix{}, fmt.Errorf("%w: %q: %v", policy.ErrBadRule, e, err)
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
		return netip.Prefix{}, fmt.Errorf("%w: %q", policy.ErrIPv6Rule, e)
	}
	return pfx, nil
}

// split turns p into its kernel half and its resolver half. p's entries
// are as Parse made them: the domains are not parsed again here, and each
// half validates its own on the way in (policy.Manager's rule checks,
// the resolver's compilation of its rules).
func split(p Policy) (policy.Policy, dns.Rules) {
	pol := policy.Policy{AllowInternet: p.AllowInternet, AllowOut: p.AllowOut, DenyOut: p.DenyOut}
	rules := dns.Rules{Open: p.AllowInternet, Domains: p.AllowDomains}
	for _, d := range p.DenyOut {
		if d.Bits() == 0 {
			rules.Open = false // E2B's way of saying allow_internet_access=false
		}
	}
	return pol, rules
}
