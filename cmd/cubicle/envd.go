package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/guest/envd"
)

// envdCmd runs the in-sandbox daemon. It is hidden: the runtime starts it as
// each sandbox's first process from this same binary. Outside a sandbox
// (development, the SDK smoke test in guest/envd/testdata) pass --no-init.
func envdCmd() *cobra.Command {
	var port int
	var opts envd.Options
	cmd := &cobra.Command{
		Use:    "envd",
		Short:  "Run the in-sandbox daemon (started by the runtime inside every sandbox)",
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if port <= 0 || port > 65535 {
				return fmt.Errorf("--port %d out of range", port)
			}
			opts.Addr = net.JoinHostPort("", strconv.Itoa(port))
			opts.Version = envd.Version
			err := envd.Run(cmd.Context(), opts)
			// As PID 1, envd exits with the status of the server it supervises.
			var exit *envd.ExitError
			if errors.As(err, &exit) {
				os.Exit(exit.Code)
			}
			return err
		},
	}
	f := cmd.Flags()
	f.IntVar(&port, "port", 49983, "TCP port to serve on")
	f.StringVar(&opts.DefaultUser, "user", "", `default user until /init sets one (default "user" if it exists, else root)`)
	f.StringVar(&opts.DefaultWorkdir, "workdir", "", "default working directory until /init sets one (default: the user's home)")
	f.StringVar(&opts.RunDir, "rundir", envd.DefaultRunDir, `directory for the sandbox identity files /init writes ("-" for none)`)
	f.BoolVar(&opts.NoInit, "no-init", false, "do not act as init even when running as PID 1")
	return cmd
}
