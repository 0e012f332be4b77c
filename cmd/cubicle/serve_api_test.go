package main

import (
	"fmt"
	"testing"
)

func TestAPIOptions(t *testing.T) {
	for _, tc := range []struct {
		cors, trusted string
		want          string
		ok            bool
	}{
		{"*", "", "[*] []", true},
		{"", "", "[] []", true},
		{"https://a.example, http://localhost:5173", "10.0.0.0/8, 192.0.2.7", "[https://a.example http://localhost:5173] [10.0.0.0/8 192.0.2.7/32]", true},
		{"a.example", "", "", false},
		{"*", "10.0.0.0/33", "", false},
		{"*", "proxy.example", "", false},
	} {
		o, p, err := serveConfig{corsOrigins: tc.cors, trustedProxies: tc.trusted}.apiOptions()
		if tc.ok != (err == nil) || (tc.ok && fmt.Sprint(o, p) != tc.want) {
			t.Errorf("apiOptions(%q, %q) = %v %v, %v", tc.cors, tc.trusted, o, p, err)
		}
	}
}
