package gvisor

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/network"
)

// BenchmarkCreate measures Create until envd answers /health, the figure
// that matters to a pool refilling itself. Kill runs off the clock. Extra
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
		sb, err := e.rt.Create(ctx, config(testID("bench"), tmpl))
		if err != nil {
			b.Fatal(err)
		}
		if err := pollHealth(sb.Addr, 10*time.Second); err != nil {
			b.Fatal(err)
		}
		times = append(times, time.Since(start))
		b.StopTimer()
		if err := e.rt.Kill(ctx, sb.ID); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	b.ReportMetric(float64(times[len(times)/2].Microseconds())/1000, "p50-ms")
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
		spec := e.rt.spec(cfg, dir, network.Attachment{})
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
