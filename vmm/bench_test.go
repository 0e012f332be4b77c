//go:build linux && amd64

package vmm_test

import (
	"testing"

	"github.com/cubicle-dev/cubicle/vmm/vmmbench"
)

// BenchmarkRestore restores a 512 MiB snapshot of the test guest to a
// running vCPU (see vmmbench.Restore). Target (DESIGN.md): p50 ≤ 5 ms.
func BenchmarkRestore(b *testing.B) {
	statePath, memPath, err := vmmbench.MakeSnapshot(b.TempDir(), vmmbench.RestoreMemory)
	if err != nil {
		b.Fatal(err)
	}
	vmmbench.Restore(b, statePath, memPath)
}
