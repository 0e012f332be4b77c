package main

// The code interpreter: the hidden in-sandbox server, its template, and its
// benchmark.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/client"
	"github.com/cubicle-dev/cubicle/guest/codeinterp"
	"github.com/cubicle-dev/cubicle/template"
)

// codeinterpCmd runs the code interpreter server. It is hidden: the
// code-interpreter-v1 template starts it in each sandbox from the binary the
// runtime mounts at /.cubicle/envd.
func codeinterpCmd() *cobra.Command {
	var (
		port             int
		python, bash     string
		preload, envdURL string
		logLevel         string
	)
	cmd := &cobra.Command{
		Use:    "codeinterp",
		Short:  "Run the code interpreter server (started inside code-interpreter-v1 sandboxes)",
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if port <= 0 || port > 65535 {
				return fmt.Errorf("--port %d out of range", port)
			}
			var mods []string
			for _, m := range strings.Split(preload, ",") {
				if m = strings.TrimSpace(m); m != "" {
					mods = append(mods, m)
				}
			}
			return codeinterp.Run(cmd.Context(), net.JoinHostPort("", strconv.Itoa(port)), codeinterp.Options{
				Python:  python,
				Bash:    bash,
				EnvdURL: envdURL,
				Preload: mods,
				Logger:  newLogger(logLevel),
			})
		},
	}
	f := cmd.Flags()
	f.IntVar(&port, "port", codeinterp.Port, "TCP port to serve on")
	f.StringVar(&python, "python", "/usr/bin/python3", "Python interpreter with ipykernel")
	f.StringVar(&bash, "bash", "/bin/bash", "shell of bash contexts")
	// What a data-science cell imports first, imported before the server
	// reports ready, so that its first use costs nothing.
	f.StringVar(&preload, "preload", "numpy,pandas,matplotlib.pyplot", "comma-separated Python modules the default context imports at start")
	f.StringVar(&envdURL, "envd-url", "http://127.0.0.1:49983", "envd inside this sandbox: it checks access tokens and holds the sandbox's environment (empty: every request but /health is refused)")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	return cmd
}

// buildCodeInterpreterCmd is `cubicle template build-code-interpreter`.
func buildCodeInterpreterCmd(dataDir, cacheDir *string) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "build-code-interpreter",
		Short: "Build the template \"code-interpreter-v1\" (base + ipykernel, numpy, pandas, matplotlib, scipy; cached by its inputs)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if os.Geteuid() != 0 {
				return errors.New("building a template needs root (debootstrap, chroot)")
			}
			t, err := template.BuildCodeInterpreter(cmd.Context(), template.BuildOptions{
				DataDir: *dataDir, CacheDir: *cacheDir, Progress: cmd.ErrOrStderr(), Force: force,
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "template %s (%s) ready (build %s)\n", t.TemplateID, template.CodeInterpreterAlias, t.BuildID)
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "rebuild the code interpreter layer even when the cache has it")
	return cmd
}

// ensureCodeInterpreterTemplate builds code-interpreter-v1 when the data
// dir lacks it, with progress on stderr (a few minutes the first time on a
// machine, seconds from the cache after).
func ensureCodeInterpreterTemplate(ctx context.Context, c serveConfig) error {
	reg, err := template.Open(c.dataDir)
	if err != nil {
		return err
	}
	_, err = reg.Get(template.CodeInterpreterAlias)
	switch {
	case err == nil:
		return nil
	case !errors.Is(err, template.ErrNotFound):
		return err
	case c.noBuild:
		return fmt.Errorf("template %q is missing and --no-build is set: run `cubicle template build-code-interpreter`", template.CodeInterpreterAlias)
	}
	fmt.Fprintf(os.Stderr, "building the template %q (first start; later starts reuse the cache)\n", template.CodeInterpreterAlias)
	if _, err := template.BuildCodeInterpreter(ctx, template.BuildOptions{DataDir: c.dataDir, CacheDir: c.cacheDir, Progress: os.Stderr}); err != nil {
		return fmt.Errorf("building template %s: %w", template.CodeInterpreterAlias, err)
	}
	return nil
}

// benchCodeinterpCmd is `cubicle bench codeinterp`.
func benchCodeinterpCmd() *cobra.Command {
	var cf clientFlags
	var n, cells int
	var tmpl string
	cmd := &cobra.Command{
		Use:   "codeinterp",
		Short: "Code interpreter: first runCode(\"1+1\") result on a fresh sandbox, and per-cell overhead",
		Long: `codeinterp measures, against a running cubicle serve, the time from sending
runCode("1+1") to a fresh code-interpreter sandbox until its result line
arrives (sandbox creation not included), and the round trip of runCode("pass")
through the proxy: medians over -n sandboxes and -n × --cells cells.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			if n < 1 || cells < 1 {
				return errors.New("-n and --cells must be at least 1")
			}
			var creates, firsts, overheads []time.Duration
			for i := 0; i < n && cmd.Context().Err() == nil; i++ {
				t0 := time.Now()
				sb, err := c.Create(cmd.Context(), tmpl, client.CreateOptions{Timeout: 5 * time.Minute})
				if err != nil {
					return fmt.Errorf("create: %w", err)
				}
				creates = append(creates, time.Since(t0))
				first, _, err := runCode(cmd.Context(), c, sb, "1+1")
				if err != nil {
					err = fmt.Errorf("first runCode: %w", err)
				} else {
					firsts = append(firsts, first)
					for j := 0; j < cells && err == nil; j++ {
						var total time.Duration
						if _, total, err = runCode(cmd.Context(), c, sb, "pass"); err != nil {
							err = fmt.Errorf("cell %d: %w", j+1, err)
						}
						overheads = append(overheads, total)
					}
				}
				if kerr := c.Kill(context.WithoutCancel(cmd.Context()), sb.SandboxID); kerr != nil && err == nil {
					err = fmt.Errorf("kill: %w", kerr)
				}
				if err != nil {
					return fmt.Errorf("sandbox %s: %w", sb.SandboxID, err)
				}
			}
			out := cmd.OutOrStdout()
			p50, _, _ := percentiles(creates)
			fmt.Fprintf(out, "create p50=%.1f ms (n=%d, template %s)\n", p50, len(creates), tmpl)
			p50, _, p99 := percentiles(firsts)
			fmt.Fprintf(out, "first-result p50=%.1f ms p99=%.1f ms (n=%d)\n", p50, p99, len(firsts))
			p50, _, p99 = percentiles(overheads)
			fmt.Fprintf(out, "cell-overhead p50=%.1f ms p99=%.1f ms (n=%d)\n", p50, p99, len(overheads))
			return nil
		},
	}
	cf.register(cmd.Flags())
	cmd.Flags().IntVarP(&n, "n", "n", 20, "fresh sandboxes to measure")
	cmd.Flags().IntVar(&cells, "cells", 20, `runCode("pass") cells per sandbox`)
	cmd.Flags().StringVar(&tmpl, "template", template.CodeInterpreterAlias, "template to create from")
	return cmd
}

// runCode posts code to a sandbox's code interpreter through the proxy, as
// the SDK does, and returns when the first result line arrived and when
// the stream ended. An error event in the stream is an error.
func runCode(ctx context.Context, c *client.Client, sb client.Sandbox, code string) (first, total time.Duration, err error) {
	body, _ := json.Marshal(map[string]string{"code": code})
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.SandboxURL+"/execute", bytes.NewReader(body))
	if err != nil {
		return 0, 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("E2b-Sandbox-Id", sb.SandboxID)
	req.Header.Set("E2b-Sandbox-Port", strconv.Itoa(codeinterp.Port))
	req.Header.Set("X-Access-Token", sb.EnvdAccessToken)
	if sb.TrafficAccessToken != nil {
		req.Header.Set("E2B-Traffic-Access-Token", *sb.TrafficAccessToken)
	}
	t0 := time.Now()
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return 0, 0, fmt.Errorf("/execute: %s: %s", resp.Status, bytes.TrimSpace(msg))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		var ev struct {
			Type  string `json:"type"`
			Name  string `json:"name"`
			Value string `json:"value"`
		}
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return 0, 0, fmt.Errorf("/execute line %q: %w", sc.Text(), err)
		}
		switch ev.Type {
		case "result":
			if first == 0 {
				first = time.Since(t0)
			}
		case "error":
			return 0, 0, fmt.Errorf("cell failed: %s: %s", ev.Name, ev.Value)
		case "end_of_execution":
			total = time.Since(t0)
			// Read to the end, as the SDK does, so the connection is
			// reused; closing it early also makes the proxy drop its
			// upstream connection.
			_, err := io.Copy(io.Discard, resp.Body)
			return first, total, err
		}
	}
	if err := sc.Err(); err != nil {
		return 0, 0, err
	}
	return 0, 0, errors.New("/execute stream ended without end_of_execution")
}
