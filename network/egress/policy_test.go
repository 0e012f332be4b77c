package egress

import (
	"encoding/json"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/cubicle-dev/cubicle/network/dns"
	"github.com/cubicle-dev/cubicle/network/policy"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name        string
		allow, deny []string
		wantAllow   []string
		wantDeny    []string
		wantDomains []string
		wantErr     error
	}{
		{"cidr and bare ip", []string{"10.0.0.0/8", "1.1.1.1"}, []string{"0.0.0.0/0"},
			[]string{"10.0.0.0/8", "1.1.1.1/32"}, []string{"0.0.0.0/0"}, nil, nil},
		{"host bits masked", []string{"10.1.2.3/8"}, nil, []string{"10.0.0.0/8"}, nil, nil, nil},
		{"mapped v4", []string{"::ffff:1.2.3.4"}, nil, []string{"1.2.3.4/32"}, nil, nil, nil},
		{"domains apart, normalised", []string{"Example.COM.", "1.1.1.1", "*.pypi.org"}, nil,
			[]string{"1.1.1.1/32"}, nil, []string{"example.com", "*.pypi.org"}, nil},
		{"domain in denyOut", nil, []string{"example.com"}, nil, nil, nil, policy.ErrBadRule},
		{"wildcard of a TLD", []string{"*.com"}, nil, nil, nil, nil, policy.ErrBadRule},
		{"garbage", []string{"not an ip"}, nil, nil, nil, nil, policy.ErrBadRule},
		{"bad IPv4", []string{"300.1.2.3"}, nil, nil, nil, nil, policy.ErrBadRule},
		{"bad cidr", []string{"10.0.0.0/33"}, nil, nil, nil, nil, policy.ErrBadRule},
		{"ipv6", nil, []string{"2001:db8::/32"}, nil, nil, nil, policy.ErrIPv6Rule},
		{"too many", make([]string, policy.MaxRulesPerList+1), nil, nil, nil, nil, policy.ErrBadRule},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, internet := range []bool{true, false} {
				p, err := Parse(internet, tt.allow, tt.deny)
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err %v, want %v", err, tt.wantErr)
				}
				if err != nil {
					return
				}
				if p.AllowInternet != internet {
					t.Errorf("AllowInternet %v, want %v", p.AllowInternet, internet)
				}
				if !slices.Equal(str(p.AllowOut), tt.wantAllow) || !slices.Equal(str(p.DenyOut), tt.wantDeny) {
					t.Errorf("got allow %v deny %v, want %v %v", p.AllowOut, p.DenyOut, tt.wantAllow, tt.wantDeny)
				}
				if !slices.Equal(p.AllowDomains, tt.wantDomains) {
					t.Errorf("got domains %v, want %v", p.AllowDomains, tt.wantDomains)
				}
			}
		})
	}
}

func str(ps []netip.Prefix) []string {
	var s []string
	for _, p := range ps {
		s = append(s, p.String())
	}
	return s
}

// TestPolicyJSON pins the JSON form the store keeps: records written
// when the type was runtime.Egress read back as the same policy.
func TestPolicyJSON(t *testing.T) {
	const old = `{"allowInternet":false,"allowOut":["10.0.0.0/8","1.1.1.1/32"],"allowDomains":["example.com","*.pypi.org"],"denyOut":["0.0.0.0/0"]}`
	var p Policy
	if err := json.Unmarshal([]byte(old), &p); err != nil {
		t.Fatal(err)
	}
	want, err := Parse(false, []string{"10.0.0.0/8", "1.1.1.1", "example.com", "*.pypi.org"}, []string{"0.0.0.0/0"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(str(p.AllowOut), str(want.AllowOut)) || !slices.Equal(str(p.DenyOut), str(want.DenyOut)) ||
		!slices.Equal(p.AllowDomains, want.AllowDomains) || p.AllowInternet {
		t.Errorf("read back %+v, want %+v", p, want)
	}
	b, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != old {
		t.Errorf("written as %s, want %s", b, old)
	}
	if b, _ := json.Marshal(Default); string(b) != `{"allowInternet":true}` {
		t.Errorf("Default written as %s", b)
	}
}

// TestSplit: the two halves get what Parse made, without a second parse;
// denyOut 0.0.0.0/0 closes the resolver as allow_internet_access=false
// does.
func TestSplit(t *testing.T) {
	p, err := Parse(true, []string{"203.0.113.0/24", "Example.COM"}, []string{"0.0.0.0/0"})
	if err != nil {
		t.Fatal(err)
	}
	pol, rules := split(p)
	if !pol.AllowInternet || !slices.Equal(str(pol.AllowOut), []string{"203.0.113.0/24"}) || !slices.Equal(str(pol.DenyOut), []string{"0.0.0.0/0"}) {
		t.Errorf("kernel half %+v", pol)
	}
	if rules.Open || !slices.Equal(rules.Domains, []string{"example.com"}) {
		t.Errorf("resolver half %+v", rules)
	}
	if _, rules := split(Default); !rules.Open || len(rules.Domains) != 0 {
		t.Errorf("Default's resolver half %+v", rules)
	}
}

// FuzzParse: whatever a client sends, Parse either refuses it with one of
// its errors or returns a policy both halves accept: IPv4 prefixes in
// canonical (masked) form and domains in dns.ParseDomain's normal form.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8", "1.1.1.1", "*.pypi.org", "Example.COM.", "::ffff:1.2.3.4", "2001:db8::/32", "300.1.2.3", " 8.8.8.8 ", "*.com", ""} {
		f.Add(s, "0.0.0.0/0")
	}
	f.Fuzz(func(t *testing.T, allow, deny string) {
		p, err := Parse(true, strings.Split(allow, ","), strings.Split(deny, ","))
		if err != nil {
			if !errors.Is(err, policy.ErrBadRule) && !errors.Is(err, policy.ErrIPv6Rule) {
				t.Fatalf("unexpected error type: %v", err)
			}
			return
		}
		for _, pfx := range append(slices.Clone(p.AllowOut), p.DenyOut...) {
			if !pfx.Addr().Is4() || pfx != pfx.Masked() {
				t.Fatalf("prefix %v is not a masked IPv4 prefix", pfx)
			}
		}
		for _, d := range p.AllowDomains {
			if n, err := dns.ParseDomain(d); err != nil || n != d {
				t.Fatalf("domain %q is not in normal form (%q, %v)", d, n, err)
			}
		}
	})
}
