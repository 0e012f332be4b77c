package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/cubicle-dev/cubicle/client"
	"github.com/cubicle-dev/cubicle/internal/buildprogress"
	"github.com/cubicle-dev/cubicle/template/buildspec"
	"github.com/cubicle-dev/cubicle/template/dockerfile"
)

// The template commands that work through the API, against any cubicle
// serve (or E2B): build, list, rm, logs.

// templateRef is what may name a template in FROM: a template name,
// optionally with a tag (the API's own rule).
var templateRef = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}(:[a-zA-Z0-9_.-]{1,64})?$`)

func templateBuildCmd() *cobra.Command {
	var cf clientFlags
	var file, name, progress string
	var cpus, memMB int
	var buildArgs []string
	var noCache, verbose bool
	cmd := &cobra.Command{
		Use:   "build -f Dockerfile -n NAME [CONTEXT]",
		Short: "Build a template from a Dockerfile on the server",
		Long: `Build a template from a Dockerfile on the server (E2B_API_URL).

The Dockerfile is translated here; the files of each COPY are uploaded from
CONTEXT (by default the Dockerfile's directory) unless the server has them;
the server runs the steps. A FROM that names a template (such as "base")
builds on that template; any other FROM is an image.

Progress is one line per step; a failing step's last lines of output are
shown. --progress=plain (or --verbose) prints every line of output.
Ctrl-C stops following; the build goes on on the server.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if name == "" {
				return errors.New("a template name is needed: -n NAME")
			}
			// As docker build: the Dockerfile defaults to the context's,
			// and the context to the Dockerfile's directory.
			ctxDir := ""
			if len(args) == 1 {
				ctxDir = args[0]
			}
			if file == "" {
				file = filepath.Join(ctxDir, "Dockerfile")
			}
			if ctxDir == "" {
				ctxDir = filepath.Dir(file)
			}
			mode, err := progressMode(progress, verbose, cmd.OutOrStdout())
			if err != nil {
				return err
			}
			c, err := cf.client()
			if err != nil {
				return err
			}
			return buildTemplate(cmd.Context(), c, buildRequest{file: file, ctxDir: ctxDir, name: name, cpus: cpus, memMB: memMB,
				buildArgs: buildArgs, noCache: noCache, mode: mode}, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	cf.register(cmd.Flags())
	fs := cmd.Flags()
	fs.StringVarP(&file, "file", "f", "", "the Dockerfile (default CONTEXT/Dockerfile)")
	fs.StringVarP(&name, "name", "n", "", "the template's name, optionally name:tag (required)")
	fs.IntVar(&cpus, "cpu", 0, "vCPUs of the template's sandboxes and its RUN steps (default: the server's)")
	fs.IntVar(&memMB, "memory-mb", 0, "memory in MiB of the template's sandboxes and its RUN steps (default: the server's)")
	fs.StringArrayVar(&buildArgs, "build-arg", nil, "K=V sets an ARG (K alone takes it from the environment); repeatable")
	fs.BoolVar(&noCache, "no-cache", false, "run every step, even those the server has cached")
	fs.StringVar(&progress, "progress", "auto", "auto, tty (one line per step, redrawn) or plain (every output line)")
	fs.BoolVarP(&verbose, "verbose", "v", false, "the same as --progress=plain")
	return cmd
}

// progressMode picks how a build is drawn: "auto" is tty on a terminal
// and plain lines (one per step's start and end) elsewhere.
func progressMode(flag string, verbose bool, out io.Writer) (buildprogress.Mode, error) {
	if verbose {
		return buildprogress.Plain, nil
	}
	switch flag {
	case "tty":
		return buildprogress.TTY, nil
	case "plain":
		return buildprogress.Plain, nil
	case "auto", "":
		if f, ok := out.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			return buildprogress.TTY, nil
		}
		return buildprogress.Lines, nil
	}
	return 0, fmt.Errorf("--progress %q: auto, tty or plain", flag)
}

// termWidth is out's width when it is a terminal.
func termWidth(out io.Writer) func() int {
	return func() int {
		if f, ok := out.(*os.File); ok {
			if w, _, err := term.GetSize(int(f.Fd())); err == nil {
				return w
			}
		}
		return 80
	}
}

type buildRequest struct {
	file, ctxDir, name string
	cpus, memMB        int
	buildArgs          []string
	noCache            bool
	mode               buildprogress.Mode
}

// buildTemplate parses the Dockerfile, uploads what the server lacks,
// starts the build and follows it to its end.
func buildTemplate(ctx context.Context, c *client.Client, req buildRequest, out, errOut io.Writer) error {
	text, err := os.ReadFile(req.file)
	if err != nil {
		return err
	}
	args := map[string]string{}
	for _, kv := range req.buildArgs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			v, ok = os.LookupEnv(k)
			if !ok {
				continue // as docker build: an unset K alone is no override
			}
		}
		args[k] = v
	}
	res, err := dockerfile.Parse(text, dockerfile.Options{BuildArgs: args, IsTemplate: func(ref string) bool {
		if !templateRef.MatchString(ref) {
			return false
		}
		_, err := c.TemplateAlias(ctx, ref)
		return err == nil
	}})
	var de *dockerfile.Error
	if errors.As(err, &de) {
		return fmt.Errorf("%s:%d: %s", req.file, de.Line, de.Msg)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", req.file, err)
	}
	for _, w := range res.Warnings {
		fmt.Fprintf(errOut, "%s: warning: %s\n", req.file, w)
	}
	bctx, err := dockerfile.NewContext(req.ctxDir)
	if err != nil {
		return err
	}
	spec := res.Spec
	if err := bctx.HashCopies(&spec); err != nil {
		return err
	}
	spec.Force = req.noCache

	nb, err := c.CreateTemplate(ctx, req.name, req.cpus, req.memMB)
	if err != nil {
		return fmt.Errorf("creating template %s: %w", req.name, err)
	}
	sent, had, err := uploadCopies(ctx, c, bctx, nb.TemplateID, spec.Steps)
	if err != nil {
		return err
	}
	if sent+had > 0 {
		fmt.Fprintf(out, "files of %d COPY step(s): %d uploaded, %d already on the server\n", sent+had, sent, had)
	}
	if err := c.StartBuild(ctx, nb.TemplateID, nb.BuildID, spec); err != nil {
		return fmt.Errorf("starting the build: %w", err)
	}

	titles := map[string]string{"base": "FROM " + spec.FromImage + spec.FromTemplate}
	for i, st := range spec.Steps {
		titles[fmt.Sprint(i+1)] = st.Type + " " + strings.Join(st.Args, " ")
	}
	// Steps are timed on the server's clock, as its log entries have it,
	// moved on by the local clock since the last entry: a step that
	// began and ended between two polls shows its own time, not 0.0s.
	var clockMu sync.Mutex
	var lastStamp, lastSeen time.Time
	now := func() time.Time {
		clockMu.Lock()
		defer clockMu.Unlock()
		if lastStamp.IsZero() {
			return time.Now()
		}
		return lastStamp.Add(time.Since(lastSeen))
	}
	r := buildprogress.New(out, buildprogress.Options{Mode: req.mode, Width: termWidth(out), Now: now})
	feed := buildprogress.NewFeed(r, len(spec.Steps), titles)
	stopTicks := func() {}
	if req.mode == buildprogress.TTY {
		// The running step's spinner and time move between log lines.
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
					r.Tick()
				}
			}
		}()
		stopTicks = func() { close(stop); <-stopped }
	}
	st, err := followBuild(ctx, c, nb.TemplateID, nb.BuildID, 0, func(e client.BuildLogEntry) {
		clockMu.Lock()
		lastStamp, lastSeen = e.Timestamp, time.Now()
		clockMu.Unlock()
		feed.Add(e.Level, e.Step, e.Message)
	})
	stopTicks()
	if err != nil {
		r.Close()
		if ctx.Err() != nil {
			return fmt.Errorf("stopped following; the build goes on on the server: cubicle template logs %s --build %s -f", nb.TemplateID, nb.BuildID)
		}
		return err
	}
	if st.Status == client.BuildReady {
		feed.End()
		r.Close()
		fmt.Fprintf(out, "template %s (%s) ready\n", req.name, nb.TemplateID)
		return nil
	}
	reason := client.BuildReason{Message: "the build failed"}
	if st.Reason != nil {
		reason = *st.Reason
	}
	feed.Fail(reason.Step)
	r.Close()
	return fmt.Errorf("template %s: build failed at %s: %s", req.name, feed.Label(reason.Step), reason.Message)
}

// uploadCopies uploads the files of each COPY step the server lacks, and
// says how many it sent and how many the server had.
func uploadCopies(ctx context.Context, c *client.Client, bctx dockerfile.Context, templateID string, steps []buildspec.Step) (sent, had int, err error) {
	seen := map[string]bool{}
	for _, st := range steps {
		if st.Type != buildspec.Copy || seen[st.FilesHash] {
			continue
		}
		seen[st.FilesHash] = true
		present, url, err := c.TemplateFiles(ctx, templateID, st.FilesHash)
		if err != nil {
			return sent, had, fmt.Errorf("COPY %s: %w", st.Args[0], err)
		}
		if present {
			had++
			continue
		}
		pr, pw := io.Pipe()
		go func() {
			pw.CloseWithError(bctx.WriteTar(pw, st.Args[0], st.Gzip == nil || *st.Gzip))
		}()
		err = c.Upload(ctx, url, pr)
		pr.CloseWithError(errors.New("upload ended")) // ends the writer if the PUT stopped early
		if err != nil {
			return sent, had, fmt.Errorf("COPY %s: %w", st.Args[0], err)
		}
		sent++
	}
	return sent, had, nil
}

// followBuild polls a build's status from log entry offset on, handing
// each entry to add, until the build is ready or failed.
func followBuild(ctx context.Context, c *client.Client, templateID, buildID string, offset int, add func(client.BuildLogEntry)) (client.BuildStatus, error) {
	for {
		st, err := c.BuildStatus(ctx, templateID, buildID, offset)
		if err != nil {
			return st, err
		}
		for _, e := range st.LogEntries {
			add(e)
		}
		offset += len(st.LogEntries)
		// The status is read before the log: a finished build's last page
		// has every line.
		if len(st.LogEntries) < 1000 && (st.Status == client.BuildReady || st.Status == client.BuildError) {
			return st, nil
		}
		if len(st.LogEntries) == 1000 {
			continue
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func templateListCmd(dataDir *string) *cobra.Command {
	var cf clientFlags
	var local bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List templates (through the API; --local reads this host's registry)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if local {
				return listLocalTemplates(cmd.OutOrStdout(), *dataDir)
			}
			c, err := cf.client()
			if err != nil {
				return err
			}
			ts, err := c.Templates(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tCPU\tMEMORY MB\tBUILD\tCREATED")
			for _, t := range ts {
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\n", t.TemplateID, strings.Join(t.Aliases, ","),
					t.CPUCount, t.MemoryMB, t.BuildID, t.CreatedAt.Local().Format("2006-01-02 15:04"))
			}
			return tw.Flush()
		},
	}
	cf.register(cmd.Flags())
	cmd.Flags().BoolVar(&local, "local", false, "list this host's registry (--data-dir) instead of asking the server")
	return cmd
}

func templateRmCmd() *cobra.Command {
	var cf clientFlags
	cmd := &cobra.Command{
		Use:     "rm NAME|ID...",
		Aliases: []string{"delete"},
		Short:   "Delete templates you built (refused while sandboxes use them)",
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			var errs []error
			for _, ref := range args {
				if err := c.DeleteTemplate(cmd.Context(), ref); err != nil {
					errs = append(errs, fmt.Errorf("%s: %s", ref, apiMessage(err)))
					continue
				}
				fmt.Fprintln(cmd.OutOrStdout(), "removed", ref)
			}
			return errors.Join(errs...)
		},
	}
	cf.register(cmd.Flags())
	return cmd
}

// apiMessage is an API error's own message, as the server wrote it.
func apiMessage(err error) string {
	var ae *client.Error
	if errors.As(err, &ae) {
		return ae.Message
	}
	return err.Error()
}

func templateLogsCmd() *cobra.Command {
	var cf clientFlags
	var buildID string
	var follow bool
	cmd := &cobra.Command{
		Use:   "logs NAME|ID",
		Short: "Print a template build's log (the latest build unless --build)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			ctx, out := cmd.Context(), cmd.OutOrStdout()
			t, err := c.Template(ctx, args[0])
			if err != nil {
				return fmt.Errorf("%s: %s", args[0], apiMessage(err))
			}
			if buildID == "" {
				if len(t.Builds) == 0 {
					return fmt.Errorf("%s: no builds of it on this server", args[0])
				}
				buildID = t.Builds[0].BuildID
			}
			// Durations come from the entries' times: this may be an
			// old build's log.
			var last time.Time
			r := buildprogress.New(out, buildprogress.Options{Mode: buildprogress.Plain, Now: func() time.Time { return last }})
			feed := buildprogress.NewFeed(r, 0, nil)
			add := func(e client.BuildLogEntry) { last = e.Timestamp; feed.Add(e.Level, e.Step, e.Message) }
			var st client.BuildStatus
			if follow {
				st, err = followBuild(ctx, c, t.TemplateID, buildID, 0, add)
				if err != nil && ctx.Err() != nil {
					return nil // Ctrl-C ends following
				}
			} else {
				st, err = c.BuildStatus(ctx, t.TemplateID, buildID, 0)
				for offset := 0; err == nil; {
					for _, e := range st.LogEntries {
						add(e)
					}
					offset += len(st.LogEntries)
					if len(st.LogEntries) < 1000 {
						break
					}
					st, err = c.BuildStatus(ctx, t.TemplateID, buildID, offset)
				}
			}
			if err != nil {
				return fmt.Errorf("build %s: %s", buildID, apiMessage(err))
			}
			switch st.Status {
			case client.BuildError:
				reason := client.BuildReason{Message: "the build failed"}
				if st.Reason != nil {
					reason = *st.Reason
				}
				feed.Fail(reason.Step)
				fmt.Fprintf(out, "build %s failed at %s: %s\n", buildID, feed.Label(reason.Step), reason.Message)
			case client.BuildReady:
				fmt.Fprintf(out, "build %s: ready\n", buildID)
			default:
				fmt.Fprintf(out, "build %s: %s (-f follows it)\n", buildID, st.Status)
			}
			return nil
		},
	}
	cf.register(cmd.Flags())
	cmd.Flags().StringVar(&buildID, "build", "", "the build's ID (default: the template's latest)")
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "follow the build until it ends")
	return cmd
}
