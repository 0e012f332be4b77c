package buildprogress

import (
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// screen is a fake terminal: it applies what a Renderer writes (text,
// "\r", "\n", "\x1b[K" and colour codes) to lines of cells, as a terminal
// of width columns would, and records whether a line ever wrapped.
type screen struct {
	width   int
	lines   [][]rune
	row     int
	col     int
	wrapped bool
	raw     strings.Builder
}

var csi = regexp.MustCompile(`^\x1b\[[0-9;]*[A-Za-z]`)

func (s *screen) Write(p []byte) (int, error) {
	s.raw.Write(p)
	if s.lines == nil {
		s.lines = [][]rune{nil}
	}
	str := string(p)
	for len(str) > 0 {
		if m := csi.FindString(str); m != "" {
			if m == "\x1b[K" {
				s.lines[s.row] = s.lines[s.row][:min(s.col, len(s.lines[s.row]))]
			}
			str = str[len(m):]
			continue
		}
		r := []rune(str)[0]
		str = str[len(string(r)):]
		switch r {
		case '\r':
			s.col = 0
		case '\n':
			s.row++
			s.col = 0
			if s.row == len(s.lines) {
				s.lines = append(s.lines, nil)
			}
		default:
			if s.col >= s.width {
				// The terminal wraps: a line redrawn after this leaves
				// its first part on the screen.
				s.wrapped = true
				s.row++
				s.col = 0
				if s.row == len(s.lines) {
					s.lines = append(s.lines, nil)
				}
			}
			l := s.lines[s.row]
			for len(l) <= s.col {
				l = append(l, ' ')
			}
			l[s.col] = r
			s.lines[s.row] = l
			s.col++
		}
	}
	return len(p), nil
}

func (s *screen) text() string {
	var out []string
	for _, l := range s.lines {
		out = append(out, strings.TrimRight(string(l), " "))
	}
	return strings.TrimRight(strings.Join(out, "\n"), "\n")
}

// clock is a fake clock the test moves.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

type entry struct {
	level, step, msg string
	after            time.Duration // the clock moves this much first
	ticks            int           // Tick calls after the entry
}

func info(step, msg string) entry { return entry{level: "info", step: step, msg: msg} }

// build is the log of a build of 4 steps after its first 1 was cached, as
// template/builder writes it.
var build = []entry{
	info("base", "resolving image 127.0.0.1:5000/e2e/busybox:1"),
	{level: "info", step: "base", msg: "image ready in 0.8s", after: 800 * time.Millisecond},
	info("1", "steps 1 to 1: cached"),
	info("2", "[2/4] COPY notes.txt /opt/"),
	{level: "info", step: "2", msg: "done in 0.1s", after: 100 * time.Millisecond},
	info("3", "[3/4] RUN apt-get update &&     apt-get install -y curl wget git build-essential python3 python3-pip"),
	{level: "info", step: "3", msg: "Get:1 http://deb.debian.org bookworm InRelease", after: 3 * time.Second, ticks: 3},
	{level: "info", step: "3", msg: "Setting up curl (7.88.1-10)", after: 9 * time.Second, ticks: 1},
}

func TestRenderer(t *testing.T) {
	ok := append(append([]entry{}, build...),
		entry{level: "info", step: "3", msg: "done in 12.3s", after: time.Second},
		info("4", "[4/4] USER user"),
		entry{level: "warn", step: "4", msg: "not cached: disk full"},
		entry{level: "info", step: "4", msg: "done in 0.2s", after: 200 * time.Millisecond},
		info("finalize", "template abc built (build 123)"),
	)
	var long []entry
	for i := range 40 {
		long = append(long, entry{level: "info", step: "3", msg: fmt.Sprintf("E: line %d", i)})
	}
	failing := append(append(append([]entry{}, build...), long...),
		entry{level: "error", step: "3", msg: "build failed: RUN apt-get: exited with status 100", after: time.Second})
	titles := map[string]string{"base": "FROM 127.0.0.1:5000/e2e/busybox:1", "1": "USER root", "2": "COPY notes.txt /opt/",
		"3": "RUN apt-get …", "4": "USER user"}

	for _, c := range []struct {
		name    string
		mode    Mode
		log     []entry
		titles  map[string]string // nil: titles
		fail    string            // reason.step, if the build fails
		want    string            // the screen at the end
		wantRaw []string
		noRaw   []string
	}{
		{
			name: "tty, ready", mode: TTY, log: ok,
			want: `[base] FROM 127.0.0.1:5000/e2e/busybox:1 ✓ 0.8s
[1/4] USER root cached
[2/4] COPY notes.txt /opt/ ✓ 0.1s
[3/4] RUN apt-get update && apt-get install -y curl wget git build-ess… ✓ 12.3s
[4/4] warning: not cached: disk full
[4/4] USER user ✓ 0.2s`,
			// The running step was redrawn with its spinner and time.
			wantRaw: []string{"\r\x1b[K[3/4] RUN apt-get update && apt-get install -y curl wget git build-essent… ⠙ 3s", "… ⠼ 12s", "\x1b[32m✓"},
			noRaw:   []string{"Setting up curl"},
		},
		{
			name: "tty, a failing step shows its tail", mode: TTY, log: failing, fail: "3",
			want: `[base] FROM 127.0.0.1:5000/e2e/busybox:1 ✓ 0.8s
[1/4] USER root cached
[2/4] COPY notes.txt /opt/ ✓ 0.1s
[3/4] RUN apt-get update && apt-get install -y curl wget git build-ess… ✗ 13.0s
--- [3/4]: the last 30 lines of its output ---
` + tail(10, 40),
			noRaw: []string{"E: line 9\n", "Get:1"},
		},
		{
			name: "lines: no escape codes, no output", mode: Lines, log: ok,
			want: `[base] FROM 127.0.0.1:5000/e2e/busybox:1
[base] done in 0.8s
[1/4] USER root: cached
[2/4] COPY notes.txt /opt/
[2/4] done in 0.1s
[3/4] RUN apt-get update && apt-get install -y curl wget git build-essential python3 python3-pip
[3/4] done in 12.3s
[4/4] USER user
[4/4] warning: not cached: disk full
[4/4] done in 0.2s`,
			noRaw: []string{"\x1b", "\r", "Setting up"},
		},
		{
			name: "lines, a failing step shows its tail", mode: Lines, log: failing, fail: "3",
			want: `[base] FROM 127.0.0.1:5000/e2e/busybox:1
[base] done in 0.8s
[1/4] USER root: cached
[2/4] COPY notes.txt /opt/
[2/4] done in 0.1s
[3/4] RUN apt-get update && apt-get install -y curl wget git build-essential python3 python3-pip
[3/4] failed after 13.0s
--- [3/4]: the last 30 lines of its output ---
` + tail(10, 40),
			noRaw: []string{"\x1b", "\r"},
		},
		{
			name: "plain prints every line", mode: Plain, log: failing[:8], fail: "3",
			want: `[base] FROM 127.0.0.1:5000/e2e/busybox:1
[base] resolving image 127.0.0.1:5000/e2e/busybox:1
[base] image ready in 0.8s
[base] done in 0.8s
[1/4] USER root: cached
[2/4] COPY notes.txt /opt/
[2/4] done in 0.1s
[3/4] RUN apt-get update && apt-get install -y curl wget git build-essential python3 python3-pip
[3/4] Get:1 http://deb.debian.org bookworm InRelease
[3/4] Setting up curl (7.88.1-10)
[3/4] failed after 12.0s`,
			noRaw: []string{"\x1b", "\r"},
		},
		{
			name: "a log read without its Dockerfile", mode: Plain, log: ok, titles: map[string]string{},
			want: `[base] FROM 127.0.0.1:5000/e2e/busybox:1
[base] resolving image 127.0.0.1:5000/e2e/busybox:1
[base] image ready in 0.8s
[base] done in 0.8s
[1/4] cached
[2/4] COPY notes.txt /opt/
[2/4] done in 0.1s
[3/4] RUN apt-get update && apt-get install -y curl wget git build-essential python3 python3-pip
[3/4] Get:1 http://deb.debian.org bookworm InRelease
[3/4] Setting up curl (7.88.1-10)
[3/4] done in 12.3s
[4/4] USER user
[4/4] warning: not cached: disk full
[4/4] done in 0.2s`,
		},
		{
			name: "a build that fails before any step", mode: TTY, fail: "base",
			log:  []entry{info("base", "resolving image nope:1"), {level: "error", step: "base", msg: "build failed: nope:1: not found", after: time.Second}},
			want: "[base] FROM 127.0.0.1:5000/e2e/busybox:1 ✗ 1.0s\n--- [base]: the last 1 lines of its output ---\n  resolving image nope:1",
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			scr := &screen{width: 80}
			if c.mode != TTY {
				scr.width = 1000 // a file or a pipe: lines are not cut
			}
			clk := &clock{t: time.Date(2026, 12, 8, 0, 0, 0, 0, time.UTC)}
			r := New(scr, Options{Mode: c.mode, Width: func() int { return 80 }, Now: clk.now})
			ti, from := map[string]string{}, titles
			if c.titles != nil {
				from = c.titles
			}
			for k, v := range from {
				ti[k] = v
			}
			f := NewFeed(r, 4, ti)
			for _, e := range c.log {
				clk.t = clk.t.Add(e.after)
				f.Add(e.level, e.step, e.msg)
				for range e.ticks {
					r.Tick()
				}
			}
			if c.fail != "" {
				f.Fail(c.fail)
			}
			r.Close()
			if got := scr.text(); got != c.want {
				t.Errorf("screen:\n%s\nwant:\n%s\nraw: %q", got, c.want, scr.raw.String())
			}
			for _, s := range c.wantRaw {
				if !strings.Contains(scr.raw.String(), s) {
					t.Errorf("output lacks %q: %q", s, scr.raw.String())
				}
			}
			for _, s := range c.noRaw {
				if strings.Contains(scr.raw.String(), s) {
					t.Errorf("output has %q: %q", s, scr.raw.String())
				}
			}
		})
	}
}

// tail is the indented output lines "E: line from" to to-1.
func tail(from, to int) string {
	var b []string
	for i := from; i < to; i++ {
		b = append(b, fmt.Sprintf("  E: line %d", i))
	}
	return strings.Join(b, "\n")
}

// TestRendererNarrowTerminal: on a terminal narrower than a step's label
// and status, the line is cut, never wrapped.
func TestRendererNarrowTerminal(t *testing.T) {
	for _, w := range []int{1, 5, 12, 20, 40} {
		scr := &screen{width: w}
		r := New(scr, Options{Mode: TTY, Width: func() int { return w }})
		r.Begin("12", "[12/30]", "RUN "+strings.Repeat("x", 100))
		r.Tick()
		r.Done("12", 3*time.Second)
		r.Close()
		if scr.wrapped || len(scr.lines) != 2 {
			t.Errorf("width %d: the step's line wrapped: %q", w, scr.raw.String())
		}
	}
}
