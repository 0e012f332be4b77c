package buildspec

import (
	"fmt"
	"path"
	"slices"
	"strings"
)

// State is what a step sees of the steps before it: the environment, the
// working directory and the user. RUN runs as User (or its own user arg)
// in Workdir with Env; COPY writes as User into Dest resolved against
// Workdir. The template's sandboxes start with the final State.
type State struct {
	// Env holds the variables, in the order they were first set. The base
	// image's configured environment seeds it.
	Env []EnvVar
	// Workdir is absolute, or "" for "the home directory of User" (E2B's
	// default). A relative WORKDIR given while Workdir is "" stays
	// relative, and is resolved against that home directory.
	Workdir string
	// User is the user name (or uid) steps run as; "" means root.
	User string
	// Sudo records that a USER step asked for User to be a sudoer.
	Sudo bool
}

// EnvVar is one environment variable.
type EnvVar struct{ Name, Value string }

// Lookup returns the value of name.
func (s State) Lookup(name string) (string, bool) {
	for _, e := range s.Env {
		if e.Name == name {
			return e.Value, true
		}
	}
	return "", false
}

// Environ returns the environment as NAME=value strings.
func (s State) Environ() []string {
	out := make([]string, len(s.Env))
	for i, e := range s.Env {
		out[i] = e.Name + "=" + e.Value
	}
	return out
}

// Set returns s with name set to value (replacing it in place if present).
func (s State) Set(name, value string) State {
	env := slices.Clone(s.Env)
	for i := range env {
		if env[i].Name == name {
			env[i].Value = value
			s.Env = env
			return s
		}
	}
	s.Env = append(env, EnvVar{name, value})
	return s
}

// Apply returns the state after step, whose args it expands against s.
// RUN and COPY leave the state as it was (a RUN's user arg applies to that
// step only). The step must be valid.
func (s State) Apply(st Step) (State, error) {
	switch st.Type {
	case Env:
		next := s
		for i := 0; i+1 < len(st.Args); i += 2 {
			// Every pair expands against the state before the step, as
			// Docker does for `ENV a=1 b=$a` (b sees the old a).
			v, err := s.Expand(st.Args[i+1])
			if err != nil {
				return s, fmt.Errorf("ENV %s: %w", st.Args[i], err)
			}
			next = next.Set(st.Args[i], v)
		}
		return next, nil
	case Workdir:
		w, err := s.Expand(st.Args[0])
		if err != nil {
			return s, fmt.Errorf("WORKDIR: %w", err)
		}
		if w == "" {
			return s, fmt.Errorf("WORKDIR %q expands to nothing", st.Args[0])
		}
		s.Workdir = s.ResolvePath(w)
		return s, nil
	case User:
		u, err := s.Expand(st.Args[0])
		if err != nil {
			return s, fmt.Errorf("USER: %w", err)
		}
		if err := checkUser("USER", u); err != nil {
			return s, fmt.Errorf("USER %q expands to %q: %w", st.Args[0], u, err)
		}
		s.User = u
		s.Sudo = len(st.Args) == 2 && st.Args[1] == "true"
		return s, nil
	}
	return s, nil
}

// ResolvePath makes p absolute against Workdir. When Workdir is "" (the
// user's home, not known here) a relative p stays relative and cleaned.
func (s State) ResolvePath(p string) string {
	if path.IsAbs(p) {
		return path.Clean(p)
	}
	if s.Workdir == "" {
		return path.Clean(p)
	}
	return path.Join(s.Workdir, p)
}

// RunUser is the user a RUN step runs as.
func (s State) RunUser(st Step) string {
	if st.Type == Run && len(st.Args) == 2 && st.Args[1] != "" {
		return st.Args[1]
	}
	if s.User == "" {
		return "root"
	}
	return s.User
}

// Expand substitutes variables in word the way a shell does inside double
// quotes, limited to what needs no shell: $NAME, ${NAME}, ${NAME:-word},
// ${NAME-word}, ${NAME:+word}, ${NAME+word}. \$ and \\ stand for $ and \;
// any other backslash is kept. An unset variable expands to "". A $ not
// followed by a name or { is literal. Command substitution is not
// performed: $(...) is an error rather than a silent difference from E2B,
// whose builder runs the value through the sandbox's shell.
func (s State) Expand(word string) (string, error) {
	var b strings.Builder
	if err := s.expand(&b, word, 0); err != nil {
		return "", err
	}
	return b.String(), nil
}

func (s State) expand(b *strings.Builder, w string, depth int) error {
	if depth > 8 {
		return fmt.Errorf("variable references nested too deeply in %q", clip(w))
	}
	for i := 0; i < len(w); i++ {
		c := w[i]
		switch {
		case c == '\\' && i+1 < len(w) && (w[i+1] == '$' || w[i+1] == '\\'):
			b.WriteByte(w[i+1])
			i++
		case c == '$' && i+1 < len(w) && w[i+1] == '{':
			end := matchBrace(w, i+2)
			if end < 0 {
				return fmt.Errorf("unterminated ${ in %q", clip(w))
			}
			if err := s.expandBraced(b, w[i+2:end], depth); err != nil {
				return err
			}
			i = end
		case c == '$' && i+1 < len(w) && w[i+1] == '(':
			return fmt.Errorf("command substitution $(...) is not supported in %q", clip(w))
		case c == '$' && i+1 < len(w) && isNameStart(w[i+1]):
			j := i + 1
			for j < len(w) && isNameChar(w[j]) {
				j++
			}
			v, _ := s.Lookup(w[i+1 : j])
			b.WriteString(v)
			i = j - 1
		default:
			b.WriteByte(c)
		}
	}
	return nil
}

// matchBrace returns the index of the } closing a ${ whose body starts at
// i, allowing nested ${...} in the word part.
func matchBrace(w string, i int) int {
	depth := 1
	for ; i < len(w); i++ {
		switch {
		case w[i] == '\\' && i+1 < len(w):
			i++
		case w[i] == '$' && i+1 < len(w) && w[i+1] == '{':
			depth++
			i++
		case w[i] == '}':
			depth--
			if depth == 0 {
				return i
			}
		}
	}
	return -1
}

func (s State) expandBraced(b *strings.Builder, body string, depth int) error {
	j := 0
	for j < len(body) && isNameChar(body[j]) {
		j++
	}
	name, rest := body[:j], body[j:]
	if name == "" || !isNameStart(name[0]) {
		return fmt.Errorf("bad substitution ${%s}", clip(body))
	}
	v, set := s.Lookup(name)
	if rest == "" {
		b.WriteString(v)
		return nil
	}
	colon := strings.HasPrefix(rest, ":")
	op := strings.TrimPrefix(rest, ":")
	if op == "" {
		return fmt.Errorf("bad substitution ${%s}", clip(body))
	}
	word := op[1:]
	empty := !set || (colon && v == "")
	switch op[0] {
	case '-':
		if empty {
			return s.expand(b, word, depth+1)
		}
		b.WriteString(v)
	case '+':
		if !empty {
			return s.expand(b, word, depth+1)
		}
	default:
		return fmt.Errorf("unsupported substitution ${%s} (only :- and :+ are)", clip(body))
	}
	return nil
}

func isNameStart(c byte) bool {
	return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
}

func isNameChar(c byte) bool { return isNameStart(c) || (c >= '0' && c <= '9') }
