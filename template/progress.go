package template

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// progress writes a build's human-readable log, one line per event, each
// prefixed with "[template <id>] " so it reads well interleaved with other
// output. It is safe for concurrent use.
type progress struct {
	mu     sync.Mutex
	w      io.Writer
	prefix string
}

func newProgress(w io.Writer, templateID string) *progress {
	if w == nil {
		w = io.Discard
	}
	return &progress{w: w, prefix: "[template " + templateID + "] "}
}

// printf writes one line. Write errors are ignored: a closed terminal must
// not fail a build.
func (p *progress) printf(format string, args ...any) {
	line := p.prefix + fmt.Sprintf(format, args...) + "\n"
	p.mu.Lock()
	defer p.mu.Unlock()
	_, _ = io.WriteString(p.w, line)
}

// stage announces a named step and returns the function that closes it,
// reporting the step's elapsed time and passing its error through:
//
//	err = p.stage("debootstrap")(runDebootstrap())
func (p *progress) stage(name string) func(error) error {
	start := time.Now()
	p.printf("%s ...", name)
	return func(err error) error {
		d := time.Since(start).Round(100 * time.Millisecond)
		if err != nil {
			p.printf("%s failed after %s", name, d)
		} else {
			p.printf("%s done in %s", name, d)
		}
		return err
	}
}

// lines returns a writer that turns a child process's output into progress
// lines tagged with tag, and remembers the last few for error messages.
func (p *progress) lines(tag string) *lineWriter {
	return &lineWriter{p: p, tag: tag}
}

// tailLines is how many output lines a failed command's error carries.
const tailLines = 15

// maxLine bounds how much output without a newline is buffered.
const maxLine = 64 << 10

// lineWriter splits a byte stream into lines on '\n' or '\r' (progress bars
// redraw with '\r') and writes each non-empty one as a progress line.
type lineWriter struct {
	p    *progress
	tag  string
	mu   sync.Mutex
	buf  []byte
	tail []string
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, b...)
	for {
		i := bytes.IndexAny(w.buf, "\r\n")
		if i < 0 {
			break
		}
		w.emit(w.buf[:i])
		w.buf = w.buf[i+1:]
	}
	if len(w.buf) > maxLine {
		w.emit(w.buf)
		w.buf = w.buf[:0]
	}
	return len(b), nil
}

// Close writes what is left after the last newline.
func (w *lineWriter) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.emit(w.buf)
	w.buf = nil
	return nil
}

// Tail returns the last lines written, joined by newlines.
func (w *lineWriter) Tail() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return strings.Join(w.tail, "\n")
}

func (w *lineWriter) emit(b []byte) {
	line := strings.TrimRight(string(b), " \t")
	if strings.TrimSpace(line) == "" {
		return
	}
	w.p.printf("%s: %s", w.tag, line)
	if len(w.tail) == tailLines {
		w.tail = append(w.tail[:0], w.tail[1:]...)
	}
	w.tail = append(w.tail, line)
}
