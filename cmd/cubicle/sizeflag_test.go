package main

import "testing"

func TestParseSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"512", 512, true}, {"64K", 64 << 10, true}, {"500M", 500 << 20, true}, {"20G", 20 << 30, true},
		{"20GiB", 20 << 30, true}, {"1T", 1 << 40, true}, {"2gb", 2 << 30, true}, {"0", 0, true},
		{"", 0, false}, {"G", 0, false}, {"-1", 0, false}, {"1.5G", 0, false}, {"99999999999T", 0, false}, {"12X", 0, false},
	} {
		got, err := parseSize(c.in)
		if (err == nil) != c.ok || (c.ok && got != c.want) {
			t.Errorf("parseSize(%q) = %d, %v; want %d ok=%v", c.in, got, err, c.want, c.ok)
		}
	}
}
