package main

import (
	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/vmm/control"
)

// vmmCmd is the per-sandbox VMM process: one VM, steered over a Unix
// socket (package vmm/control), jailed when its parent asked for it.
func vmmCmd() *cobra.Command {
	var cfg control.MainConfig
	var logLevel string
	cmd := &cobra.Command{
		Use:    "vmm",
		Short:  "Run one microVM, controlled over a Unix socket (the per-sandbox VMM process)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg.Logger = newLogger(logLevel)
			cfg.Console = cmd.OutOrStdout()
			return control.Main(cmd.Context(), cfg)
		},
	}
	fl := cmd.Flags()
	fl.IntVar(&cfg.ControlFD, "control-fd", 0, "descriptor of a connected control socket")
	fl.StringVar(&cfg.SocketPath, "socket", "", "path of the control socket to listen on (without --control-fd)")
	fl.StringVar(&logLevel, "log-level", envOr("CUBICLE_LOG_LEVEL", "warn"), "log level (debug, info, warn, error)")
	return cmd
}
