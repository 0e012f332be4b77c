package buildspec

import (
	"strings"
	"testing"
)

func TestExpand(t *testing.T) {
	s := State{Env: []EnvVar{{"HOME", "/home/user"}, {"PATH", "/usr/bin:/bin"}, {"EMPTY", ""}}}
	for _, tc := range []struct{ in, want, err string }{
		{in: "plain", want: "plain"},
		{in: "$HOME/x", want: "/home/user/x"},
		{in: "/opt/bin:$PATH", want: "/opt/bin:/usr/bin:/bin"},
		{in: "${HOME}x", want: "/home/userx"},
		{in: "$UNSET-x", want: "-x"},
		{in: "${UNSET:-dflt}", want: "dflt"},
		{in: "${EMPTY:-dflt}", want: "dflt"},
		{in: "${EMPTY-dflt}", want: ""},
		{in: "${UNSET-dflt}", want: "dflt"},
		{in: "${HOME:+set}", want: "set"},
		{in: "${UNSET:+set}", want: ""},
		{in: "${UNSET:-${HOME}/d}", want: "/home/user/d"},
		{in: `\$HOME`, want: "$HOME"},
		{in: `a\\b`, want: `a\b`},
		{in: `a\nb`, want: `a\nb`},
		{in: "cost $5 and $", want: "cost $5 and $"},
		{in: "${", err: "unterminated"},
		{in: "${1x}", err: "bad substitution"},
		{in: "${HOME/a/b}", err: "unsupported substitution"},
		{in: "${HOME:}", err: "bad substitution"},
		{in: "$(id -u)", err: "command substitution"},
	} {
		got, err := s.Expand(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("Expand(%q) = %q, %v; want error %q", tc.in, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("Expand(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestApply(t *testing.T) {
	s := State{Env: []EnvVar{{"PATH", "/bin"}}}
	steps := []Step{
		{Type: Env, Args: []string{"PATH", "/opt/bin:$PATH", "A", "$PATH"}},
		{Type: Workdir, Args: []string{"/srv"}},
		{Type: Workdir, Args: []string{"app/../web"}},
		{Type: Env, Args: []string{"U", "builder"}},
		{Type: User, Args: []string{"$U", "true"}},
		{Type: Run, Args: []string{"make", "root"}},
		{Type: Copy, Args: []string{"a", "b"}, FilesHash: hashA},
	}
	var err error
	for _, st := range steps {
		if s, err = s.Apply(st); err != nil {
			t.Fatal(err)
		}
	}
	if v, _ := s.Lookup("PATH"); v != "/opt/bin:/bin" {
		t.Errorf("PATH = %q", v)
	}
	// Pairs of one ENV step see the state before the step.
	if v, _ := s.Lookup("A"); v != "/bin" {
		t.Errorf("A = %q", v)
	}
	if s.Workdir != "/srv/web" || s.User != "builder" || !s.Sudo {
		t.Errorf("state %+v", s)
	}
	if got := s.RunUser(steps[5]); got != "root" {
		t.Errorf("RUN user = %q", got)
	}
	if got := s.RunUser(Step{Type: Run, Args: []string{"x"}}); got != "builder" {
		t.Errorf("RUN user = %q", got)
	}
	if got := s.ResolvePath("data"); got != "/srv/web/data" {
		t.Errorf("ResolvePath = %q", got)
	}
	if got := strings.Join(s.Environ(), " "); got != "PATH=/opt/bin:/bin A=/bin U=builder" {
		t.Errorf("Environ = %q", got)
	}
	// With no WORKDIR yet a relative one stays relative (the user's home).
	if s2, _ := (State{}).Apply(Step{Type: Workdir, Args: []string{"./proj"}}); s2.Workdir != "proj" {
		t.Errorf("relative workdir = %q", s2.Workdir)
	}
	// A USER that expands to nothing is refused.
	if _, err := (State{}).Apply(Step{Type: User, Args: []string{"$NOPE"}}); err == nil {
		t.Error("USER expanding to nothing was accepted")
	}
}

func TestStepKey(t *testing.T) {
	base := BaseKey("image:sha256:aaaa")
	st := State{User: "user", Workdir: "/w", Env: []EnvVar{{"A", "1"}, {"B", "2"}}}
	run := Step{Type: Run, Args: []string{"make"}}
	cp := Step{Type: Copy, Args: []string{"a", "/b", "", ""}, FilesHash: hashA}
	k := StepKey(base, st, run, "")

	same := []struct {
		name string
		key  string
	}{
		{"identical", StepKey(base, st, run, "")},
		{"force", StepKey(base, st, Step{Type: Run, Args: []string{"make"}, Force: true}, "")},
		{"lower-case type", StepKey(base, st, Step{Type: "run", Args: []string{"make"}}, "")},
		{"env order", StepKey(base, State{User: "user", Workdir: "/w", Env: []EnvVar{{"B", "2"}, {"A", "1"}}}, run, "")},
	}
	for _, c := range same {
		if c.key != k {
			t.Errorf("%s: key changed", c.name)
		}
	}
	differ := map[string]string{
		"parent":          StepKey(BaseKey("image:sha256:bbbb"), st, run, ""),
		"args":            StepKey(base, st, Step{Type: Run, Args: []string{"make "}}, ""),
		"arg split":       StepKey(base, st, Step{Type: Run, Args: []string{"ma", "ke"}}, ""),
		"run user":        StepKey(base, st, Step{Type: Run, Args: []string{"make", "root"}}, ""),
		"user":            StepKey(base, State{User: "root", Workdir: "/w", Env: st.Env}, run, ""),
		"workdir":         StepKey(base, State{User: "user", Workdir: "/x", Env: st.Env}, run, ""),
		"env value":       StepKey(base, State{User: "user", Workdir: "/w", Env: []EnvVar{{"A", "1"}, {"B", "3"}}}, run, ""),
		"env boundary":    StepKey(base, State{User: "user", Workdir: "/w", Env: []EnvVar{{"A", "12"}, {"B", ""}}}, run, ""),
		"sudo":            StepKey(base, State{User: "user", Workdir: "/w", Env: st.Env, Sudo: true}, run, ""),
		"copy":            StepKey(base, st, cp, "d1"),
		"copy digest":     StepKey(base, st, cp, "d2"),
		"copy files hash": StepKey(base, st, Step{Type: Copy, Args: cp.Args, FilesHash: strings.Repeat("f", 64)}, "d1"),
	}
	seen := map[string]string{k: "original"}
	for name, key := range differ {
		if prev, dup := seen[key]; dup {
			t.Errorf("%s: key equals that of %s", name, prev)
		}
		seen[key] = name
	}
	if FinalKey(k, st, "a", "b") == FinalKey(k, st, "a", "c") || FinalKey(k, st, "ab", "") == FinalKey(k, st, "a", "b") {
		t.Error("FinalKey ignores its commands")
	}
}
