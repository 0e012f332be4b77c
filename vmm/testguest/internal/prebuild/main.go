// Command prebuild builds the freestanding test guest (testguest.Build,
// with gcc) and copies guest.elf and guest.bzImage into the directory
// given, for tests that run where no compiler is ($CUBICLE_TESTGUEST_DIR;
// scripts/nested-kvm.sh uses it for its L1 guest).
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/cubicle-dev/cubicle/vmm/testguest"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: prebuild DIR")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "prebuild:", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	imgs, err := testguest.Build()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, p := range []string{imgs.ELF, imgs.BzImage} {
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(p)), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}
