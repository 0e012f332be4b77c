package metrics

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	good := "cpu  100 10 50 800 40 0 0 0 5 0\ncpu0 50 5 25 400 20 0 0 0 0 0\ncpu1 50 5 25 400 20 0 0 0 0 0\nintr 1 2 3\n"
	times, n, err := parseStat([]byte(good))
	if err != nil || n != 2 || times.total != 1000 || times.busy != 160 {
		t.Errorf("parseStat = %+v, %d, %v; want total 1000 busy 160 over 2 CPUs (guest time is inside user)", times, n, err)
	}
	for _, bad := range []string{"", "intr 1\n", "cpu 1 2\n", "cpu a b c d e\n"} {
		if _, _, err := parseStat([]byte(bad)); !errors.Is(err, ErrProcFormat) {
			t.Errorf("parseStat(%q): %v, want ErrProcFormat", bad, err)
		}
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add([]byte("cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		times, n, err := parseStat(data)
		if err == nil && (n < 1 || times.busy > times.total) {
			t.Fatalf("parseStat: %+v %d", times, n)
		}
	})
}

func TestUsedPct(t *testing.T) {
	tests := []struct {
		a, b cpuTimes
		want float64
	}{
		{cpuTimes{busy: 100, total: 1000}, cpuTimes{busy: 150, total: 1200}, 25},
		{cpuTimes{busy: 0, total: 0}, cpuTimes{busy: 1, total: 3}, 33.33},
		{cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 10, total: 100}, 0}, // no time passed
		{cpuTimes{busy: 10, total: 100}, cpuTimes{busy: 5, total: 50}, 0},   // counters went back
	}
	for _, tc := range tests {
		if got := usedPct(tc.a, tc.b); got != tc.want {
			t.Errorf("usedPct(%+v, %+v) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestSample(t *testing.T) {
	proc := t.TempDir()
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(proc, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("stat", "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 0\ncpu1 0\ncpu2 0\ncpu3 0\n")
	write("meminfo", "MemTotal:       2048000 kB\nMemFree:         100000 kB\nMemAvailable:   1024000 kB\nBuffers:          1000 kB\nCached:         512000 kB\n")
	s := New(proc, "/")

	snap, err := s.Sample() // first sample: measures its own window
	if err != nil {
		t.Fatal(err)
	}
	if snap.CPUCount != 4 || snap.CPUUsedPct != 0 || snap.MemTotal != 2048000*1024 || snap.MemUsed != 1024000*1024 ||
		snap.MemCache != 512000*1024 || snap.MemTotalMiB != 2000 || snap.MemUsedMiB != 1000 || snap.DiskTotal == 0 ||
		time.Since(time.Unix(snap.Timestamp, 0)) > time.Minute {
		t.Errorf("snapshot %+v", snap)
	}
	// A later sample reports use since the previous one: 300 of 400 jiffies busy.
	write("stat", "cpu  200 0 300 900 0 0 0 0 0 0\ncpu0 0\n")
	time.Sleep(minWindow)
	if snap, err = s.Sample(); err != nil || snap.CPUUsedPct != 75 {
		t.Errorf("second sample: %v %v, want 75%%", snap.CPUUsedPct, err)
	}

	write("meminfo", "MemTotal: 1000 kB\nMemFree: 100 kB\nCached: 200 kB\n") // no MemAvailable
	if snap, err = s.Sample(); err != nil || snap.MemUsed != 700*1024 {
		t.Errorf("without MemAvailable: %+v %v", snap, err)
	}
	write("meminfo", "nothing\n")
	if _, err := s.Sample(); !errors.Is(err, ErrProcFormat) {
		t.Errorf("broken meminfo: %v", err)
	}
}
