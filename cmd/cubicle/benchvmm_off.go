//go:build !vmmbench

package main

import (
	"errors"

	"github.com/spf13/cobra"
)

// benchVMMHowTo is how to run the VMM benchmark, which the product binary
// does not carry (it would embed the C test guest and its build).
const benchVMMHowTo = "CGO_ENABLED=0 go run -tags vmmbench ./cmd/cubicle bench vmm"

// benchVMMCmd stands in for `bench vmm` in the product binary: it says
// how to run the benchmark instead of a bare "unknown command".
func benchVMMCmd() *cobra.Command {
	return &cobra.Command{
		Use:                "vmm",
		Short:              "Measure the VMM (in a bench build: " + benchVMMHowTo + ")",
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			return errors.New("this cubicle is built without the VMM benchmark, which carries the C test guest; " +
				"from the source tree (gcc and /dev/kvm needed): " + benchVMMHowTo)
		},
	}
}
