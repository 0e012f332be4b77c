package dns

import (
	"errors"
	"strings"
	"testing"
)

func TestParseDomain(t *testing.T) {
	long63 := strings.Repeat("a", 63)
	// 63+1+63+1+63+1+61 = 253 characters: the longest name allowed.
	max253 := long63 + "." + long63 + "." + long63 + "." + strings.Repeat("b", 57) + ".com"
	for _, tc := range []struct {
		in, want string // want "" means rejected
	}{
		{"example.com", "example.com"},
		{"Example.COM.", "example.com"},
		{"a-b.example.com", "a-b.example.com"},
		{"*.example.com", "*.example.com"},
		{"*.Example.com.", "*.example.com"},
		{"*.a.b.example.com", "*.a.b.example.com"},
		{"xn--bcher-kva.example", "xn--bcher-kva.example"},
		{"1.example.com", "1.example.com"},
		{long63 + ".com", long63 + ".com"},
		{max253, max253},
		{max253 + ".", max253},

		{"", ""},
		{".", ""},
		{"com", ""},                   // one label
		{"*", ""},                     // bare wildcard
		{"*.com", ""},                 // wildcard over a TLD
		{"*.*.a.com", ""},             // second wildcard label
		{"a.*.com", ""},               // wildcard not first
		{"*a.com", ""},                // partial wildcard
		{"a..b", ""},                  // empty label
		{".a.com", ""},                // empty first label
		{"a.com..", ""},               // two trailing dots
		{"-a.com", ""},                // leading hyphen
		{"a-.com", ""},                // trailing hyphen
		{"a_b.com", ""},               // underscore
		{"a b.com", ""},               // space
		{"bücher.de", ""},             // not punycode
		{"\u212Aelvin.com", ""},       // Kelvin sign must not fold to 'k'
		{"1.2.3.4", ""},               // IPv4 address
		{"10.0.0.1.", ""},             // IPv4 address with dot
		{"::1", ""},                   // IPv6 address
		{"example.123", ""},           // numeric TLD
		{long63 + "a.com", ""},        // 64-character label
		{max253 + "x", ""},            // 254 characters
		{"*." + max253[2:] + "x", ""}, // 254 characters with wildcard
	} {
		got, err := ParseDomain(tc.in)
		if tc.want == "" {
			if err == nil {
				t.Errorf("ParseDomain(%q) = %q, want an error", tc.in, got)
			} else if !errors.Is(err, ErrBadDomain) {
				t.Errorf("ParseDomain(%q) error %v does not wrap ErrBadDomain", tc.in, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseDomain(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestMatch(t *testing.T) {
	rules := Rules{Domains: []string{"example.com", "*.wild.org", "*.a.b.net"}}
	for _, tc := range []struct {
		name string
		want bool
	}{
		{"example.com", true},
		{"EXAMPLE.com.", true},
		{"www.example.com", false}, // exact entries do not cover subdomains
		{"example.com.evil.org", false},
		{"xexample.com", false},
		{"x.wild.org", true},
		{"X.Y.Z.wild.org.", true}, // any depth
		{"wild.org", false},       // the wildcard does not cover its apex
		{"wild.org.", false},
		{"xwild.org", false},
		{"c.a.b.net", true},
		{"a.b.net", false},
		{"b.net", false},
		{"", false},
		{".", false},
	} {
		if got := rules.Match(tc.name); got != tc.want {
			t.Errorf("Match(%q) = %v, want %v", tc.name, got, tc.want)
		}
		m, err := compile(rules)
		if err != nil {
			t.Fatal(err)
		}
		if got := m.match(normName(tc.name)); got != tc.want {
			t.Errorf("compiled match(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
	if (Rules{}).Match("example.com") {
		t.Error("empty rules match")
	}
	if _, err := compile(Rules{Domains: []string{"ok.com", "*.com"}}); !errors.Is(err, ErrBadDomain) {
		t.Errorf("compile with a bad entry: %v, want ErrBadDomain", err)
	}
}

func FuzzParseDomain(f *testing.F) {
	for _, s := range []string{"example.com", "*.example.com", "A.B.C.", "*.com", "1.2.3.4", "a..b", "-x.com", "*.*.a.com", "\u212A.com"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDomain(s)
		if err != nil {
			if !errors.Is(err, ErrBadDomain) {
				t.Fatalf("error %v does not wrap ErrBadDomain", err)
			}
			return
		}
		again, err := ParseDomain(d)
		if err != nil || again != d {
			t.Fatalf("ParseDomain(%q) = %q, %v; not a fixed point", d, again, err)
		}
		// The entry matches what it says, through both matchers.
		rules := Rules{Domains: []string{d}}
		m, err := compile(rules)
		if err != nil {
			t.Fatal(err)
		}
		if rest, ok := strings.CutPrefix(d, "*."); ok {
			if !rules.Match("x."+rest) || !m.match("x."+rest) || rules.Match(rest) || m.match(rest) {
				t.Fatalf("wildcard %q matches wrongly", d)
			}
		} else if !rules.Match(strings.ToUpper(d)+".") || !m.match(d) || rules.Match("x."+d) || m.match("x."+d) {
			t.Fatalf("exact %q matches wrongly", d)
		}
	})
}
