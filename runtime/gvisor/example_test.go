package gvisor_test

import (
	"context"
	"fmt"
	"log"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/runtime"
	"github.com/cubicle-dev/cubicle/runtime/gvisor"
)

// A sandbox from a template's root filesystem, reachable at its address
// once envd listens on runtime.EnvdPort. The caller claims the sandbox's
// network devices (and would put them under an egress policy: see
// network/egress) and releases them after Kill. (Needs root and runsc;
// not run as a test.)
func Example() {
	ctx := context.Background()
	pool, err := network.NewPool(network.Options{}) // 100.96.0.0/11
	if err != nil {
		log.Fatal(err)
	}
	rt, err := gvisor.New(gvisor.Options{StateDir: "/var/lib/cubicle/gvisor"})
	if err != nil {
		log.Fatal(err)
	}
	const id = "i1a2b3c4d5e6f7g8h9j0"
	att, err := pool.Setup(ctx, id)
	if err != nil {
		log.Fatal(err)
	}
	sb, err := rt.Create(ctx, runtime.Config{
		ID:         id,
		Network:    att,
		TemplateID: "base",
		RootFS:     "/var/lib/cubicle/templates/base/rootfs",
		CPUCount:   2,
		MemoryMB:   512,
		DiskSizeMB: 10240,
		Envd:       "/usr/lib/cubicle/envd",
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("envd at http://%s:%d\n", sb.Addr, runtime.EnvdPort)
	if err := rt.Kill(ctx, sb.ID); err != nil {
		log.Fatal(err)
	}
	if err := pool.Teardown(ctx, sb.ID); err != nil {
		log.Fatal(err)
	}
}
