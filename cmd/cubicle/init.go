package main

import (
	"github.com/spf13/cobra"

	guestinit "github.com/cubicle-dev/cubicle/guest/init"
)

// initCmd is PID 1 of a microVM guest: the kernel runs
// `/.cubicle/cubicle init` (init= on its command line; see guest/init for
// the contract). Hidden: nobody runs it by hand.
func initCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "init",
		Short:  "Run as PID 1 of a microVM sandbox (started by the guest kernel)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return guestinit.Run()
		},
	}
}
