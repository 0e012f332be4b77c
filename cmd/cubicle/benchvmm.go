//go:build vmmbench

package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
	"github.com/cubicle-dev/cubicle/vmm/vmmbench"
)

// benchVMMCmd measures the VMM on this host (package vmm/vmmbench): one
// line per figure, medians and percentiles, never a pass/fail verdict. It
// is built only with -tags vmmbench: it embeds the freestanding C test
// guest (vmm/testguest) and builds it with gcc, which the product binary
// has no use for (benchvmm_off.go says how to get it).
func benchVMMCmd() *cobra.Command {
	var n, parallel, procN, poolSize, clones int
	var jail bool
	var dir string
	cmd := &cobra.Command{
		Use:   "vmm",
		Short: "Measure the VMM: restore latency, VMM process memory, memory per clone",
		Long: `vmm measures, on this host, with the freestanding test guest (gcc and /dev/kvm
needed):

  restore           a 512 MiB snapshot restored in this process until its vCPU runs guest
                    code (its first port write), one at a time, then --parallel at a time;
  restore-cold      a new ` + "`cubicle vmm`" + ` process, a new VM, the same restore;
  restore-pooled    the same from an idle pooled process whose VM and memory slot exist;
  vmm private memory  Private_Clean+Private_Dirty of a VMM process running a guest with a
                    disk, entropy and vsock, from /proc/<pid>/smaps_rollup, minus the guest
                    RAM mapping's own private pages (its /proc/<pid>/smaps entry, found by
                    the address the VMM reports);
  clones            --clones restored copies of one snapshot alive at once in this process:
                    total memory growth and the least-squares slope per clone.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			out, progress := cmd.OutOrStdout(), cmd.ErrOrStderr()
			if dir == "" {
				d, err := os.MkdirTemp("", "cubicle-bench-vmm")
				if err != nil {
					return err
				}
				defer os.RemoveAll(d)
				dir = d
			}
			if jail && !vmmbench.CanJail() {
				fmt.Fprintln(progress, "not root: VMM processes run unjailed")
				jail = false
			}
			return benchVMM(cmd, out, progress, dir, benchVMMOptions{n, parallel, procN, poolSize, clones, jail})
		},
	}
	fl := cmd.Flags()
	fl.IntVarP(&n, "n", "n", 200, "in-process restores per figure")
	fl.IntVar(&parallel, "parallel", 20, "restores at once for the parallel figure")
	fl.IntVar(&procN, "process-n", 50, "restores for the cold and pooled process figures")
	fl.IntVar(&poolSize, "pool", 4, "idle processes in the pool")
	fl.IntVar(&clones, "clones", 1000, "clones alive at once for the memory slope (0 skips)")
	fl.BoolVar(&jail, "jail", true, "jail the VMM processes (needs root)")
	fl.StringVar(&dir, "dir", "", "work directory (default: a temporary one)")
	return cmd
}

type benchVMMOptions struct {
	n, parallel, procN, poolSize, clones int
	jail                                 bool
}

func benchVMM(cmd *cobra.Command, out, progress io.Writer, dir string, o benchVMMOptions) error {
	ctx := cmd.Context()
	line := func(name string, lat []time.Duration, what string) float64 {
		p50, _, p99 := percentiles(lat)
		fmt.Fprintf(out, "%s p50=%.2f p99=%.2f ms (%s, n=%d)\n", name, p50, p99, what, len(lat))
		return p50
	}

	fmt.Fprintln(progress, "building the 512 MiB snapshot")
	snapDir := filepath.Join(dir, "restore")
	if err := os.MkdirAll(snapDir, 0o755); err != nil {
		return err
	}
	statePath, memPath, err := vmmbench.MakeSnapshot(snapDir, vmmbench.RestoreMemory)
	if err != nil {
		return err
	}
	for _, p := range []string{snapDir, statePath, memPath} {
		if err := os.Chmod(p, 0o755); err != nil {
			return err
		}
	}
	lat, err := vmmbench.RestoreLatencies(statePath, memPath, o.n, 1)
	if err != nil {
		return err
	}
	line("restore", lat, "512 MiB snapshot → running vCPU, serial")
	lat, err = vmmbench.RestoreLatencies(statePath, memPath, o.n, o.parallel)
	if err != nil {
		return err
	}
	line("restore", lat, fmt.Sprintf("512 MiB snapshot → running vCPU, %d in parallel", o.parallel))
	diffDir := filepath.Join(dir, "diff")
	if err := os.MkdirAll(diffDir, 0o755); err != nil {
		return err
	}
	df, err := vmmbench.DiffSnapshot(diffDir, statePath, memPath, 100*time.Millisecond)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "diff snapshot size=%d KiB (%d dirty pages; 512 MiB guest restored with dirty tracking, run 100 ms; SnapshotDiff %.2f ms)\n",
		df.Allocated>>10, df.Pages, float64(df.Took.Microseconds())/1000)

	exe, err := os.Executable()
	if err != nil {
		return err
	}
	jailWord := "unjailed"
	pc := vmmbench.ProcessConfig{
		Spawn:     control.SpawnConfig{Path: exe, Args: []string{"vmm"}, Stderr: progress},
		StatePath: statePath, MemPath: memPath,
	}
	if o.jail {
		jailWord = "jailed"
		pc.Spawn.Jail = &jailer.Config{Root: filepath.Join(dir, "jails"), PidsLimit: 512}
	}
	cold, err := vmmbench.ColdRestores(ctx, pc, o.procN)
	if err != nil {
		return err
	}
	coldP50 := line("restore-cold", cold, "new `cubicle vmm` process + new VM → running vCPU, "+jailWord)
	pooled, err := vmmbench.PooledRestores(ctx, pc, o.procN, o.poolSize, 1)
	if err != nil {
		return err
	}
	pooledP50 := line("restore-pooled", pooled, "idle pooled process, VM and memory slot ready → running vCPU, "+jailWord)
	if coldP50 > 0 {
		fmt.Fprintf(out, "pooled/cold p50 ratio=%.2f\n", pooledP50/coldP50)
	}
	pooled, err = vmmbench.PooledRestores(ctx, pc, o.procN, o.parallel, o.parallel)
	if err != nil {
		return err
	}
	line("restore-pooled", pooled, fmt.Sprintf("%d pooled processes restoring at once, %s", o.parallel, jailWord))

	devDir := filepath.Join(dir, "devices")
	if err := os.MkdirAll(devDir, 0o755); err != nil {
		return err
	}
	devState, devMem, err := vmmbench.MakeDeviceSnapshot(devDir, vmmbench.DeviceGuestMemory)
	if err != nil {
		return err
	}
	mc := pc
	mc.StatePath, mc.MemPath = devState, devMem
	fig, err := vmmbench.VMMPrivateMemory(ctx, mc, devDir)
	if err != nil {
		return err
	}
	mib := func(b float64) float64 { return b / (1 << 20) }
	fmt.Fprintf(out, "vmm private memory=%.2f MiB (smaps_rollup Private_Clean+Private_Dirty %.2f MiB minus the guest RAM mapping's %.2f MiB; guest with disk, entropy, vsock; %s)\n",
		mib(float64(fig.VMM)), mib(float64(fig.Total)), mib(float64(fig.Guest)), jailWord)

	if o.clones > 0 {
		cloneDir := filepath.Join(dir, "clones")
		if err := os.MkdirAll(cloneDir, 0o755); err != nil {
			return err
		}
		cs, cm, err := vmmbench.MakeIdleSnapshot(cloneDir, vmmbench.CloneMemory)
		if err != nil {
			return err
		}
		cf, err := vmmbench.Clones(ctx, cs, cm, o.clones, progress)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "clones n=%d alive: memory growth=%.1f MiB slope=%.3f MiB/clone (%s; this process's RSS +%.1f MiB)\n",
			cf.N, mib(cf.Growth), mib(cf.Slope), cf.Source, mib(cf.RSSGrowth))
	}
	return nil
}
