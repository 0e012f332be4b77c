package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	"github.com/cubicle-dev/cubicle/client"
	"github.com/cubicle-dev/cubicle/guest/envd/gen/process"
)

// clientFlags are the connection settings of every client command; they
// default to the same environment variables the E2B SDKs read.
type clientFlags struct {
	apiURL, sandboxURL, apiKey string
}

func (c *clientFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&c.apiURL, "api-url", envOr("E2B_API_URL", "http://localhost:3000"), "control-plane URL (env E2B_API_URL)")
	fs.StringVar(&c.sandboxURL, "sandbox-url", envOr("E2B_SANDBOX_URL", "http://localhost:3001"), "sandbox proxy URL (env E2B_SANDBOX_URL)")
	fs.StringVar(&c.apiKey, "api-key", os.Getenv("E2B_API_KEY"), "API key (env E2B_API_KEY)")
}

func (c *clientFlags) client() (*client.Client, error) {
	if c.apiKey == "" {
		return nil, errors.New("no API key: set E2B_API_KEY or pass --api-key")
	}
	return client.New(c.apiURL, c.sandboxURL, c.apiKey), nil
}

// connect reaches a running sandbox by ID, for the commands that act in
// one (exec, shell).
func (c *clientFlags) connect(ctx context.Context, id string) (*client.Client, client.Sandbox, error) {
	cl, err := c.client()
	if err != nil {
		return nil, client.Sandbox{}, err
	}
	sb, err := cl.Connect(ctx, id, 5*time.Minute)
	return cl, sb, err
}

func sandboxCmd() *cobra.Command {
	var cf clientFlags
	cmd := &cobra.Command{Use: "sandbox", Aliases: []string{"sb"}, Short: "Create, list, use and kill sandboxes"}
	cf.register(cmd.PersistentFlags())

	var timeout time.Duration
	var metadata []string
	create := &cobra.Command{
		Use:   "create [TEMPLATE]",
		Short: "Create a sandbox and print its ID",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			tmpl := "base"
			if len(args) == 1 {
				tmpl = args[0]
			}
			md := map[string]string{}
			for _, kv := range metadata {
				k, v, ok := strings.Cut(kv, "=")
				if !ok {
					return fmt.Errorf("metadata %q is not key=value", kv)
				}
				md[k] = v
			}
			sb, err := c.Create(cmd.Context(), tmpl, client.CreateOptions{Timeout: timeout, Metadata: md})
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), sb.SandboxID)
			return nil
		},
	}
	create.Flags().DurationVar(&timeout, "timeout", 5*time.Minute, "time to live")
	create.Flags().StringSliceVar(&metadata, "metadata", nil, "key=value metadata (repeatable)")

	list := &cobra.Command{
		Use:   "list",
		Short: "List sandboxes",
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			sbs, err := c.List(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tTEMPLATE\tSTATE\tSTARTED\tENDS\tMETADATA")
			for _, s := range sbs {
				var md []string
				for k, v := range s.Metadata {
					md = append(md, k+"="+v)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.SandboxID, s.TemplateID, s.State,
					s.StartedAt.Local().Format(time.DateTime), s.EndAt.Local().Format(time.DateTime), strings.Join(md, ","))
			}
			return tw.Flush()
		},
	}
	kill := &cobra.Command{
		Use:   "kill ID...",
		Short: "Kill sandboxes",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := cf.client()
			if err != nil {
				return err
			}
			var errs []error
			for _, id := range args {
				if err := c.Kill(cmd.Context(), id); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", id, err))
				}
			}
			return errors.Join(errs...)
		},
	}
	exec := &cobra.Command{
		Use:   "exec ID COMMAND...",
		Short: "Run a command in a sandbox (with bash -l -c) and exit with its status",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, sb, err := cf.connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			code, err := c.Run(cmd.Context(), sb, strings.Join(args[1:], " "), os.Stdout, os.Stderr)
			if err != nil {
				return err
			}
			if code != 0 {
				os.Exit(code)
			}
			return nil
		},
	}
	shell := &cobra.Command{
		Use:   "shell ID",
		Short: "Open an interactive shell (PTY) in a sandbox",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, sb, err := cf.connect(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			return runShell(cmd.Context(), c, sb)
		},
	}
	cmd.AddCommand(create, list, kill, exec, shell)
	return cmd
}

// runShell bridges the local terminal to a PTY process in the sandbox:
// keystrokes go by SendInput, window size changes by Update.
func runShell(ctx context.Context, c *client.Client, sb client.Sandbox) error {
	fd := int(os.Stdin.Fd())
	cols, rows := 80, 24
	if term.IsTerminal(fd) {
		if w, h, err := term.GetSize(fd); err == nil {
			cols, rows = w, h
		}
		old, err := term.MakeRaw(fd)
		if err != nil {
			return err
		}
		defer term.Restore(fd, old)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pc := c.Process(sb)
	stream, err := pc.Start(ctx, connect.NewRequest(&process.StartRequest{
		Process: &process.ProcessConfig{
			Cmd:  "/bin/bash",
			Args: []string{"-i", "-l"},
			Envs: map[string]string{"TERM": envOr("TERM", "xterm-256color"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
		},
		Pty: &process.PTY{Size: &process.PTY_Size{Cols: uint32(cols), Rows: uint32(rows)}},
	}))
	if err != nil {
		return err
	}
	defer stream.Close()
	if !stream.Receive() {
		return fmt.Errorf("shell did not start: %w", stream.Err())
	}
	pid := stream.Msg().GetEvent().GetStart().GetPid()
	sel := &process.ProcessSelector{Selector: &process.ProcessSelector_Pid{Pid: pid}}

	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := os.Stdin.Read(buf)
			if n > 0 {
				_, serr := pc.SendInput(ctx, connect.NewRequest(&process.SendInputRequest{
					Process: sel, Input: &process.ProcessInput{Input: &process.ProcessInput_Pty{Pty: append([]byte(nil), buf[:n]...)}},
				}))
				if serr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	winch := make(chan os.Signal, 1)
	signal.Notify(winch, syscall.SIGWINCH)
	defer signal.Stop(winch)
	go func() {
		for range winch {
			if w, h, err := term.GetSize(fd); err == nil {
				pc.Update(ctx, connect.NewRequest(&process.UpdateRequest{
					Process: sel, Pty: &process.PTY{Size: &process.PTY_Size{Cols: uint32(w), Rows: uint32(h)}},
				}))
			}
		}
	}()
	for stream.Receive() {
		ev := stream.Msg().GetEvent()
		if d := ev.GetData(); d != nil {
			os.Stdout.Write(d.GetPty())
		}
		if ev.GetEnd() != nil {
			return nil
		}
	}
	return stream.Err()
}
