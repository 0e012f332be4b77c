package main

import (
	"errors"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/cubicle-dev/cubicle/hostcheck"
)

// errNoBackend makes doctor exit 1 once its lines have said why.
var errNoBackend = errors.New("serve can run no backend on this host (the backend line says why)")

// doctorCmd prints what this host can do for cubicle (package
// internal/hostcheck), one line per item, and the backend serve would use.
func doctorCmd() *cobra.Command {
	var o hostcheck.Options
	cmd := &cobra.Command{
		Use:   "doctor",
		Short: "Print what this host can do (KVM, eBPF, cgroups, ...) and which backend serve would use",
		Long: `doctor checks, on this host, what cubicle's backends need and prints one line per
item (ok, limited or missing, and why), then the backend ` + "`cubicle serve --isolation auto`" + `
would pick: microvm where /dev/kvm has hardware virtualization, else gvisor. It exits 0
when serve can run with some backend, 1 when it cannot. Run it as root, as serve runs.`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			r := hostcheck.Check(o)
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
			for _, it := range r.Items {
				fmt.Fprintf(w, "%s\t%s\t%s\n", it.Name, it.Status, it.Detail)
			}
			backend := r.Backend
			if backend == "" {
				backend = "none"
			}
			fmt.Fprintf(w, "backend\t%s\t%s\n", backend, r.Reason)
			if err := w.Flush(); err != nil {
				return err
			}
			if r.Backend == "" {
				return errNoBackend
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&o.Runsc, "runsc", envOr("CUBICLE_RUNSC", ""), "path of runsc, as serve's --runsc (env CUBICLE_RUNSC)")
	fl.StringVar(&o.CacheDir, "cache-dir", envOr("CUBICLE_CACHE_DIR", "/var/cache/cubicle"), "cache directory, as serve's --cache-dir (env CUBICLE_CACHE_DIR)")
	return cmd
}
