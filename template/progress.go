package template

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/term"

	"github.com/cubicle-dev/cubicle/internal/buildprogress"
)

// progress shows a build of a default template as one line per stage
// (debootstrap, configure, archive, extract rootfs, install template):
// redrawn in place with a spinner when w is a terminal, a line at each
// stage's start and end otherwise (internal/buildprogress). The tools'
// output is not shown: it goes to a log file (logTo), and a failing
// stage shows its last lines and the log's path. Lines of its own
// (printf) are prefixed "[template <id>] " so they read well interleaved
// with other output. It is safe for concurrent use.
type progress struct {
	r      *buildprogress.Renderer
	tty    bool
	prefix string

	mu      sync.Mutex
	running string // the running stage, whose output lines are kept
	logPath string
	log     *os.File
	failed  bool // a stage failed: the log is kept
}

func newProgress(w io.Writer, templateID string) *progress {
	if w == nil {
		w = io.Discard
	}
	mode, width := buildprogress.Lines, func() int { return 80 }
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		mode = buildprogress.TTY
		width = func() int {
			if cols, _, err := term.GetSize(int(f.Fd())); err == nil {
				return cols
			}
			return 80
		}
	}
	return &progress{r: buildprogress.New(w, buildprogress.Options{Mode: mode, Width: width}), tty: mode == buildprogress.TTY,
		prefix: "[template " + templateID + "]"}
}

// logTo starts a log of the tools' output in dir, named for the
// template; it is kept only if a stage fails (its path is then shown).
// A log that cannot be made is skipped with a warning: the build goes on,
// and a failure still shows its last lines.
func (p *progress) logTo(dir, name string) {
	err := os.MkdirAll(dir, 0o755)
	var f *os.File
	if err == nil {
		f, err = os.CreateTemp(dir, name+"-*.log")
	}
	if err != nil {
		p.printf("warning: no build log: %v", err)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.log, p.logPath = f, f.Name()
}

// logFile is the log's path, "" if there is none.
func (p *progress) logFile() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.logPath
}

// close ends the output and closes the log, which is removed unless a
// stage failed.
func (p *progress) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.log != nil {
		p.log.Close()
		if !p.failed {
			os.Remove(p.logPath)
		}
		p.log = nil
	}
	p.r.Close()
}

// printf writes one line of its own. Write errors are ignored: a closed
// terminal must not fail a build.
func (p *progress) printf(format string, args ...any) {
	line := p.prefix + " " + fmt.Sprintf(format, args...)
	p.r.Print(line)
	p.logLine(line)
}

// logLine appends a line to the log file, if there is one.
func (p *progress) logLine(line string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.log != nil {
		_, _ = io.WriteString(p.log, line+"\n")
	}
}

// stage announces a named step and returns the function that closes it,
// reporting the step's elapsed time and passing its error through:
//
//	err = p.stage("debootstrap")(runDebootstrap())
//
// A failed stage shows its last output lines and where the whole log is.
func (p *progress) stage(name string) func(error) error {
	id := p.prefix + " " + name
	p.mu.Lock()
	p.running = id
	p.mu.Unlock()
	p.logLine(id + " ...")
	p.r.Begin(id, id, "")
	stopTicks := p.ticks()
	return func(err error) error {
		stopTicks()
		p.mu.Lock()
		if p.running == id {
			p.running = ""
		}
		logPath := p.logPath
		p.failed = p.failed || err != nil
		p.mu.Unlock()
		if err != nil {
			p.logLine(id + " failed: " + err.Error())
			p.r.Fail(id)
			if logPath != "" {
				p.r.Print(p.prefix + " the whole output is in " + logPath)
			}
		} else {
			p.r.Done(id, -1)
			p.logLine(id + " done")
		}
		return err
	}
}

// ticks moves the running stage's spinner and time on a terminal until
// the returned function is called.
func (p *progress) ticks() func() {
	if !p.tty {
		return func() {}
	}
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				p.r.Tick()
			}
		}
	}()
	return func() { close(stop); <-stopped }
}

// output takes a line of a tool's output: into the log, and kept for the
// running stage's failure.
func (p *progress) output(tag, line string) {
	p.mu.Lock()
	id := p.running
	p.mu.Unlock()
	p.logLine(tag + ": " + line)
	if id != "" {
		p.r.Output(id, id, "", line)
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
	w.p.output(w.tag, line)
	if len(w.tail) == tailLines {
		w.tail = append(w.tail[:0], w.tail[1:]...)
	}
	w.tail = append(w.tail, line)
}
