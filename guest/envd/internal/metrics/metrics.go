// Package metrics measures the sandbox's resource use for envd's GET /metrics: CPU
// from /proc/stat (as a delta between samples), memory from /proc/meminfo and disk
// from statfs of the root filesystem.
package metrics

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Snapshot is the JSON body of GET /metrics, field names as the E2B SDK reads them.
type Snapshot struct {
	Timestamp   int64   `json:"ts"` // unix seconds
	CPUCount    int     `json:"cpu_count"`
	CPUUsedPct  float64 `json:"cpu_used_pct"`
	MemTotal    uint64  `json:"mem_total"` // bytes
	MemUsed     uint64  `json:"mem_used"`  // bytes: total minus available
	MemCache    uint64  `json:"mem_cache"` // bytes of page cache
	MemTotalMiB uint64  `json:"mem_total_mib"`
	MemUsedMiB  uint64  `json:"mem_used_mib"`
	DiskUsed    uint64  `json:"disk_used"` // bytes
	DiskTotal   uint64  `json:"disk_total"`
}

// ErrProcFormat is returned when a /proc file does not look as expected.
var ErrProcFormat = errors.New("unexpected /proc format")

const (
	// minWindow is the shortest interval a CPU percentage is computed over; with
	// less, the jiffy counters are too coarse to mean anything.
	minWindow = 100 * time.Millisecond
	// maxWindow is the oldest previous sample still used: an older one would
	// report an average over a long-gone period instead of current use.
	maxWindow = 30 * time.Second
)

// Sampler computes CPU use as the delta between the previous request's sample
// and the current one. Safe for concurrent use.
type Sampler struct {
	procDir string // normally /proc; tests point it elsewhere
	diskDir string // filesystem reported as disk, normally /

	mu   sync.Mutex // guards last and at
	last cpuTimes
	at   time.Time
}

type cpuTimes struct{ busy, total uint64 }

// New returns a Sampler reading procDir (e.g. "/proc") and reporting the disk
// holding diskDir (e.g. "/").
func New(procDir, diskDir string) *Sampler {
	return &Sampler{procDir: procDir, diskDir: diskDir}
}

// Sample takes a measurement. The first call (or one long after the previous)
// waits minWindow to have a CPU interval.
func (s *Sampler) Sample() (Snapshot, error) {
	cpu, count, err := s.readCPU()
	if err != nil {
		return Snapshot{}, err
	}
	now := time.Now()
	s.mu.Lock()
	prev, prevAt := s.last, s.at
	s.mu.Unlock()
	if age := now.Sub(prevAt); prevAt.IsZero() || age < minWindow || age > maxWindow {
		// No usable previous sample: measure a window of our own.
		prev = cpu
		time.Sleep(minWindow)
		if cpu, count, err = s.readCPU(); err != nil {
			return Snapshot{}, err
		}
		now = time.Now()
	}
	s.mu.Lock()
	if now.After(s.at) {
		s.last, s.at = cpu, now
	}
	s.mu.Unlock()

	snap := Snapshot{Timestamp: now.Unix(), CPUCount: count, CPUUsedPct: usedPct(prev, cpu)}
	if err := s.readMem(&snap); err != nil {
		return Snapshot{}, err
	}
	var st unix.Statfs_t
	if err := unix.Statfs(s.diskDir, &st); err != nil {
		return Snapshot{}, fmt.Errorf("statfs %s: %w", s.diskDir, err)
	}
	bsize := uint64(st.Bsize)
	snap.DiskTotal = st.Blocks * bsize
	snap.DiskUsed = (st.Blocks - st.Bfree) * bsize
	return snap, nil
}

// usedPct is the busy share of CPU time between two samples, in percent with two
// decimals.
func usedPct(a, b cpuTimes) float64 {
	if b.total <= a.total || b.busy < a.busy {
		return 0
	}
	pct := float64(b.busy-a.busy) / float64(b.total-a.total) * 100
	return math.Round(pct*100) / 100
}

// readCPU returns the aggregate CPU times and the number of CPUs from /proc/stat.
func (s *Sampler) readCPU() (cpuTimes, int, error) {
	data, err := os.ReadFile(filepath.Join(s.procDir, "stat"))
	if err != nil {
		return cpuTimes{}, 0, err
	}
	return parseStat(data)
}

// parseStat parses /proc/stat: the "cpu" line gives the times (user nice system
// idle iowait irq softirq steal, in jiffies; guest time is already inside user),
// the "cpuN" lines the CPU count.
func parseStat(data []byte) (cpuTimes, int, error) {
	var t cpuTimes
	found, count := false, 0
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 || !strings.HasPrefix(fields[0], "cpu") {
			continue
		}
		if fields[0] != "cpu" {
			count++
			continue
		}
		if len(fields) < 5 {
			return cpuTimes{}, 0, fmt.Errorf("%w: short cpu line", ErrProcFormat)
		}
		for i, f := range fields[1:min(len(fields), 9)] {
			v, err := strconv.ParseUint(f, 10, 64)
			if err != nil {
				return cpuTimes{}, 0, fmt.Errorf("%w: cpu field %q", ErrProcFormat, f)
			}
			t.total += v
			if i != 3 && i != 4 { // idle and iowait are not busy
				t.busy += v
			}
		}
		found = true
	}
	if !found {
		return cpuTimes{}, 0, fmt.Errorf("%w: no cpu line", ErrProcFormat)
	}
	return t, max(count, 1), nil
}

func (s *Sampler) readMem(snap *Snapshot) error {
	data, err := os.ReadFile(filepath.Join(s.procDir, "meminfo"))
	if err != nil {
		return err
	}
	kb := map[string]uint64{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		if v, err := strconv.ParseUint(fields[0], 10, 64); err == nil {
			kb[name] = v
		}
	}
	total, ok := kb["MemTotal"]
	if !ok {
		return fmt.Errorf("%w: no MemTotal in meminfo", ErrProcFormat)
	}
	avail, ok := kb["MemAvailable"]
	if !ok {
		// Kernels before 3.14 (and some sandboxes) lack MemAvailable.
		avail = kb["MemFree"] + kb["Buffers"] + kb["Cached"]
	}
	avail = min(avail, total)
	snap.MemTotal = total * 1024
	snap.MemUsed = (total - avail) * 1024
	snap.MemCache = kb["Cached"] * 1024
	snap.MemTotalMiB = snap.MemTotal >> 20
	snap.MemUsedMiB = snap.MemUsed >> 20
	return nil
}
