package dockerfile

import (
	"fmt"
	"strings"
)

// A word of a Dockerfile instruction is processed as Docker's shell lexer
// does: quotes removed ('...' literal, "..." with \" \$ \\ escapes), the
// escape character outside quotes taking the next character literally, and
// $NAME / ${NAME} / ${NAME:-word} / ${NAME:+word} / ${NAME-word} /
// ${NAME+word} references. The result is kept as pieces (literal text and
// references) so it can be rendered two ways: as a build-spec word, whose
// references the server expands against the build's real environment
// (buildspec.State.Expand), or as a final literal where the client must
// know the value (a COPY source, the FROM image).
type piece struct {
	lit  string
	ref  string  // variable name; "" for a literal piece
	op   string  // "", "-", ":-", "+", ":+"
	word []piece // the word of an op
}

// parseWord lexes one word.
func parseWord(w string, esc byte) ([]piece, error) {
	p := &wordParser{s: w, esc: esc}
	out, err := p.parse(false)
	if err != nil {
		return nil, err
	}
	return out, nil
}

type wordParser struct {
	s   string
	i   int
	esc byte
}

// parse reads pieces until the end, or until an unmatched } when inBrace.
func (p *wordParser) parse(inBrace bool) ([]piece, error) {
	var out []piece
	var lit strings.Builder
	flush := func() {
		if lit.Len() > 0 {
			out = append(out, piece{lit: lit.String()})
			lit.Reset()
		}
	}
	for p.i < len(p.s) {
		c := p.s[p.i]
		switch {
		case inBrace && c == '}':
			flush()
			return out, nil
		case c == p.esc:
			p.i++
			if p.i < len(p.s) {
				lit.WriteByte(p.s[p.i])
				p.i++
			} else {
				lit.WriteByte(c)
			}
		case c == '\'':
			end := strings.IndexByte(p.s[p.i+1:], '\'')
			if end < 0 {
				return nil, fmt.Errorf("unterminated single quote in %q", p.s)
			}
			lit.WriteString(p.s[p.i+1 : p.i+1+end])
			p.i += end + 2
		case c == '"':
			p.i++
			closed := false
			for p.i < len(p.s) {
				d := p.s[p.i]
				if d == '"' {
					p.i++
					closed = true
					break
				}
				if d == p.esc && p.i+1 < len(p.s) && strings.IndexByte(`"$`+string(p.esc), p.s[p.i+1]) >= 0 {
					lit.WriteByte(p.s[p.i+1])
					p.i += 2
					continue
				}
				if d == '$' {
					flush()
					ref, ok, err := p.dollar()
					if err != nil {
						return nil, err
					}
					if ok {
						out = append(out, ref)
						continue
					}
					lit.WriteByte('$')
					p.i++
					continue
				}
				lit.WriteByte(d)
				p.i++
			}
			if !closed {
				return nil, fmt.Errorf("unterminated double quote in %q", p.s)
			}
		case c == '$':
			flush()
			ref, ok, err := p.dollar()
			if err != nil {
				return nil, err
			}
			if ok {
				out = append(out, ref)
				continue
			}
			lit.WriteByte('$')
			p.i++
		default:
			lit.WriteByte(c)
			p.i++
		}
	}
	if inBrace {
		return nil, fmt.Errorf("unterminated ${ in %q", p.s)
	}
	flush()
	return out, nil
}

// dollar parses a reference at p.i (which holds '$'); ok is false for a
// '$' that starts none.
func (p *wordParser) dollar() (piece, bool, error) {
	s, i := p.s, p.i+1
	if i < len(s) && isNameStart(s[i]) {
		j := i
		for j < len(s) && isNameChar(s[j]) {
			j++
		}
		p.i = j
		return piece{ref: s[i:j]}, true, nil
	}
	if i >= len(s) || s[i] != '{' {
		return piece{}, false, nil
	}
	j := i + 1
	for j < len(s) && isNameChar(s[j]) {
		j++
	}
	name := s[i+1 : j]
	if name == "" || !isNameStart(name[0]) {
		return piece{}, false, fmt.Errorf("bad substitution in %q", s)
	}
	if j < len(s) && s[j] == '}' {
		p.i = j + 1
		return piece{ref: name}, true, nil
	}
	op := ""
	for _, o := range []string{":-", ":+", "-", "+"} {
		if strings.HasPrefix(s[j:], o) {
			op = o
			break
		}
	}
	if op == "" {
		return piece{}, false, fmt.Errorf("unsupported substitution in %q (only ${NAME}, ${NAME:-word} and ${NAME:+word} are)", s)
	}
	p.i = j + len(op)
	word, err := p.parse(true)
	if err != nil {
		return piece{}, false, err
	}
	p.i++ // the }
	return piece{ref: name, op: op, word: word}, true, nil
}

// spec renders pieces as a build-spec word: literal $ and \ escaped,
// references kept for the server to expand.
func spec(ps []piece) string {
	var b strings.Builder
	for _, p := range ps {
		if p.ref == "" {
			for i := 0; i < len(p.lit); i++ {
				if c := p.lit[i]; c == '$' || c == '\\' {
					b.WriteByte('\\')
				}
				b.WriteByte(p.lit[i])
			}
			continue
		}
		b.WriteString("${" + p.ref)
		if p.op != "" {
			b.WriteString(p.op + spec(p.word))
		}
		b.WriteString("}")
	}
	return b.String()
}

// literal renders pieces with every reference resolved by lookup, which
// reports known=false for a variable whose value the client cannot know.
func literal(ps []piece, lookup func(string) (val string, set, known bool)) (string, error) {
	var b strings.Builder
	for _, p := range ps {
		if p.ref == "" {
			b.WriteString(p.lit)
			continue
		}
		v, set, known := lookup(p.ref)
		if !known {
			return "", fmt.Errorf("$%s is not known when the Dockerfile is read (declare it with ARG)", p.ref)
		}
		empty := !set || (strings.HasPrefix(p.op, ":") && v == "")
		switch p.op {
		case "":
			b.WriteString(v)
		case "-", ":-":
			if empty {
				w, err := literal(p.word, lookup)
				if err != nil {
					return "", err
				}
				b.WriteString(w)
			} else {
				b.WriteString(v)
			}
		case "+", ":+":
			if !empty {
				w, err := literal(p.word, lookup)
				if err != nil {
					return "", err
				}
				b.WriteString(w)
			}
		}
	}
	return b.String(), nil
}

// fields splits s on blanks outside quotes, keeping each field's quotes
// and escapes for parseWord.
func fields(s string, esc byte) ([]string, error) {
	var out []string
	var cur strings.Builder
	in := false
	var quote byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote != 0:
			cur.WriteByte(c)
			if c == esc && quote == '"' && i+1 < len(s) {
				i++
				cur.WriteByte(s[i])
			} else if c == quote {
				quote = 0
			}
		case c == esc:
			in = true
			cur.WriteByte(c)
			if i+1 < len(s) {
				i++
				cur.WriteByte(s[i])
			}
		case c == '\'' || c == '"':
			in = true
			quote = c
			cur.WriteByte(c)
		case c == ' ' || c == '\t' || c == '\n':
			if in {
				out = append(out, cur.String())
				cur.Reset()
				in = false
			}
		default:
			in = true
			cur.WriteByte(c)
		}
	}
	if quote != 0 {
		return nil, fmt.Errorf("unterminated %c quote", quote)
	}
	if in {
		out = append(out, cur.String())
	}
	return out, nil
}

// shellQuote quotes s for a POSIX shell, leaving it bare when it is safe.
func shellQuote(s string) string {
	if s == "" {
		return "''"
	}
	safe := true
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(isNameChar(c) || strings.IndexByte("-./:=@%+,", c) >= 0) {
			safe = false
			break
		}
	}
	if safe {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// shellJoin quotes each argument and joins them: an exec-form command
// as one shell command line with the same argv.
func shellJoin(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		q[i] = shellQuote(a)
	}
	return strings.Join(q, " ")
}
