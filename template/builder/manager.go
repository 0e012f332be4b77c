package builder

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"time"

	"github.com/cubicle-dev/cubicle/template/buildspec"
)

// Build statuses, as E2B's build status names them.
const (
	StatusWaiting  = "waiting"
	StatusBuilding = "building"
	StatusReady    = "ready"
	StatusError    = "error"
)

// ErrNotFound: no build of that ID (for that owner).
var ErrNotFound = errors.New("build not found")

// ErrConflict: the build is not waiting to start.
var ErrConflict = errors.New("build already started")

// Info is what is kept of one build, in <dir>/<buildID>.json.
type Info struct {
	BuildID    string    `json:"buildID"`
	TemplateID string    `json:"templateID"`
	Alias      string    `json:"alias,omitempty"`
	Owner      string    `json:"owner"`
	CPUCount   int       `json:"cpuCount"`
	MemoryMB   int       `json:"memoryMB"`
	Status     string    `json:"status"`
	Reason     *Reason   `json:"reason,omitempty"`
	CreatedAt  time.Time `json:"createdAt"`
	FinishedAt time.Time `json:"finishedAt,omitzero"`
}

// Reason is why a build failed, and in which step.
type Reason struct {
	Message string `json:"message"`
	Step    string `json:"step,omitempty"`
}

// LogEntry is one line of a build's log.
type LogEntry struct {
	Timestamp time.Time `json:"timestamp"`
	Level     string    `json:"level"`
	Message   string    `json:"message"`
	Step      string    `json:"step,omitempty"`
}

// maxLogEntries bounds a build's log: an apt-get's output is thousands of
// lines, a runaway loop's is endless.
const maxLogEntries = 20000

// maxLineBytes bounds one log line.
const maxLineBytes = 4096

// Manager runs builds in the background and keeps their status and logs
// in a directory, so that both outlive the request that started the build
// (and the server: a build that was running when the server stopped is
// reported failed).
type Manager struct {
	b   *Builder
	dir string
	log *slog.Logger
	ctx context.Context
	wg  sync.WaitGroup

	mu     sync.Mutex
	cancel context.CancelFunc
	// running are the templates with a build under way: one at a time.
	running map[string]string
	// gcMax caps the build artifacts (CollectEvery); 0 is no cap.
	gcMax int64
}

var buildIDPattern = regexp.MustCompile(`^[a-z0-9-]{1,64}$`)

// NewManager keeps builds in dir.
func NewManager(b *Builder, dir string, log *slog.Logger) (*Manager, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("builds: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	m := &Manager{b: b, dir: dir, log: log, ctx: ctx, cancel: cancel, running: map[string]string{}}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		id, ok := cutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		info, err := m.read(id)
		if err != nil || info.Status != StatusBuilding {
			continue
		}
		info.Status, info.FinishedAt = StatusError, time.Now().UTC()
		info.Reason = &Reason{Message: "the server stopped during the build: build again"}
		m.write(info)
	}
	return m, nil
}

func cutSuffix(s, suffix string) (string, bool) {
	if len(s) > len(suffix) && s[len(s)-len(suffix):] == suffix {
		return s[:len(s)-len(suffix)], true
	}
	return "", false
}

// CollectEvery runs the builder's garbage collection with cap max bytes
// after every build and every period, until Close.
func (m *Manager) CollectEvery(max int64, period time.Duration) {
	m.mu.Lock()
	m.gcMax = max
	m.mu.Unlock()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-m.ctx.Done():
				return
			case <-t.C:
				m.collect()
			}
		}
	}()
}

// collect runs one garbage collection, if a cap is set.
func (m *Manager) collect() {
	m.mu.Lock()
	max := m.gcMax
	m.mu.Unlock()
	if max <= 0 {
		return
	}
	rep, err := m.b.CollectGarbage(m.ctx, max)
	if err != nil {
		m.log.Warn("collecting build artifacts", "err", err)
		return
	}
	if rep.Removed > 0 {
		m.log.Info("collected build artifacts", "removed", rep.Removed, "freedMiB", rep.RemovedBytes>>20,
			"leftMiB", (rep.Bytes-rep.RemovedBytes)>>20, "capMiB", max>>20)
	}
}

// Close cancels the builds under way and waits for them.
func (m *Manager) Close() {
	m.cancel()
	m.wg.Wait()
}

// Register records a build waiting for its steps (E2B's POST /v3/templates).
func (m *Manager) Register(info Info) error {
	if !buildIDPattern.MatchString(info.BuildID) {
		return fmt.Errorf("builds: bad build ID %q", info.BuildID)
	}
	info.Status, info.CreatedAt = StatusWaiting, time.Now().UTC()
	return m.write(info)
}

// Get returns owner's build id of templateID.
func (m *Manager) Get(owner, templateID, id string) (Info, error) {
	if !buildIDPattern.MatchString(id) {
		return Info{}, ErrNotFound
	}
	info, err := m.read(id)
	if err != nil || info.Owner != owner || info.TemplateID != templateID {
		return Info{}, ErrNotFound
	}
	return info, nil
}

// Start begins owner's waiting build id with spec, in the background.
func (m *Manager) Start(owner, templateID, id string, spec buildspec.Spec) error {
	info, err := m.Get(owner, templateID, id)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if info.Status != StatusWaiting {
		return fmt.Errorf("%w: build %s is %s", ErrConflict, id, info.Status)
	}
	if other, busy := m.running[templateID]; busy {
		return fmt.Errorf("%w: template %s is being built (build %s)", ErrConflict, templateID, other)
	}
	info.Status = StatusBuilding
	if err := m.write(info); err != nil {
		return err
	}
	m.running[templateID] = id
	m.wg.Add(1)
	go m.run(info, spec)
	return nil
}

func (m *Manager) run(info Info, spec buildspec.Spec) {
	defer m.wg.Done()
	lg := &buildLog{path: filepath.Join(m.dir, info.BuildID+".log")}
	defer lg.close()
	start := time.Now()
	_, err := m.b.Build(m.ctx, Request{TemplateID: info.TemplateID, BuildID: info.BuildID, Alias: info.Alias,
		Owner: info.Owner, CPUCount: info.CPUCount, MemoryMB: info.MemoryMB, Spec: spec}, lg)
	info.FinishedAt = time.Now().UTC()
	if err != nil {
		step := ""
		var se *StepError
		if errors.As(err, &se) {
			step = se.Step
		}
		info.Status, info.Reason = StatusError, &Reason{Message: err.Error(), Step: step}
		lg.Add("error", step, "build failed: "+err.Error())
		m.log.Warn("template build failed", "template", info.TemplateID, "build", info.BuildID, "step", step, "err", err)
	} else {
		info.Status = StatusReady
		m.log.Info("template built", "template", info.TemplateID, "build", info.BuildID, "s", time.Since(start).Seconds())
	}
	m.mu.Lock()
	delete(m.running, info.TemplateID)
	if err := m.write(info); err != nil {
		m.log.Error("recording a build's end", "build", info.BuildID, "err", err)
	}
	m.mu.Unlock()
	m.collect()
}

// Logs returns build id's log entries from offset on (at most limit).
func (m *Manager) Logs(id string, offset, limit int) ([]LogEntry, error) {
	out := []LogEntry{}
	f, err := os.Open(filepath.Join(m.dir, id+".log"))
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 0; sc.Scan(); n++ {
		if n < offset {
			continue
		}
		if len(out) >= limit {
			break
		}
		var e LogEntry
		if json.Unmarshal(sc.Bytes(), &e) == nil {
			out = append(out, e)
		}
	}
	return out, sc.Err()
}

// Building reports whether templateID has a build under way.
func (m *Manager) Building(templateID string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, busy := m.running[templateID]
	return busy
}

func (m *Manager) read(id string) (Info, error) {
	var info Info
	b, err := os.ReadFile(filepath.Join(m.dir, id+".json"))
	if err != nil {
		return info, err
	}
	return info, json.Unmarshal(b, &info)
}

func (m *Manager) write(info Info) error {
	b, err := json.Marshal(info)
	if err != nil {
		return err
	}
	path := filepath.Join(m.dir, info.BuildID+".json")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// buildLog is a build's Log: JSON lines in a file, bounded.
type buildLog struct {
	mu   sync.Mutex
	path string
	f    *os.File
	n    int
}

func (l *buildLog) Add(level, step, message string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n > maxLogEntries {
		return
	}
	if l.f == nil {
		f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		if err != nil {
			return
		}
		l.f = f
	}
	if l.n == maxLogEntries {
		level, message = "warn", fmt.Sprintf("the log stops here: more than %d lines", maxLogEntries)
	}
	l.n++
	if len(message) > maxLineBytes {
		message = message[:maxLineBytes] + "…"
	}
	b, _ := json.Marshal(LogEntry{Timestamp: time.Now().UTC(), Level: level, Message: message, Step: step})
	l.f.Write(append(b, '\n'))
}

func (l *buildLog) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil {
		l.f.Close()
	}
}

// Output is a writer whose lines become info entries of step.
func (l *buildLog) Output(step string) io.Writer { return &lineWriter{log: l, step: step} }

// Flush logs a last line that had no newline.
func (w *lineWriter) Flush() {
	if len(w.buf) > 0 {
		w.log.Add("info", w.step, string(w.buf))
		w.buf = w.buf[:0]
	}
}

type lineWriter struct {
	log  *buildLog
	step string
	buf  []byte
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			break
		}
		w.log.Add("info", w.step, string(bytes.TrimRight(w.buf[:i], "\r")))
		w.buf = w.buf[i+1:]
	}
	if len(w.buf) > maxLineBytes {
		w.log.Add("info", w.step, string(w.buf))
		w.buf = w.buf[:0]
	}
	return len(p), nil
}

// OwnerOf is the owner of templateID's builds, "" if it has none.
func (m *Manager) OwnerOf(templateID string) string {
	ents, _ := os.ReadDir(m.dir)
	for _, e := range ents {
		id, ok := cutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		if info, err := m.read(id); err == nil && info.TemplateID == templateID {
			return info.Owner
		}
	}
	return ""
}

// List returns owner's builds of the template whose ID or name is ref,
// newest first. A template's name is known to its builds even before one
// of them succeeds, so a template whose first build failed still has its
// log.
func (m *Manager) List(owner, ref string) ([]Info, error) {
	ents, err := os.ReadDir(m.dir)
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, e := range ents {
		id, ok := cutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		info, err := m.read(id)
		if err != nil || info.Owner != owner || (info.TemplateID != ref && info.Alias != ref) {
			continue
		}
		out = append(out, info)
	}
	slices.SortFunc(out, func(a, b Info) int { return b.CreatedAt.Compare(a.CreatedAt) })
	return out, nil
}
