//go:build linux && amd64

package vmm_test

import (
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/vmm/vmmbench"
)

// BenchmarkRestore restores a 512 MiB snapshot of the test guest, b.N
// times, to a running vCPU (see vmmbench.RestoreOnce), tearing each VM
// down in the background, off the measured path. It reports ns/op and the
// p50 and p99 latencies. Target (DESIGN.md): p50 ≤ 5 ms.
func BenchmarkRestore(b *testing.B) {
	statePath, memPath, err := vmmbench.MakeSnapshot(b.TempDir(), vmmbench.RestoreMemory)
	if err != nil {
		b.Fatal(err)
	}
	lat := make([]time.Duration, 0, b.N)
	var closers sync.WaitGroup
	defer closers.Wait()
	b.ResetTimer()
	for range b.N {
		d, vm, err := vmmbench.RestoreOnce(statePath, memPath)
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, d)
		b.StopTimer()
		vm.Stop()
		closers.Go(func() { vm.Close() })
		b.StartTimer()
	}
	b.StopTimer()
	slices.Sort(lat)
	rank := func(p int) time.Duration { return lat[min(max((len(lat)*p+99)/100-1, 0), len(lat)-1)] }
	b.ReportMetric(float64(rank(50).Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(rank(99).Nanoseconds()), "p99-ns")
}
