package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/client"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
)

func benchCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "bench", Short: "Measure end-to-end figures (medians and percentiles)"}
	cmd.AddCommand(benchCreateCmd())
	cmd.AddCommand(benchIdleCmd())
	cmd.AddCommand(benchCodeinterpCmd())
	cmd.AddCommand(benchSnapshotCmd())
	cmd.AddCommand(benchVMMCmd())
	return cmd
}

// percentiles returns p50, p90 and p99 of ds in milliseconds (nearest rank).
func percentiles(ds []time.Duration) (p50, p90, p99 float64) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(p float64) float64 {
		i := int(p*float64(len(s))+0.999999) - 1
		i = max(0, min(i, len(s)-1))
		return float64(s[i].Microseconds()) / 1000
	}
	return at(0.50), at(0.90), at(0.99)
}

// mean returns the mean of ds in milliseconds (what CubeSandbox publishes).
func mean(ds []time.Duration) float64 {
	if len(ds) == 0 {
		return 0
	}
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	return float64((sum / time.Duration(len(ds))).Microseconds()) / 1000
}

type benchFigures struct {
	N              int     `json:"n"`
	Concurrency    int     `json:"concurrency"`
	SettleMS       int64   `json:"settle_ms,omitempty"`
	Errors         int     `json:"errors"`
	CreateP50      float64 `json:"create_p50_ms"`
	CreateP90      float64 `json:"create_p90_ms"`
	CreateP99      float64 `json:"create_p99_ms"`
	CreateMean     float64 `json:"create_mean_ms"`
	RunTrueP50     float64 `json:"run_true_p50_ms"`
	RunTrueP99     float64 `json:"run_true_p99_ms"`
	ColdRunscP50   float64 `json:"cold_runsc_p50_ms,omitempty"`
	CreateVsRunsc  float64 `json:"create_over_cold_runsc,omitempty"`
	FirstErrorText string  `json:"first_error,omitempty"`
}

func benchCreateCmd() *cobra.Command {
	var cf clientFlags
	var n, conc, coldN int
	var settle time.Duration
	var tmpl, dataDir, cacheDir, runsc string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create → first commands.run(\"true\") answered, against a running server",
		Long: `create measures, against a running cubicle serve, the time from the create
request to the answer of the sandbox's first commands.run("true"), and then the
round trip of a second run of "true". When the server's data directory and
runsc are reachable it also measures a cold "runsc run /bin/true" on the same
template's root filesystem, in the same invocation, as the baseline.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			f, err := benchCreate(cmd.Context(), c, tmpl, n, conc, settle, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			if coldN > 0 {
				rs, rerr := gvisor.FindRunsc(runsc, cacheDir)
				if rerr == nil {
					var cold []time.Duration
					cold, rerr = coldRunsc(cmd.Context(), rs, filepath.Join(dataDir, "templates", tmpl, "rootfs"), coldN)
					if rerr == nil {
						f.ColdRunscP50, _, _ = percentiles(cold)
						if f.ColdRunscP50 > 0 {
							f.CreateVsRunsc = f.CreateP50 / f.ColdRunscP50
						}
					}
				}
				if rerr != nil {
					fmt.Fprintln(cmd.ErrOrStderr(), "cold runsc baseline not measured:", rerr)
				}
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(f)
			}
			fmt.Fprintf(out, "create p50=%.1f p90=%.1f p99=%.1f mean=%.1f ms (n=%d c=%d settle=%s errors=%d)\n", f.CreateP50, f.CreateP90, f.CreateP99, f.CreateMean, f.N, f.Concurrency, settle, f.Errors)
			fmt.Fprintf(out, "run-true p50=%.1f p99=%.1f ms\n", f.RunTrueP50, f.RunTrueP99)
			if f.ColdRunscP50 > 0 {
				fmt.Fprintf(out, "cold-runsc p50=%.1f ms\n", f.ColdRunscP50)
				fmt.Fprintf(out, "create/cold-runsc ratio=%.2f\n", f.CreateVsRunsc)
			}
			if f.FirstErrorText != "" {
				fmt.Fprintln(out, "first error:", f.FirstErrorText)
			}
			return nil
		},
	}
	cf.register(cmd.Flags())
	fl := cmd.Flags()
	fl.IntVarP(&n, "n", "n", 200, "sandboxes to create")
	fl.IntVarP(&conc, "concurrency", "c", 1, "creates in flight at once")
	fl.IntVar(&coldN, "cold-n", 20, "cold runsc runs for the baseline (0 to skip)")
	fl.DurationVar(&settle, "settle", 0, "pause after each sandbox, so the server's pool refills: measures pooled creates rather than throughput")
	fl.StringVar(&tmpl, "template", "base", "template to create from")
	dataDirFlag(fl, &dataDir)
	fl.StringVar(&cacheDir, "cache-dir", envOr("CUBICLE_CACHE_DIR", "/var/cache/cubicle"), "cache dir (to find runsc)")
	fl.StringVar(&runsc, "runsc", envOr("CUBICLE_RUNSC", ""), "runsc path for the baseline")
	fl.BoolVar(&asJSON, "json", false, "print figures as JSON")
	return cmd
}

func benchCreate(ctx context.Context, c *client.Client, tmpl string, n, conc int, settle time.Duration, progress io.Writer) (benchFigures, error) {
	if n < 1 || conc < 1 {
		return benchFigures{}, fmt.Errorf("-n and -c must be at least 1")
	}
	f := benchFigures{N: n, Concurrency: conc, SettleMS: settle.Milliseconds()}
	var mu sync.Mutex
	var creates, runs []time.Duration
	jobs := make(chan int)
	var wg sync.WaitGroup
	record := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		f.Errors++
		if f.FirstErrorText == "" {
			f.FirstErrorText = err.Error()
		}
	}
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				t0 := time.Now()
				sb, err := c.Create(ctx, tmpl, client.CreateOptions{Timeout: 2 * time.Minute})
				if err != nil {
					record(err)
					continue
				}
				code, err := c.Run(ctx, sb, "true", nil, nil)
				created := time.Since(t0)
				if err == nil && code != 0 {
					err = fmt.Errorf("true exited %d", code)
				}
				var run time.Duration
				if err == nil {
					t1 := time.Now()
					_, err = c.Run(ctx, sb, "true", nil, nil)
					run = time.Since(t1)
				}
				if kerr := c.Kill(ctx, sb.SandboxID); kerr != nil && err == nil {
					err = kerr
				}
				if settle > 0 {
					select {
					case <-ctx.Done():
					case <-time.After(settle):
					}
				}
				if err != nil {
					record(err)
					continue
				}
				mu.Lock()
				creates = append(creates, created)
				runs = append(runs, run)
				if len(creates)%20 == 0 {
					fmt.Fprintf(progress, "bench: %d/%d\n", len(creates), n)
				}
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < n && ctx.Err() == nil; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	f.CreateP50, f.CreateP90, f.CreateP99 = percentiles(creates)
	f.CreateMean = mean(creates)
	f.RunTrueP50, _, f.RunTrueP99 = percentiles(runs)
	return f, ctx.Err()
}

// coldRunsc times `runsc run /bin/true` over rootfs: a new sandbox booted
// from nothing, the cost the pool hides.
func coldRunsc(ctx context.Context, runsc, rootfs string, n int) ([]time.Duration, error) {
	if _, err := os.Stat(filepath.Join(rootfs, "bin", "true")); err != nil {
		return nil, fmt.Errorf("template root filesystem %s: %w", rootfs, err)
	}
	dir, err := os.MkdirTemp("", "cubicle-bench-runsc-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	spec := map[string]any{
		"ociVersion": "1.0.2",
		"process": map[string]any{
			"args": []string{"/bin/true"}, "cwd": "/",
			"env":  []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			"user": map[string]int{"uid": 0, "gid": 0},
		},
		"root":     map[string]any{"path": rootfs, "readonly": true},
		"hostname": "bench",
		"mounts": []map[string]any{
			{"destination": "/proc", "type": "proc", "source": "proc"},
			{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
		},
		"linux": map[string]any{"namespaces": []map[string]string{{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}}},
	}
	b, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		return nil, err
	}
	var out []time.Duration
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("bench-%d-%d", os.Getpid(), i)
		t0 := time.Now()
		cmd := exec.CommandContext(ctx, runsc, "--root", filepath.Join(dir, "state"), "--network=none", "run", "--bundle", dir, id)
		if msg, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("runsc run: %w: %s", err, msg)
		}
		out = append(out, time.Since(t0))
	}
	return out, nil
}
