package codeinterp

import (
	"bytes"
	"unicode/utf8"
)

// markerScanner splits a byte stream into text and occurrences of a marker,
// holding back as little as it can: a tail that may be the start of the
// marker, and a tail that is an incomplete UTF-8 sequence (so no character
// is split between two events).
type markerScanner struct {
	marker []byte
	held   []byte
}

// scan consumes b and calls text for each run of output and mark for each
// marker, in stream order.
func (s *markerScanner) scan(b []byte, text func([]byte), mark func()) {
	buf := append(s.held, b...)
	s.held = nil
	for {
		i := bytes.Index(buf, s.marker)
		if i < 0 {
			break
		}
		if i > 0 {
			text(buf[:i])
		}
		mark()
		buf = buf[i+len(s.marker):]
	}
	keep := partialSuffix(buf, s.marker)
	if keep == 0 {
		keep = incompleteRune(buf)
	}
	if n := len(buf) - keep; n > 0 {
		text(buf[:n])
	}
	if keep > 0 {
		s.held = append([]byte(nil), buf[len(buf)-keep:]...)
	}
}

// flush returns what is held back, at the end of the stream.
func (s *markerScanner) flush() []byte {
	h := s.held
	s.held = nil
	return h
}

// partialSuffix is the length of the longest proper suffix of b that is a
// prefix of marker.
func partialSuffix(b, marker []byte) int {
	for n := min(len(b), len(marker)-1); n > 0; n-- {
		if bytes.HasSuffix(b, marker[:n]) {
			return n
		}
	}
	return 0
}

// incompleteRune is the length of a trailing UTF-8 sequence in b that more
// bytes could still complete, or 0.
func incompleteRune(b []byte) int {
	for n := 1; n <= min(len(b), utf8.UTFMax-1); n++ {
		c := b[len(b)-n]
		if c < 0x80 {
			return 0 // ASCII: nothing pending
		}
		if utf8.RuneStart(c) {
			if utf8.FullRune(b[len(b)-n:]) {
				return 0
			}
			return n
		}
	}
	return 0
}
