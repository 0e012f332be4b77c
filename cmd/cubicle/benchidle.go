package main

// `cubicle bench idle`: host memory per idle sandbox, measured on the host
// that runs the server (scripts/kvm-check.sh's memory figures).

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/client"
)

// idleStep is the host's memory with n idle sandboxes made by the bench.
type idleStep struct {
	// Target is the count asked for; N the count reached (fewer when the
	// host admitted no more: idleFigures.Stopped says why).
	Target int `json:"target"`
	N      int `json:"n"`
	// MemAvailable: the host's MemAvailable before the first sandbox less
	// now, in MiB, and that over N. It counts everything the sandboxes cost
	// the host (their processes, page tables, kernel objects, network
	// devices, the server's own records) and whatever else the host did
	// meanwhile, so it is noisy on a shared host.
	MemAvailableDeltaMiB float64 `json:"mem_available_delta_mib"`
	MemAvailablePerSbMiB float64 `json:"mem_available_per_sandbox_mib"`
	// PSS: the proportional set size (/proc/PID/smaps_rollup) summed over
	// the sandboxes' own host processes (a microVM's VMM; a gVisor
	// sandbox's sentry and gofer), their descendants included, and that
	// over N. Pages shared between them (a snapshot's page cache, the
	// binary) are split between their users, so the sum counts them once.
	// Kernel memory (page tables, devices) is not in it.
	PSSMiB         float64 `json:"pss_sum_mib"`
	PSSPerSbMiB    float64 `json:"pss_per_sandbox_mib"`
	Processes      int     `json:"processes"`
	PSSError       string  `json:"pss_error,omitempty"`
	MemAvailMiB    float64 `json:"mem_available_mib"`
	MeasuredAfterS float64 `json:"measured_after_s"`
}

type idleFigures struct {
	Template             string     `json:"template"`
	Concurrency          int        `json:"concurrency"`
	SettleMS             int64      `json:"settle_ms"`
	MemTotalMiB          float64    `json:"mem_total_mib"`
	BaselineMemAvailMiB  float64    `json:"baseline_mem_available_mib"`
	MinAvailableMiB      int        `json:"min_available_mib"`
	Steps                []idleStep `json:"steps"`
	Stopped              string     `json:"stopped,omitempty"`
	CreateErrors         int        `json:"create_errors"`
	Killed               int        `json:"killed"`
	KillErrors           int        `json:"kill_errors"`
	FirstKillErrorString string     `json:"first_kill_error,omitempty"`
}

func benchIdleCmd() *cobra.Command {
	var cf clientFlags
	var steps []int
	var conc, minAvail int
	var settle, sbTimeout time.Duration
	var tmpl, dataDir string
	var asJSON, keep bool
	cmd := &cobra.Command{
		Use:   "idle",
		Short: "Host memory per idle sandbox, amortised over -n sandboxes (run on the server's host)",
		Long: `idle measures, on the host that runs cubicle serve, what idle sandboxes cost
the host's memory. It waits --settle, reads the host's MemAvailable, then creates
sandboxes (-c at once; each answers a commands.run("true") before it counts) until
the first count of -n is reached, waits --settle so they are idle, and measures:
  - MemAvailable before less now, over the count (everything, noisy on a busy host);
  - the PSS (/proc/PID/smaps_rollup) of the sandboxes' own host processes, summed,
    over the count: a microVM's VMM process (its pid from
    <data-dir>/microvm/<id>/sandbox.json), a gVisor sandbox's sentry and gofer (the
    processes whose command line names <data-dir>/gvisor/<id>), with descendants.
Then it creates more up to the next count of -n, and so on; it kills every
sandbox it made at the end (unless --keep), an interrupt included. It stops early,
saying why, when a create fails (the server's admission control refusing is the
usual reason) or when MemAvailable falls under --min-available-mb. The server's
pool is in both readings, so it cancels out.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			f, err := benchIdle(cmd.Context(), c, idleOptions{
				Template: tmpl, DataDir: dataDir, Steps: steps, Concurrency: conc,
				Settle: settle, SandboxTimeout: sbTimeout, MinAvailableMiB: minAvail, Keep: keep,
				Progress: cmd.ErrOrStderr(),
			})
			if err != nil && len(f.Steps) == 0 {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				if jerr := enc.Encode(f); jerr != nil {
					return jerr
				}
				return err
			}
			fmt.Fprintf(out, "host MemTotal %.0f MiB, MemAvailable before %.0f MiB (c=%d settle=%s template=%s)\n",
				f.MemTotalMiB, f.BaselineMemAvailMiB, f.Concurrency, settle, f.Template)
			for _, s := range f.Steps {
				fmt.Fprintf(out, "n=%d: MemAvailable -%.1f MiB = %.2f MiB per sandbox; PSS of %d sandbox processes %.1f MiB = %.2f MiB per sandbox",
					s.N, s.MemAvailableDeltaMiB, s.MemAvailablePerSbMiB, s.Processes, s.PSSMiB, s.PSSPerSbMiB)
				if s.PSSError != "" {
					fmt.Fprintf(out, " (PSS not measured: %s)", s.PSSError)
				}
				fmt.Fprintln(out)
			}
			if f.Stopped != "" {
				fmt.Fprintln(out, "stopped early:", f.Stopped)
			}
			if f.KillErrors > 0 {
				fmt.Fprintf(out, "kill errors: %d, first: %s\n", f.KillErrors, f.FirstKillErrorString)
			}
			return err
		},
	}
	cf.register(cmd.Flags())
	fl := cmd.Flags()
	fl.IntSliceVarP(&steps, "n", "n", []int{100, 1000}, "counts of idle sandboxes to measure at, ascending (comma-separated)")
	fl.IntVarP(&conc, "concurrency", "c", 8, "creates in flight at once")
	fl.DurationVar(&settle, "settle", 10*time.Second, "wait before each reading, so the sandboxes are idle and the server's pool is full")
	fl.DurationVar(&sbTimeout, "sandbox-timeout", time.Hour, "the sandboxes' timeout, should the bench be killed before it kills them")
	fl.IntVar(&minAvail, "min-available-mb", 2048, "stop creating when the host's MemAvailable falls under this (MiB)")
	fl.StringVar(&tmpl, "template", "base", "template to create from")
	dataDirFlag(fl, &dataDir)
	fl.BoolVar(&asJSON, "json", false, "print figures as JSON")
	fl.BoolVar(&keep, "keep", false, "leave the sandboxes running at the end")
	return cmd
}

type idleOptions struct {
	Template, DataDir string
	Steps             []int
	Concurrency       int
	Settle            time.Duration
	SandboxTimeout    time.Duration
	MinAvailableMiB   int
	Keep              bool
	Progress          io.Writer
}

func benchIdle(ctx context.Context, c *client.Client, o idleOptions) (f idleFigures, err error) {
	if len(o.Steps) == 0 || o.Concurrency < 1 {
		return f, errors.New("-n needs at least one count and -c at least 1")
	}
	for i, n := range o.Steps {
		if n < 1 || (i > 0 && n <= o.Steps[i-1]) {
			return f, fmt.Errorf("-n %v: counts must be positive and ascending", o.Steps)
		}
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	f = idleFigures{Template: o.Template, Concurrency: o.Concurrency, SettleMS: o.Settle.Milliseconds(), MinAvailableMiB: o.MinAvailableMiB}
	total, _, err := memInfo()
	if err != nil {
		return f, err
	}
	f.MemTotalMiB = mib(total)

	var mu sync.Mutex
	var ids []string
	defer func() {
		if o.Keep {
			return
		}
		// Killed with a context of its own: an interrupt that ended ctx
		// must not leave the sandboxes behind.
		kctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		f.Killed, f.KillErrors, f.FirstKillErrorString = killAll(kctx, c, ids, o.Concurrency)
	}()

	if err := sleepCtx(ctx, o.Settle); err != nil {
		return f, err
	}
	_, base, err := memInfo()
	if err != nil {
		return f, err
	}
	f.BaselineMemAvailMiB = mib(base)
	start := time.Now()

	stopped := false
	halt := func(why string) { // with mu held
		if !stopped {
			stopped, f.Stopped = true, why
		}
	}
	claimed := 0 // creates begun, guarded by mu
	for _, target := range o.Steps {
		var wg sync.WaitGroup
		for w := 0; w < o.Concurrency; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					mu.Lock()
					if stopped || claimed >= target || ctx.Err() != nil {
						mu.Unlock()
						return
					}
					if _, avail, err := memInfo(); err == nil && mib(avail) < float64(o.MinAvailableMiB) {
						halt(fmt.Sprintf("the host's MemAvailable fell to %.0f MiB, under --min-available-mb %d", mib(avail), o.MinAvailableMiB))
						mu.Unlock()
						return
					}
					claimed++
					mu.Unlock()
					err := createIdle(ctx, c, o, func(id string) {
						mu.Lock()
						ids = append(ids, id)
						mu.Unlock()
					})
					mu.Lock()
					if err != nil {
						claimed-- // a create that failed made nothing to count
						if ctx.Err() == nil {
							f.CreateErrors++
							halt(fmt.Sprintf("a create failed with %d sandboxes made: %v", len(ids), err))
						}
					} else if n := len(ids); n%50 == 0 {
						fmt.Fprintf(o.Progress, "bench idle: %d/%d\n", n, target)
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if ctx.Err() != nil {
			return f, ctx.Err()
		}
		n := len(ids)
		if n == 0 || (len(f.Steps) > 0 && n == f.Steps[len(f.Steps)-1].N) {
			break
		}
		if err := sleepCtx(ctx, o.Settle); err != nil {
			return f, err
		}
		_, avail, err := memInfo()
		if err != nil {
			return f, err
		}
		s := idleStep{Target: target, N: n, MemAvailMiB: mib(avail), MeasuredAfterS: time.Since(start).Seconds()}
		s.MemAvailableDeltaMiB = mib(base) - mib(avail)
		s.MemAvailablePerSbMiB = s.MemAvailableDeltaMiB / float64(n)
		pss, procs, perr := sandboxPSS("/proc", o.DataDir, ids)
		if perr != nil {
			s.PSSError = perr.Error()
		} else {
			s.PSSMiB = mib(pss)
			s.PSSPerSbMiB = s.PSSMiB / float64(n)
			s.Processes = procs
		}
		f.Steps = append(f.Steps, s)
		if stopped {
			break
		}
	}
	return f, nil
}

// createIdle creates one sandbox, hands its ID to made at once (so that it
// is killed at the end whatever happens next) and waits until its envd has
// run a command: an idle sandbox is one that has served.
func createIdle(ctx context.Context, c *client.Client, o idleOptions, made func(string)) error {
	sb, err := c.Create(ctx, o.Template, client.CreateOptions{Timeout: o.SandboxTimeout})
	if err != nil {
		return err
	}
	made(sb.SandboxID)
	code, err := c.Run(ctx, sb, "true", nil, nil)
	if err == nil && code != 0 {
		err = fmt.Errorf("true exited %d", code)
	}
	return err
}

// killAll kills the sandboxes ids, conc at once.
func killAll(ctx context.Context, c *client.Client, ids []string, conc int) (killed, errs int, first string) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	jobs := make(chan string)
	for w := 0; w < max(conc, 1); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range jobs {
				err := c.Kill(ctx, id)
				mu.Lock()
				if err != nil {
					errs++
					if first == "" {
						first = fmt.Sprintf("%s: %v", id, err)
					}
				} else {
					killed++
				}
				mu.Unlock()
			}
		}()
	}
	for _, id := range ids {
		jobs <- id
	}
	close(jobs)
	wg.Wait()
	return killed, errs, first
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// memInfo returns the host's MemTotal and MemAvailable in bytes.
func memInfo() (total, avail uint64, err error) {
	fh, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, 0, err
	}
	defer fh.Close()
	return parseMemInfo(fh)
}

// parseMemInfo reads MemTotal and MemAvailable from /proc/meminfo's text
// (proc(5): "Name:   value kB").
func parseMemInfo(r io.Reader) (total, avail uint64, err error) {
	kb, err := kbFields(r, "MemTotal", "MemAvailable")
	if err != nil {
		return 0, 0, fmt.Errorf("/proc/meminfo: %w", err)
	}
	return kb[0] << 10, kb[1] << 10, nil
}

// kbFields reads the "Name: N kB" lines named from r, in the order asked;
// each must be there once.
func kbFields(r io.Reader, names ...string) ([]uint64, error) {
	out := make([]uint64, len(names))
	seen := make([]bool, len(names))
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		i := slices.Index(names, k)
		if i < 0 {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) != 2 || fs[1] != "kB" {
			return nil, fmt.Errorf("%s: %q is not \"N kB\"", k, strings.TrimSpace(v))
		}
		n, err := strconv.ParseUint(fs[0], 10, 64)
		if err != nil || n > 1<<53 {
			return nil, fmt.Errorf("%s: %q is not a size", k, fs[0])
		}
		if seen[i] {
			return nil, fmt.Errorf("%s given twice", k)
		}
		out[i], seen[i] = n, true
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	for i, ok := range seen {
		if !ok {
			return nil, fmt.Errorf("no %s", names[i])
		}
	}
	return out, nil
}

// pssOf returns a process's proportional set size in bytes.
func pssOf(proc string, pid int) (uint64, error) {
	fh, err := os.Open(filepath.Join(proc, strconv.Itoa(pid), "smaps_rollup"))
	if err != nil {
		return 0, err
	}
	defer fh.Close()
	kb, err := kbFields(fh, "Pss")
	if err != nil {
		return 0, fmt.Errorf("smaps_rollup of %d: %w", pid, err)
	}
	return kb[0] << 10, nil
}

// procEntry is one process as sandboxProcs sees it.
type procEntry struct {
	ppid int
	args []string
}

// readProcs lists the processes under proc: parent and command line.
// Processes that end while it reads are left out.
func readProcs(proc string) (map[int]procEntry, error) {
	des, err := os.ReadDir(proc)
	if err != nil {
		return nil, err
	}
	ps := make(map[int]procEntry)
	for _, de := range des {
		pid, err := strconv.Atoi(de.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join(proc, de.Name(), "stat"))
		if err != nil {
			continue
		}
		// proc_pid_stat(5): "pid (comm) state ppid ..."; comm may hold
		// spaces and parentheses, so parse after the last ')'.
		i := strings.LastIndexByte(string(stat), ')')
		if i < 0 {
			continue
		}
		fs := strings.Fields(string(stat[i+1:]))
		if len(fs) < 2 {
			continue
		}
		ppid, err := strconv.Atoi(fs[1])
		if err != nil {
			continue
		}
		cl, _ := os.ReadFile(filepath.Join(proc, de.Name(), "cmdline"))
		ps[pid] = procEntry{ppid: ppid, args: strings.Split(strings.TrimRight(string(cl), "\x00"), "\x00")}
	}
	return ps, nil
}

// sandboxProcs finds each sandbox's host processes: the VMM whose pid a
// microVM sandbox's record holds (<dataDir>/microvm/<id>/sandbox.json),
// and the processes whose command line names a gVisor sandbox's bundle
// (<dataDir>/gvisor/<id>: its sentry and gofer), each with every
// descendant (gVisor's systrap stubs). It returns the pids per sandbox.
func sandboxProcs(proc, dataDir string, ids []string) (map[string][]int, error) {
	ps, err := readProcs(proc)
	if err != nil {
		return nil, err
	}
	children := make(map[int][]int)
	for pid, p := range ps {
		children[p.ppid] = append(children[p.ppid], pid)
	}
	want := make(map[string]string, len(ids)) // bundle dir → id
	for _, id := range ids {
		want[filepath.Join(dataDir, "gvisor", id)] = id
	}
	roots := make(map[string][]int, len(ids))
	for pid, p := range ps {
		for _, a := range p.args {
			// An argument that is the bundle, ends with it (--bundle=),
			// or is under it (--log=<bundle>/runsc.log).
			if _, v, ok := strings.Cut(a, "="); ok && strings.HasPrefix(v, "/") {
				a = v
			}
			if id, ok := want[a]; ok {
				roots[id] = append(roots[id], pid)
				break
			}
			if d := filepath.Dir(a); want[d] != "" {
				roots[want[d]] = append(roots[want[d]], pid)
				break
			}
		}
	}
	for _, id := range ids {
		b, err := os.ReadFile(filepath.Join(dataDir, "microvm", id, "sandbox.json"))
		if err != nil {
			continue
		}
		var rec struct {
			Pid int `json:"pid"`
		}
		if json.Unmarshal(b, &rec) == nil && rec.Pid > 0 {
			if _, alive := ps[rec.Pid]; alive {
				roots[id] = append(roots[id], rec.Pid)
			}
		}
	}
	out := make(map[string][]int, len(roots))
	for id, rs := range roots {
		seen := make(map[int]bool)
		stack := slices.Clone(rs)
		for len(stack) > 0 {
			pid := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			if seen[pid] {
				continue
			}
			seen[pid] = true
			stack = append(stack, children[pid]...)
		}
		for pid := range seen {
			out[id] = append(out[id], pid)
		}
		slices.Sort(out[id])
	}
	return out, nil
}

// sandboxPSS sums the PSS of the sandboxes' host processes (sandboxProcs),
// each process once. A sandbox with no process found is an error: the
// sum would leave it out and flatter the figure.
func sandboxPSS(proc, dataDir string, ids []string) (pss uint64, procs int, err error) {
	if dataDir == "" {
		return 0, 0, errors.New("no --data-dir")
	}
	by, err := sandboxProcs(proc, dataDir, ids)
	if err != nil {
		return 0, 0, err
	}
	var missing []string
	counted := make(map[int]bool)
	for _, id := range ids {
		if len(by[id]) == 0 {
			missing = append(missing, id)
			continue
		}
		for _, pid := range by[id] {
			if counted[pid] {
				continue
			}
			counted[pid] = true
			n, err := pssOf(proc, pid)
			if err != nil {
				return 0, 0, fmt.Errorf("sandbox %s: %w", id, err)
			}
			pss += n
		}
	}
	if len(missing) > 0 {
		return 0, 0, fmt.Errorf("no host process found for %d of %d sandboxes (first %s) under %s: is --data-dir the server's?",
			len(missing), len(ids), missing[0], dataDir)
	}
	return pss, len(counted), nil
}
