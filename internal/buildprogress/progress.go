// Package buildprogress shows a build that runs in steps the way a person
// wants to watch it: one line per step, not a wall of apt output.
//
// On a terminal (TTY) the running step's line is redrawn in place with a
// spinner and its elapsed time, and becomes "✓ 14.2s", "cached" or "✗"
// when the step ends. Elsewhere (Lines) a step prints a line when it starts
// and one when it ends, without escape codes. Either way a step's output is
// kept, not shown, and the last lines of a failing step are printed under
// it. Plain prints every output line as it comes, prefixed by its step.
//
// Only the last line on the screen is ever redrawn: steps run one after
// another, so a finished step's line is final and the running one is
// always last. A line is cut to the terminal's width so that it never
// wraps (a wrapped line cannot be redrawn with a carriage return).
package buildprogress

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Mode is how progress is drawn.
type Mode int

const (
	// TTY redraws the running step's line in place.
	TTY Mode = iota
	// Lines prints a line when a step starts and one when it ends.
	Lines
	// Plain prints every output line too.
	Plain
)

// DefaultTail is how many output lines of a failing step are shown.
const DefaultTail = 30

// Options adjust a Renderer.
type Options struct {
	Mode Mode
	// Width is the terminal's width (TTY); nil or <= 0 means 80.
	Width func() int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Tail is how many output lines a failing step shows; 0 means
	// DefaultTail.
	Tail int
}

type state int

const (
	running state = iota
	done
	cached
	failed
)

type step struct {
	id, label, title string
	start            time.Time
	state            state
	tail             []string
}

// Renderer draws the steps of one build to a writer. It is safe for
// concurrent use (Tick runs on a timer while log lines arrive).
type Renderer struct {
	mu     sync.Mutex
	w      io.Writer
	o      Options
	steps  map[string]*step
	active *step // the running step, if any
	drawn  bool  // TTY: active's line is on the screen, without its newline
	frame  int
}

// New returns a Renderer writing to w.
func New(w io.Writer, o Options) *Renderer {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Tail <= 0 {
		o.Tail = DefaultTail
	}
	return &Renderer{w: w, o: o, steps: map[string]*step{}}
}

var spinner = []string{"⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"}

const (
	green = "\x1b[32m"
	red   = "\x1b[31m"
	dim   = "\x1b[2m"
	reset = "\x1b[0m"
)

// Begin starts step id, shown as "label title". The step running before
// it, if any, ends as done.
func (r *Renderer) Begin(id, label, title string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.begin(id, label, title)
}

func (r *Renderer) begin(id, label, title string) *step {
	if r.active != nil && r.active.id == id {
		return r.active
	}
	r.endActive(done, -1)
	s := &step{id: id, label: label, title: oneLine(title), start: r.o.Now()}
	r.steps[id] = s
	r.active = s
	switch r.o.Mode {
	case TTY:
		r.draw()
	default:
		r.println(strings.TrimSpace(s.label + " " + s.title))
	}
	return s
}

// Output records a line of step id's output (starting the step if it is
// not running): kept for a failure, printed only in Plain mode.
func (r *Renderer) Output(id, label, title, line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.steps[id]
	if s == nil || (s.state == running && r.active != s) {
		s = r.begin(id, label, title)
	}
	if len(s.tail) == r.o.Tail {
		s.tail = append(s.tail[:0], s.tail[1:]...)
	}
	s.tail = append(s.tail, line)
	if r.o.Mode == Plain {
		r.println(s.label + " " + line)
	}
}

// Warn prints a warning about step id in every mode.
func (r *Renderer) Warn(id, label, msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if s := r.steps[id]; s != nil {
		label = s.label
	}
	r.permanent(label + " warning: " + msg)
}

// Print writes a line of its own in every mode (above the running step's
// line on a terminal).
func (r *Renderer) Print(line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.permanent(line)
}

// Done ends step id; d < 0 means the time since it began.
func (r *Renderer) Done(id string, d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.active != nil && r.active.id == id {
		r.endActive(done, d)
	}
}

// Cached shows step id as taken from the cache. The step running before
// it, if any, ends as done.
func (r *Renderer) Cached(id, label, title string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.endActive(done, -1)
	s := &step{id: id, label: label, title: oneLine(title), state: cached}
	r.steps[id] = s
	switch {
	case r.o.Mode == TTY:
		r.println(r.fit(s.label, s.title, dim+"cached"+reset, len("cached")))
	case s.title == "":
		r.println(s.label + " cached")
	default:
		r.println(s.label + " " + s.title + ": cached")
	}
}

// Fail ends the build as failed in step id ("" if unknown): the running
// step ends as failed, and the last lines of id's output (or the running
// step's) are printed under it.
func (r *Renderer) Fail(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.steps[id]
	if s == nil || len(s.tail) == 0 {
		if r.active != nil {
			s = r.active
		}
	}
	r.endActive(failed, -1)
	if s == nil || len(s.tail) == 0 || r.o.Mode == Plain {
		return // Plain has printed every line already
	}
	r.println(fmt.Sprintf("--- %s: the last %d lines of its output ---", s.label, len(s.tail)))
	for _, l := range s.tail {
		r.println("  " + l)
	}
}

// Tick redraws the running step's line (TTY): its spinner and time.
func (r *Renderer) Tick() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.o.Mode == TTY && r.active != nil {
		r.frame++
		r.draw()
	}
}

// Close ends the output: the running step's line is finished as it is
// (TTY), so that what follows starts on a line of its own.
func (r *Renderer) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.drawn {
		io.WriteString(r.w, "\n")
		r.drawn = false
	}
}

// endActive ends the running step as st after d (d < 0: measured).
func (r *Renderer) endActive(st state, d time.Duration) {
	s := r.active
	if s == nil {
		return
	}
	r.active = nil
	s.state = st
	if d < 0 {
		d = r.o.Now().Sub(s.start)
	}
	secs := fmt.Sprintf("%.1fs", d.Seconds())
	switch r.o.Mode {
	case TTY:
		status, color := "✓ "+secs, green
		if st == failed {
			status, color = "✗ "+secs, red
		}
		r.println(r.fit(s.label, s.title, color+status+reset, utf8.RuneCountInString(status)))
	default:
		if st == failed {
			r.println(s.label + " failed after " + secs)
		} else {
			r.println(s.label + " done in " + secs)
		}
	}
}

// draw redraws the running step's line in place (TTY).
func (r *Renderer) draw() {
	s := r.active
	el := r.o.Now().Sub(s.start)
	status := fmt.Sprintf("%s %ds", spinner[r.frame%len(spinner)], int(el.Seconds()))
	io.WriteString(r.w, "\r\x1b[K"+r.fit(s.label, s.title, status, utf8.RuneCountInString(status)))
	r.drawn = true
}

// println writes a finished line, in place of the running step's line if
// it is on the screen.
func (r *Renderer) println(line string) {
	if r.drawn {
		io.WriteString(r.w, "\r\x1b[K")
		r.drawn = false
	}
	io.WriteString(r.w, line+"\n")
}

// permanent writes a line above the running step's, which is redrawn.
func (r *Renderer) permanent(line string) {
	r.println(line)
	if r.o.Mode == TTY && r.active != nil {
		r.draw()
	}
}

// fit is "label title status", the title cut so that the line fits the
// terminal without wrapping; statusLen is status's width without escapes.
func (r *Renderer) fit(label, title, status string, statusLen int) string {
	width := 80
	if r.o.Width != nil {
		if w := r.o.Width(); w > 0 {
			width = w
		}
	}
	// One column is left free: some terminals wrap on the last one.
	room := width - 1 - utf8.RuneCountInString(label) - 2 - statusLen
	if room < 1 {
		return clip(label, width-1)
	}
	if title == "" {
		return label + " " + status
	}
	return label + " " + clip(title, room) + " " + status
}

// clip cuts s to n runes, ending with "…" when cut.
func clip(s string, n int) string {
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	if n <= 0 {
		return ""
	}
	rs := []rune(s)
	return string(rs[:n-1]) + "…"
}

// oneLine folds a multi-line title (a RUN with continuations) into one.
func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
