package main

import (
	"fmt"
	"net"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/guest/envd"
)

// envdCmd runs the in-sandbox daemon. It is hidden: the runtime starts it as
// each sandbox's first process from this same binary.
func envdCmd() *cobra.Command {
	var port int
	cmd := &cobra.Command{
		Use:    "envd",
		Short:  "Run the in-sandbox daemon (started by the runtime inside every sandbox)",
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			if port <= 0 || port > 65535 {
				return fmt.Errorf("--port %d out of range", port)
			}
			return envd.Run(cmd.Context(), envd.Options{
				Addr:    net.JoinHostPort("", strconv.Itoa(port)),
				Version: envd.Version,
			})
		},
	}
	cmd.Flags().IntVar(&port, "port", 49983, "TCP port to serve on")
	return cmd
}
