package buildprogress

import (
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Feed turns a template build's log (template/builder: entries tagged
// "base", "1".."N" or "finalize") into steps on a Renderer. The builder
// logs "[i/N] TYPE args" when step i starts, its output lines, and "done
// in Xs" when it ends; "steps 1 to K: cached" when a build starts after
// K cached steps; "build failed: …" (level error) when it fails.
type Feed struct {
	r      *Renderer
	total  int
	titles map[string]string
}

// NewFeed feeds r. total is the number of steps (0 if unknown: the log
// says), and titles name them ("base": "FROM image", "3": "RUN …") for
// steps the log does not describe, such as cached ones.
func NewFeed(r *Renderer, total int, titles map[string]string) *Feed {
	if titles == nil {
		titles = map[string]string{}
	}
	return &Feed{r: r, total: total, titles: titles}
}

var (
	stepStart = regexp.MustCompile(`^\[(\d+)/(\d+)\] (.*)$`)
	stepsHit  = regexp.MustCompile(`^steps 1 to (\d+): cached$`)
	stepDone  = regexp.MustCompile(`^done in ([0-9.]+)s$`)
	baseFrom  = regexp.MustCompile(`^(?:resolving image|from template) (\S+)`)
)

// Label is how step is shown: "[3/7]", "[base]", "[finalize]".
func (f *Feed) Label(step string) string {
	if _, err := strconv.Atoi(step); err == nil {
		if f.total > 0 {
			return "[" + step + "/" + strconv.Itoa(f.total) + "]"
		}
		return "[" + step + "]"
	}
	if step == "" {
		return "[build]"
	}
	return "[" + step + "]"
}

// Add takes one log entry.
func (f *Feed) Add(level, step, msg string) {
	if m := stepStart.FindStringSubmatch(msg); m != nil && m[1] == step {
		f.total, _ = strconv.Atoi(m[2])
		f.titles[step] = m[3]
		f.r.Begin(step, f.Label(step), m[3])
		return
	}
	if m := stepsHit.FindStringSubmatch(msg); m != nil {
		n, _ := strconv.Atoi(m[1])
		for i := 1; i <= n; i++ {
			id := strconv.Itoa(i)
			f.r.Cached(id, f.Label(id), f.titles[id])
		}
		return
	}
	if m := stepDone.FindStringSubmatch(msg); m != nil && step != "base" && step != "finalize" {
		secs, _ := strconv.ParseFloat(m[1], 64)
		f.r.Done(step, time.Duration(secs*float64(time.Second)))
		return
	}
	if level == "error" && strings.HasPrefix(msg, "build failed: ") {
		return // the build's status carries the reason: see Fail
	}
	if step == "finalize" {
		// "template X built": the build is over, nothing to watch.
		f.End()
		return
	}
	if m := baseFrom.FindStringSubmatch(msg); m != nil && step == "base" && f.titles["base"] == "" {
		f.titles["base"] = "FROM " + m[1] // a log read without its Dockerfile
	}
	if level == "warn" {
		f.r.Warn(step, f.Label(step), msg)
		return
	}
	f.r.Output(step, f.Label(step), f.titles[step], msg)
}

// End ends the running step, if any, as done: the build is ready.
func (f *Feed) End() { f.r.Done(f.r.activeID(), -1) }

// Fail ends the build as failed in step (the build status's reason.step).
func (f *Feed) Fail(step string) { f.r.Fail(step) }

// activeID is the running step's id ("" for none).
func (r *Renderer) activeID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.active == nil {
		return ""
	}
	return r.active.id
}
