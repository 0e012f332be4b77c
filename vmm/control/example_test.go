//go:build linux && amd64

package control_test

import (
	"context"
	"log"
	"os"
	"time"

	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
)

// Keep two jailed `cubicle vmm` processes ready with a template mapped,
// and create a sandbox from one: its disk goes in as a descriptor, its
// vsock socket and console live in the jail.
func Example() {
	pool, err := control.NewPool(control.PoolConfig{
		Size: 2,
		Spawn: control.SpawnConfig{Args: []string{"vmm"}, Jail: &jailer.Config{
			Root:   "/run/cubicle/jails",
			Mounts: []jailer.Mount{{Source: "/var/lib/cubicle/templates/base", Target: "/template", ReadOnly: true}},
		}},
		Snapshot: control.Snapshot{State: "/template/vm.state", Memory: "/template/vm.mem"},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	p, err := pool.Get(ctx)
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	disk, err := os.OpenFile("/var/lib/cubicle/sandboxes/s1/rootfs.ext4", os.O_RDWR, 0)
	if err != nil {
		log.Fatal(err)
	}
	defer disk.Close()
	zero := 0
	_, err = p.Restore(ctx, control.Snapshot{State: "/template/vm.state", Memory: "/template/vm.mem"}, control.RestoreOptions{
		Devices: []control.Device{
			{Kind: control.KindBlock, Name: "vda", FD: &zero},
			{Kind: control.KindRNG, Name: "rng0"},
			{Kind: control.KindVsock, Name: "vsock0", CID: 3, UDS: "/v.sock"}, // p.Jail().HostPath("/v.sock") on the host
		},
		Console:     "/console",
		WaitRunning: true,
		Files:       []*os.File{disk},
	})
	if err != nil {
		log.Fatal(err)
	}
}
