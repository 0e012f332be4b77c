package policy

import (
	"errors"
	"fmt"
	"net/netip"
)

// MaxRulesPerList bounds AllowOut and DenyOut each, so one sandbox cannot
// fill the shared rule maps (whose size is Options.MaxRules).
const MaxRulesPerList = 1024

var (
	// ErrBadRule is returned for lists longer than MaxRulesPerList, and
	// wrapped by egress.Parse for an entry that is neither a CIDR, an IP
	// nor a domain and for a domain in denyOut (E2B allows only CIDRs and
	// IPs there).
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
// package documentation). Prefixes must be IPv4; egress.Parse builds them
// from API input.
type Policy struct {
	AllowInternet bool
	AllowOut      []netip.Prefix
	DenyOut       []netip.Prefix
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
