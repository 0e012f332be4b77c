package gvisor

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

// BenchmarkCreate measures Create (with config's 1 GiB disk) until envd
// answers /health, the figure that matters to a pool refilling itself.
// Kill runs off the clock. Extra
// runsc flags to compare come from $CUBICLE_BENCH_RUNSC_FLAGS (space
// separated), e.g. "--file-access=shared". It reports the median as
// p50-ms, since a mean hides the tail that a pool cares about.
func BenchmarkCreate(b *testing.B) {
	e := newEnv(b, "100.88.251.0/24")
	if f := os.Getenv("CUBICLE_BENCH_RUNSC_FLAGS"); f != "" {
		e.rt.flags = append(e.rt.flags, strings.Fields(f)...)
	}
	tmpl := makeTemplate(b)
	ctx := context.Background()
	var times []time.Duration
	for b.Loop() {
		start := time.Now()
		sb, err := e.create(ctx, config(testID("bench"), tmpl))
		if err != nil {
			b.Fatal(err)
		}
		if err := pollHealth(sb.Addr, 10*time.Second); err != nil {
			b.Fatal(err)
		}
		times = append(times, time.Since(start))
		b.StopTimer()
		if err := e.kill(ctx, sb.ID); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	b.ReportMetric(float64(times[len(times)/2].Microseconds())/1000, "p50-ms")
}

// BenchmarkCreateDisk measures what the sandbox's own disk adds to Create
// (until envd answers): each round creates one sandbox without a disk
// (DiskSizeMB 0) and one with each size, so that all sizes see the same
// conditions, and reports the median of each as p50-ms-<size>MB.
func BenchmarkCreateDisk(b *testing.B) {
	e := newEnv(b, "100.88.249.0/24")
	tmpl := makeTemplate(b)
	ctx := context.Background()
	sizes := []int{0, 1024, 10240}
	times := make([][]time.Duration, len(sizes))
	for _, mb := range sizes[1:] {
		if _, err := e.rt.cachedImage(mb); err != nil { // once per size, off the clock
			b.Fatal(err)
		}
	}
	for b.Loop() {
		for i, mb := range sizes {
			cfg := config(testID("bench"), tmpl)
			cfg.DiskSizeMB = mb
			start := time.Now()
			sb, err := e.create(ctx, cfg)
			if err != nil {
				b.Fatal(err)
			}
			if err := pollHealth(sb.Addr, 10*time.Second); err != nil {
				b.Fatal(err)
			}
			times[i] = append(times[i], time.Since(start))
			b.StopTimer()
			if err := e.kill(ctx, sb.ID); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	}
	for i, mb := range sizes {
		b.ReportMetric(median(times[i]), fmt.Sprintf("p50-ms-%dMB", mb))
	}
}

// BenchmarkDisk times the disk alone: setupDisk (copy of the cached image,
// loop device, mount: Create's part) and its teardown (unmount, which
// frees the loop device, and removing the image: Kill's part).
func BenchmarkDisk(b *testing.B) {
	requireRunsc(b)
	r := &Runtime{stateDir: b.TempDir(), log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	for _, mb := range []int{64, 1024, 10240} {
		b.Run(fmt.Sprintf("%dMB", mb), func(b *testing.B) {
			if _, err := r.cachedImage(mb); err != nil {
				b.Fatal(err)
			}
			var setup, teardown []time.Duration
			for i := 0; b.Loop(); i++ {
				dir := filepath.Join(r.stateDir, fmt.Sprintf("d%d-%d", mb, i))
				if err := os.Mkdir(dir, 0o700); err != nil {
					b.Fatal(err)
				}
				start := time.Now()
				if _, err := r.setupDisk(dir, mb, ""); err != nil {
					b.Fatal(err)
				}
				mid := time.Now()
				if err := unmountDisk(dir); err != nil {
					b.Fatal(err)
				}
				if err := os.RemoveAll(dir); err != nil {
					b.Fatal(err)
				}
				setup, teardown = append(setup, mid.Sub(start)), append(teardown, time.Since(mid))
			}
			b.ReportMetric(median(setup), "p50-ms-setup")
			b.ReportMetric(median(teardown), "p50-ms-teardown")
		})
	}
}

// median is the median of ts in milliseconds.
func median(ts []time.Duration) float64 {
	ts = append([]time.Duration(nil), ts...)
	sort.Slice(ts, func(i, j int) bool { return ts[i] < ts[j] })
	return float64(ts[len(ts)/2].Microseconds()) / 1000
}

// BenchmarkRunscRun times a cold `runsc run` of a program that exits at
// once (the probe with -exit), with runsc's default overlay and no network:
// the baseline that Create is compared against.
func BenchmarkRunscRun(b *testing.B) {
	e := newEnv(b, "100.88.250.0/24")
	tmpl := makeTemplate(b)
	ctx := context.Background()
	var times []time.Duration
	for i := 0; b.Loop(); i++ {
		id := fmt.Sprintf("run%d", i)
		dir := filepath.Join(b.TempDir(), id)
		if err := os.Mkdir(dir, 0o700); err != nil {
			b.Fatal(err)
		}
		cfg := config(id, tmpl)
		cfg.EnvdArgs = []string{"-exit"}
		spec := e.rt.spec(cfg, dir)
		spec.Root.Path = tmpl
		spec.Linux.Namespaces = spec.Linux.Namespaces[:len(spec.Linux.Namespaces)-1] // no netns
		if err := writeJSON(filepath.Join(dir, "config.json"), spec); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		out, err := exec.CommandContext(ctx, e.rt.runsc, "--root="+e.rt.runscRoot, "--network=none", "run", "--bundle="+dir, id).CombinedOutput()
		if err != nil {
			b.Fatalf("runsc run: %v: %s", err, out)
		}
		times = append(times, time.Since(start))
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	b.ReportMetric(float64(times[len(times)/2].Microseconds())/1000, "p50-ms")
}
