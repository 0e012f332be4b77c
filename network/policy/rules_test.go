package policy

import (
	"errors"
	"net/netip"
	"slices"
	"testing"
)

func TestParseRules(t *testing.T) {
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
		{"domain in denyOut", nil, []string{"example.com"}, nil, nil, nil, ErrBadRule},
		{"wildcard of a TLD", []string{"*.com"}, nil, nil, nil, nil, ErrBadRule},
		{"garbage", []string{"not an ip"}, nil, nil, nil, nil, ErrBadRule},
		{"bad IPv4", []string{"300.1.2.3"}, nil, nil, nil, nil, ErrBadRule},
		{"bad cidr", []string{"10.0.0.0/33"}, nil, nil, nil, nil, ErrBadRule},
		{"ipv6", nil, []string{"2001:db8::/32"}, nil, nil, nil, ErrIPv6Rule},
		{"too many", make([]string, MaxRulesPerList+1), nil, nil, nil, nil, ErrBadRule},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, domains, err := ParseRules(tt.allow, tt.deny)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if !p.AllowInternet {
				t.Error("AllowInternet false; the caller sets it")
			}
			str := func(ps []netip.Prefix) []string {
				var s []string
				for _, p := range ps {
					s = append(s, p.String())
				}
				return s
			}
			if !slices.Equal(str(p.AllowOut), tt.wantAllow) || !slices.Equal(str(p.DenyOut), tt.wantDeny) {
				t.Errorf("got allow %v deny %v, want %v %v", p.AllowOut, p.DenyOut, tt.wantAllow, tt.wantDeny)
			}
			if !slices.Equal(domains, tt.wantDomains) {
				t.Errorf("got domains %v, want %v", domains, tt.wantDomains)
			}
		})
	}
}
