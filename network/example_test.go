package network_test

import (
	"context"
	"fmt"
	"log"

	"github.com/cubicle-dev/cubicle/network"
)

// One sandbox's network: a namespace to run it in and the address the host
// reaches it at. (Needs root; not run as a test.)
func ExamplePool_Setup() {
	ctx := context.Background()
	pool, err := network.NewPool(network.Options{})
	if err != nil {
		log.Fatal(err) // e.g. the prefix overlaps a host network
	}
	att, err := pool.Setup(ctx, "i1a2b3c4d5e6f7g8h9j0")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(att.Netns, att.Addr, "via", att.HostLink)
	if err := pool.Teardown(ctx, att.ID); err != nil {
		log.Fatal(err)
	}
}
