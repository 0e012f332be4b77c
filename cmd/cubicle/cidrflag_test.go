package main

import (
	"net/netip"
	"slices"
	"testing"
)

func TestParseCIDRs(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want []string // nil: an error
	}{
		{in: nil, want: []string{}},
		{in: []string{"203.0.113.0/24", " 10.1.2.3/8 ", "192.0.2.7", ""}, want: []string{"203.0.113.0/24", "10.0.0.0/8", "192.0.2.7/32"}},
		{in: []string{"::ffff:1.2.3.4/128"}},
		{in: []string{"2001:db8::/32"}},
		{in: []string{"fd00::1"}},
		{in: []string{"300.1.2.3/8"}},
		{in: []string{"example.com"}},
	} {
		got, err := parseCIDRs("deny-cidr", tc.in)
		if tc.want == nil {
			if err == nil {
				t.Errorf("%q: no error, got %v", tc.in, got)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		var want []netip.Prefix
		for _, w := range tc.want {
			want = append(want, netip.MustParsePrefix(w))
		}
		if !slices.Equal(got, want) {
			t.Errorf("%q: got %v, want %v", tc.in, got, want)
		}
	}
}
