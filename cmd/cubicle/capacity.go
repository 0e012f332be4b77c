package main

import (
	"github.com/spf13/pflag"

	"github.com/cubicle-dev/cubicle/capacity"
)

// capacityFlags registers serve's admission-control flags into o.
func capacityFlags(f *pflag.FlagSet, o *capacity.Options) {
	f.Float64Var(&o.MemoryOvercommit, "overcommit-memory", capacity.DefaultMemoryOvercommit,
		"sandbox memory limits may add up to this many times the host's memory less --reserve-memory-mb (env CUBICLE_OVERCOMMIT_MEMORY)")
	f.Float64Var(&o.CPUOvercommit, "overcommit-cpu", capacity.DefaultCPUOvercommit,
		"sandbox vCPUs may add up to this many times the host's cores (env CUBICLE_OVERCOMMIT_CPU)")
	f.IntVar(&o.ReserveMemoryMB, "reserve-memory-mb", capacity.DefaultReserveMemoryMB,
		"host memory, in MiB, never promised to sandboxes (env CUBICLE_RESERVE_MEMORY_MB)")
	f.IntVar(&o.ReserveDiskMB, "reserve-disk-mb", capacity.DefaultReserveDiskMB,
		"free space, in MiB, on the data directory's disk never promised to sandbox disks (env CUBICLE_RESERVE_DISK_MB)")
}
