package dockerfile

import (
	"fmt"
	"strings"
)

// line is one logical Dockerfile instruction: continuations joined,
// comments inside them dropped, with its first physical line number.
type line struct {
	no      int
	keyword string // upper case
	rest    string // everything after the keyword, leading blanks removed
	heredoc []heredoc
}

type heredoc struct {
	name   string
	body   string
	quoted bool // <<'EOF' or <<"EOF": no expansion (for RUN the shell sees it quoted anyway)
	chomp  bool // <<-EOF: leading tabs stripped
}

// directives are the parser directives at the top of a Dockerfile.
type directives struct {
	escape byte
}

// split turns the Dockerfile text into logical lines. It handles parser
// directives (escape, syntax and check are recognized; syntax and check are
// ignored), comments, blank lines, line continuations with the escape
// character, and RUN heredocs.
func split(text string) ([]line, directives, error) {
	text = strings.TrimPrefix(text, "\ufeff")
	phys := strings.Split(strings.ReplaceAll(text, "\r\n", "\n"), "\n")
	d := directives{escape: '\\'}

	i := 0
	// Parser directives: "# key=value" lines before anything else.
	seen := map[string]bool{}
	for ; i < len(phys); i++ {
		s := strings.TrimSpace(phys[i])
		if !strings.HasPrefix(s, "#") {
			break
		}
		k, v, ok := strings.Cut(strings.TrimSpace(s[1:]), "=")
		k = strings.ToLower(strings.TrimSpace(k))
		if !ok || strings.ContainsAny(k, " \t") || k == "" {
			break
		}
		v = strings.TrimSpace(v)
		if seen[k] {
			return nil, d, &Error{Line: i + 1, Msg: fmt.Sprintf("parser directive %q is given twice", k)}
		}
		seen[k] = true
		switch k {
		case "escape":
			if v != `\` && v != "`" {
				return nil, d, &Error{Line: i + 1, Msg: fmt.Sprintf("escape directive must be \\ or `, not %q", v)}
			}
			d.escape = v[0]
		case "syntax", "check":
			// A frontend image or lint settings: nothing to do here.
		default:
			// Not a known directive: a comment, and directives end here.
			i++
			goto body
		}
	}
body:
	var out []line
	for i < len(phys) {
		s := strings.TrimLeft(phys[i], " \t")
		if s == "" || s[0] == '#' {
			i++
			continue
		}
		l := line{no: i + 1}
		var b strings.Builder
		for {
			cur := phys[i]
			i++
			trimmed := strings.TrimRight(cur, " \t")
			if strings.HasSuffix(trimmed, string(d.escape)) {
				b.WriteString(trimmed[:len(trimmed)-1])
				// Skip comment and empty lines inside a continuation.
				for i < len(phys) {
					t := strings.TrimLeft(phys[i], " \t")
					if t == "" || t[0] == '#' {
						i++
						continue
					}
					break
				}
				if i < len(phys) {
					continue
				}
				break
			}
			b.WriteString(cur)
			break
		}
		full := strings.TrimSpace(b.String())
		kw, rest, _ := strings.Cut(full, " ")
		if k2, r2, ok := strings.Cut(full, "\t"); ok && len(k2) < len(kw) {
			kw, rest = k2, r2
		}
		l.keyword = strings.ToUpper(kw)
		l.rest = strings.TrimLeft(rest, " \t")

		// Heredocs: only for RUN, the bodies follow the instruction line.
		if l.keyword == "RUN" {
			names, err := heredocNames(l.rest)
			if err != nil {
				return nil, d, &Error{Line: l.no, Msg: err.Error()}
			}
			for _, h := range names {
				var body strings.Builder
				found := false
				for i < len(phys) {
					ln := phys[i]
					i++
					check := ln
					if h.chomp {
						check = strings.TrimLeft(ln, "\t")
					}
					if check == h.name {
						found = true
						break
					}
					if h.chomp {
						ln = strings.TrimLeft(ln, "\t")
					}
					body.WriteString(ln)
					body.WriteByte('\n')
				}
				if !found {
					return nil, d, &Error{Line: l.no, Msg: fmt.Sprintf("heredoc <<%s is not closed by a line %q", h.name, h.name)}
				}
				h.body = body.String()
				l.heredoc = append(l.heredoc, h)
			}
		} else if l.keyword == "COPY" || l.keyword == "ADD" {
			if hs, _ := heredocNames(l.rest); len(hs) > 0 {
				return nil, d, &Error{Line: l.no, Msg: l.keyword + " with a heredoc is not supported; write the file in the context directory"}
			}
		}
		out = append(out, l)
	}
	return out, d, nil
}

// heredocNames finds <<NAME, <<-NAME, <<"NAME" and <<'NAME' markers in a
// RUN line outside quotes.
func heredocNames(s string) ([]heredoc, error) {
	var out []heredoc
	var quote byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case c == '\'' || c == '"':
			quote = c
		case c == '<' && strings.HasPrefix(s[i:], "<<") && !strings.HasPrefix(s[i:], "<<<"):
			j := i + 2
			h := heredoc{}
			if j < len(s) && s[j] == '-' {
				h.chomp = true
				j++
			}
			if j < len(s) && (s[j] == '"' || s[j] == '\'') {
				q := s[j]
				end := strings.IndexByte(s[j+1:], q)
				if end < 0 {
					return nil, fmt.Errorf("unterminated heredoc delimiter")
				}
				h.name, h.quoted = s[j+1:j+1+end], true
				j += end + 2
			} else {
				k := j
				for k < len(s) && (isNameChar(s[k]) || s[k] == '-' || s[k] == '.') {
					k++
				}
				h.name = s[j:k]
				j = k
			}
			if h.name == "" {
				i = j - 1
				continue
			}
			out = append(out, h)
			i = j - 1
		}
	}
	if len(out) > 1 {
		return nil, fmt.Errorf("more than one heredoc in one RUN is not supported")
	}
	return out, nil
}

func isNameStart(c byte) bool {
	return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
}

func isNameChar(c byte) bool { return isNameStart(c) || (c >= '0' && c <= '9') }
