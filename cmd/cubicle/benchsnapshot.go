package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/client"
)

// snapshotFigures are the medians of one `bench snapshot` run, each beside
// the pooled create measured in the same run.
type snapshotFigures struct {
	Rounds         int                `json:"rounds"`
	PooledCreateMS float64            `json:"pooled_create_p50_ms"`
	SnapshotMS     float64            `json:"snapshot_p50_ms"`
	FromSnapshotMS float64            `json:"create_from_snapshot_p50_ms"`
	ForkPerCopyMS  map[string]float64 `json:"fork_per_copy_p50_ms"`
	PauseMS        float64            `json:"pause_p50_ms"`
	PauseMiB       float64            `json:"pause_size_p50_mib,omitempty"`
	ResumeMS       float64            `json:"resume_p50_ms"`
	// RollbackMS is a rollback in place (a cubicle extension) up to the
	// first commands.run("true") after it.
	RollbackMS float64 `json:"rollback_p50_ms"`
	// CommandMS and CheckpointedCommandMS are a commands.run("true") in a
	// plain sandbox and in one with per-command checkpoints (a cubicle
	// extension), measured alternately; the difference is the checkpoint's
	// cost per command.
	CommandMS             float64 `json:"command_p50_ms"`
	CheckpointedCommandMS float64 `json:"command_per_command_checkpoint_p50_ms"`
}

// commandsPerRound is how many commands each round runs in the plain and
// the checkpointed sandbox: over the rounds, more than a sandbox keeps
// (orchestrator.MaxCommandCheckpoints), so removing the oldest is counted.
const commandsPerRound = 8

func benchSnapshotCmd() *cobra.Command {
	var cf clientFlags
	var rounds int
	var forks, tmpl, dataDir string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Snapshot, create-from-snapshot, fork, pause to disk, resume, rollback and per-command checkpoints, beside a pooled create",
		Long: `snapshot measures, against a running cubicle serve, for an idle sandbox of
--template: the snapshot (POST /sandboxes/{id}/snapshots), a create from it up
to its first commands.run("true"), a fork per copy at each --forks count, a
pause to disk and its size (read under --data-dir when the server's data
directory is on this host), and the resume (connect) up to the first
commands.run("true"). Then cubicle's extensions: a rollback in place to the
snapshot up to the first commands.run("true"), and the cost of per-command
checkpoints: a commands.run("true") in a sandbox created with metadata
cubicle.checkpoint=per-command beside one in a plain sandbox, alternately,
8 of each per round. Each is the median of --rounds (of all commands for
the last two), beside a pooled create (create to first commands.run("true"))
measured in the same run.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			var counts []int
			for _, s := range strings.Split(forks, ",") {
				n, err := strconv.Atoi(strings.TrimSpace(s))
				if err != nil || n < 1 || n > 100 {
					return fmt.Errorf("--forks: %q is not a count from 1 to 100", s)
				}
				counts = append(counts, n)
			}
			f, err := benchSnapshot(cmd.Context(), c, tmpl, dataDir, rounds, counts, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(f)
			}
			ratio := func(v float64) string {
				if f.PooledCreateMS <= 0 {
					return ""
				}
				return fmt.Sprintf("  (%.2f× pooled create)", v/f.PooledCreateMS)
			}
			fmt.Fprintf(out, "pooled create        p50=%.1f ms (rounds=%d)\n", f.PooledCreateMS, f.Rounds)
			fmt.Fprintf(out, "snapshot             p50=%.1f ms%s\n", f.SnapshotMS, ratio(f.SnapshotMS))
			fmt.Fprintf(out, "create from snapshot p50=%.1f ms%s\n", f.FromSnapshotMS, ratio(f.FromSnapshotMS))
			for _, n := range counts {
				v := f.ForkPerCopyMS[strconv.Itoa(n)]
				fmt.Fprintf(out, "fork ×%-3d per copy   p50=%.1f ms%s\n", n, v, ratio(v))
			}
			fmt.Fprintf(out, "pause to disk        p50=%.1f ms%s\n", f.PauseMS, ratio(f.PauseMS))
			if f.PauseMiB > 0 {
				fmt.Fprintf(out, "pause size           p50=%.1f MiB\n", f.PauseMiB)
			}
			fmt.Fprintf(out, "resume               p50=%.1f ms%s\n", f.ResumeMS, ratio(f.ResumeMS))
			fmt.Fprintf(out, "rollback             p50=%.1f ms%s\n", f.RollbackMS, ratio(f.RollbackMS))
			fmt.Fprintf(out, "command              p50=%.1f ms\n", f.CommandMS)
			perCmd := ""
			if f.CommandMS > 0 {
				perCmd = fmt.Sprintf("  (%.2f× a plain command, +%.1f ms)", f.CheckpointedCommandMS/f.CommandMS, f.CheckpointedCommandMS-f.CommandMS)
			}
			fmt.Fprintf(out, "checkpointed command p50=%.1f ms%s\n", f.CheckpointedCommandMS, perCmd)
			return nil
		},
	}
	cf.register(cmd.Flags())
	fl := cmd.Flags()
	fl.IntVarP(&rounds, "rounds", "n", 5, "rounds; each figure is the median over them")
	fl.StringVar(&forks, "forks", "1,10", "fork counts, comma-separated (1 to 100 each)")
	fl.StringVar(&tmpl, "template", "base", "template of the snapshotted sandbox")
	dataDirFlag(fl, &dataDir)
	fl.BoolVar(&asJSON, "json", false, "print figures as JSON")
	return cmd
}

// firstRun times until sandbox sb answers its first commands.run("true").
func firstRun(ctx context.Context, c *client.Client, sb client.Sandbox) error {
	code, err := c.Run(ctx, sb, "true", nil, nil)
	if err == nil && code != 0 {
		err = fmt.Errorf("true exited %d", code)
	}
	return err
}

func benchSnapshot(ctx context.Context, c *client.Client, tmpl, dataDir string, rounds int, counts []int, progress io.Writer) (snapshotFigures, error) {
	if rounds < 1 {
		return snapshotFigures{}, fmt.Errorf("--rounds must be at least 1")
	}
	var pooled, snaps, froms, pauses, resumes, rollbacks, plainCmds, ckptCmds []time.Duration
	var sizes []float64
	forkPer := map[int][]time.Duration{}
	var kill []string
	defer func() {
		for _, id := range kill {
			c.Kill(context.WithoutCancel(ctx), id)
		}
	}()
	create := func(template string, metadata map[string]string) (client.Sandbox, time.Duration, error) {
		t0 := time.Now()
		sb, err := c.Create(ctx, template, client.CreateOptions{Timeout: 10 * time.Minute, Metadata: metadata})
		if err != nil {
			return sb, 0, err
		}
		kill = append(kill, sb.SandboxID)
		err = firstRun(ctx, c, sb)
		return sb, time.Since(t0), err
	}
	// One checkpointed sandbox for the whole run: its checkpoints pile up
	// to the bound and the oldest go, as in an agent's long session.
	ckpt, _, err := create(tmpl, map[string]string{"cubicle.checkpoint": "per-command"})
	if err != nil {
		return snapshotFigures{}, fmt.Errorf("create with per-command checkpoints: %w", err)
	}
	for r := 0; r < rounds; r++ {
		fmt.Fprintf(progress, "bench snapshot: round %d/%d\n", r+1, rounds)
		// The baseline, in the same round.
		_, d, err := create(tmpl, nil)
		if err != nil {
			return snapshotFigures{}, fmt.Errorf("pooled create: %w", err)
		}
		pooled = append(pooled, d)
		src, _, err := create(tmpl, nil)
		if err != nil {
			return snapshotFigures{}, fmt.Errorf("create: %w", err)
		}

		var snap struct {
			SnapshotID string `json:"snapshotID"`
		}
		t0 := time.Now()
		if _, err := c.Do(ctx, http.MethodPost, "/sandboxes/"+src.SandboxID+"/snapshots", map[string]any{}, &snap); err != nil {
			return snapshotFigures{}, fmt.Errorf("snapshot: %w", err)
		}
		snaps = append(snaps, time.Since(t0))
		_, d, err = create(snap.SnapshotID, nil)
		if err != nil {
			return snapshotFigures{}, fmt.Errorf("create from snapshot: %w", err)
		}
		froms = append(froms, d)
		t0 = time.Now()
		if _, err := c.Do(ctx, http.MethodPost, "/sandboxes/"+src.SandboxID+"/rollback", map[string]any{"snapshotID": snap.SnapshotID}, nil); err != nil {
			return snapshotFigures{}, fmt.Errorf("rollback: %w", err)
		}
		if err := firstRun(ctx, c, src); err != nil {
			return snapshotFigures{}, fmt.Errorf("after a rollback: %w", err)
		}
		rollbacks = append(rollbacks, time.Since(t0))
		for i := 0; i < commandsPerRound; i++ {
			for _, sb := range []client.Sandbox{src, ckpt} {
				t0 := time.Now()
				if err := firstRun(ctx, c, sb); err != nil {
					return snapshotFigures{}, fmt.Errorf("command: %w", err)
				}
				if sb.SandboxID == ckpt.SandboxID {
					ckptCmds = append(ckptCmds, time.Since(t0))
				} else {
					plainCmds = append(plainCmds, time.Since(t0))
				}
			}
		}
		if _, err := c.Do(ctx, http.MethodDelete, "/templates/"+url.PathEscape(snap.SnapshotID), nil, nil); err != nil {
			return snapshotFigures{}, fmt.Errorf("delete snapshot: %w", err)
		}

		for _, n := range counts {
			var res []struct {
				Sandbox *client.Sandbox `json:"sandbox"`
				Error   *client.Error   `json:"error"`
			}
			t0 := time.Now()
			if _, err := c.Do(ctx, http.MethodPost, "/sandboxes/"+src.SandboxID+"/fork", map[string]any{"count": n, "timeout": 600}, &res); err != nil {
				return snapshotFigures{}, fmt.Errorf("fork ×%d: %w", n, err)
			}
			forkPer[n] = append(forkPer[n], time.Since(t0)/time.Duration(n))
			for _, fr := range res {
				if fr.Sandbox != nil {
					kill = append(kill, fr.Sandbox.SandboxID)
					c.Kill(ctx, fr.Sandbox.SandboxID)
				}
				if fr.Error != nil {
					return snapshotFigures{}, fmt.Errorf("fork ×%d: a copy failed: %s", n, fr.Error.Message)
				}
			}
		}

		t0 = time.Now()
		if _, err := c.Do(ctx, http.MethodPost, "/sandboxes/"+src.SandboxID+"/pause", map[string]any{}, nil); err != nil {
			return snapshotFigures{}, fmt.Errorf("pause: %w", err)
		}
		pauses = append(pauses, time.Since(t0))
		if mib, err := dirMiB(filepath.Join(dataDir, "snapshots", "paused", src.SandboxID)); err == nil {
			sizes = append(sizes, mib)
		}
		t0 = time.Now()
		back, err := c.Connect(ctx, src.SandboxID, 10*time.Minute)
		if err == nil {
			err = firstRun(ctx, c, back)
		}
		if err != nil {
			return snapshotFigures{}, fmt.Errorf("resume: %w", err)
		}
		resumes = append(resumes, time.Since(t0))
		// This round's sandboxes go: rounds must not fill the host.
		for _, id := range kill {
			if id != ckpt.SandboxID {
				c.Kill(ctx, id)
			}
		}
		kill = []string{ckpt.SandboxID}
	}
	p50 := func(ds []time.Duration) float64 { v, _, _ := percentiles(ds); return v }
	f := snapshotFigures{Rounds: rounds, PooledCreateMS: p50(pooled), SnapshotMS: p50(snaps), FromSnapshotMS: p50(froms),
		PauseMS: p50(pauses), ResumeMS: p50(resumes), ForkPerCopyMS: map[string]float64{},
		RollbackMS: p50(rollbacks), CommandMS: p50(plainCmds), CheckpointedCommandMS: p50(ckptCmds)}
	for n, ds := range forkPer {
		f.ForkPerCopyMS[strconv.Itoa(n)] = p50(ds)
	}
	if len(sizes) > 0 {
		f.PauseMiB = medianFloat(sizes)
	}
	return f, nil
}

// dirMiB is the disk space the files under dir take (allocated blocks, so
// a sparse disk image counts for what it holds).
func dirMiB(dir string) (float64, error) {
	var blocks int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		blocks += statBlocks(fi)
		return nil
	})
	return float64(blocks*512) / (1 << 20), err
}

func medianFloat(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// statBlocks is the 512-byte blocks fi's file holds.
func statBlocks(fi fs.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks
	}
	return 0
}
