package dockerfile

import (
	"errors"
	"path"
	"strings"
)

// A glob pattern as the SDK's glob and minimatch read it with dot: true:
// segments split on /, * ? and [...] within a segment ([!...] negates),
// ** as a whole segment for any number of segments, {a,b} alternatives,
// \ escaping.

var errExtglob = errors.New("extglob and {a..b} range patterns are not supported")

// maxBraceAlternatives bounds what {a,b} expansion may produce: the count
// multiplies with every brace, and a pattern is not allowed to make the
// CLI expand millions of alternatives.
const maxBraceAlternatives = 1024

var errTooManyAlternatives = errors.New("pattern expands to more than 1024 {a,b} alternatives")

// hasMagic reports whether p is a pattern rather than a plain path.
func hasMagic(p string) bool {
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '\\':
			i++
		case '*', '?', '[':
			return true
		case '{':
			if alts, err := expandBraces(p); err != nil || len(alts) > 1 {
				return true
			}
		}
	}
	return false
}

type globMatcher struct {
	alts [][]string // segments; "**" is the globstar
}

func compileSegments(segs []string) (globMatcher, error) {
	out := make([]string, len(segs))
	for i, s := range segs {
		if strings.Contains(s, "(") {
			for _, x := range []string{"+(", "!(", "@(", "*(", "?("} {
				if strings.Contains(s, x) {
					return globMatcher{}, errExtglob
				}
			}
		}
		if s != "**" {
			s = strings.ReplaceAll(s, "[!", "[^")
			if _, err := path.Match(s, ""); err != nil {
				// minimatch takes a malformed class literally.
				s = escapeMeta(s)
			}
		}
		out[i] = s
	}
	return globMatcher{alts: [][]string{out}}, nil
}

func escapeMeta(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if strings.IndexByte(`*?[]\`, s[i]) >= 0 {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (m globMatcher) match(p string) bool {
	file := strings.Split(p, "/")
	for _, a := range m.alts {
		if matchSegs(file, a) {
			return true
		}
	}
	return false
}

// matchSegs is minimatch's matchOne for dot: true.
func matchSegs(file, pat []string) bool {
	for len(pat) > 0 {
		if pat[0] == "**" {
			rest := pat[1:]
			if len(rest) == 0 {
				for _, f := range file {
					if f == "." || f == ".." {
						return false
					}
				}
				return true
			}
			for i := 0; i <= len(file); i++ {
				if matchSegs(file[i:], rest) {
					return true
				}
				if i < len(file) && (file[i] == "." || file[i] == ".." || file[i] == "") {
					return false
				}
			}
			return false
		}
		if len(file) == 0 {
			return false
		}
		if !matchSeg(pat[0], file[0]) {
			return false
		}
		pat, file = pat[1:], file[1:]
	}
	// A trailing slash on the path still matches.
	return len(file) == 0 || (len(file) == 1 && file[0] == "")
}

func matchSeg(pat, name string) bool {
	if name == "" {
		return pat == ""
	}
	if name == "." || name == ".." {
		return pat == name
	}
	ok, err := path.Match(pat, name)
	return err == nil && ok
}

// expandBraces expands {a,b} alternatives (nested allowed); a brace with
// no comma is literal, and {a..b} ranges are refused.
func expandBraces(p string) ([]string, error) {
	depth, start := 0, -1
	for i := 0; i < len(p); i++ {
		switch p[i] {
		case '\\':
			i++
		case '{':
			if depth == 0 {
				start = i
			}
			depth++
		case '}':
			if depth == 0 {
				continue
			}
			depth--
			if depth > 0 {
				continue
			}
			body := p[start+1 : i]
			parts := splitTop(body)
			if len(parts) < 2 {
				if strings.Contains(body, "..") {
					return nil, errExtglob
				}
				// Literal: expand what follows.
				rest, err := expandBraces(p[i+1:])
				if err != nil {
					return nil, err
				}
				var out []string
				for _, r := range rest {
					out = append(out, p[:i+1]+r)
				}
				return out, nil
			}
			suffixes, err := expandBraces(p[i+1:])
			if err != nil {
				return nil, err
			}
			var out []string
			for _, part := range parts {
				inner, err := expandBraces(part)
				if err != nil {
					return nil, err
				}
				if len(out)+len(inner)*len(suffixes) > maxBraceAlternatives {
					return nil, errTooManyAlternatives
				}
				for _, in := range inner {
					for _, s := range suffixes {
						out = append(out, p[:start]+in+s)
					}
				}
			}
			return out, nil
		}
	}
	return []string{p}, nil
}

// splitTop splits a brace body on commas outside nested braces.
func splitTop(s string) []string {
	var out []string
	depth, last := 0, 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '\\':
			i++
		case '{':
			depth++
		case '}':
			depth--
		case ',':
			if depth == 0 {
				out = append(out, s[last:i])
				last = i + 1
			}
		}
	}
	return append(out, s[last:])
}
