package dockerfile

import (
	"strings"
	"testing"
)

func TestExpandBraces(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string
		err  bool
	}{
		{in: "a", want: "a"},
		{in: "{a,b}.txt", want: "a.txt b.txt"},
		{in: "x{a,{b,c}}y", want: "xay xby xcy"},
		{in: "{a}", want: "{a}"},
		{in: `\{a,b}`, want: `\{a,b}`},
		{in: "{a,b}{c,d}", want: "ac ad bc bd"},
		{in: "{1..3}", err: true},
		{in: strings.Repeat("{a,b}", 40), err: true},
	} {
		got, err := expandBraces(tc.in)
		if tc.err {
			if err == nil {
				t.Errorf("expandBraces(%q) = %d alternatives, want an error", tc.in, len(got))
			}
			continue
		}
		if err != nil || strings.Join(got, " ") != tc.want {
			t.Errorf("expandBraces(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestIgnoreMatch(t *testing.T) {
	ig, err := newIgnore([]string{"*.log", "node_modules", "build/**", "./tmp/", "/abs/x", "a/**/b"}, "/ctx")
	if err != nil {
		t.Fatal(err)
	}
	for rel, want := range map[string][2]bool{ // ignored, childrenIgnored
		"x.log":          {true, false},
		"sub/x.log":      {false, false}, // no basename matching
		"node_modules":   {true, false},
		"node_modules/a": {false, false}, // without /** the children stay
		"build":          {true, true},
		"build/out":      {true, true},
		"tmp":            {true, false},
		"a/b":            {true, false},
		"a/x/y/b":        {true, false},
		"abs/x":          {false, false},
	} {
		f := File{Rel: rel, Full: "/ctx/" + rel}
		if got := [2]bool{ig.ignored(f), ig.childrenIgnored(f)}; got != want {
			t.Errorf("%s: ignored, childrenIgnored = %v, want %v", rel, got, want)
		}
	}
	abs := File{Rel: "x", Full: "/abs/x"}
	if !ig.ignored(abs) {
		t.Error("absolute pattern does not match the full path")
	}
	if _, err := newIgnore([]string{"+(a|b)"}, "/"); err == nil {
		t.Error("extglob accepted")
	}
}
