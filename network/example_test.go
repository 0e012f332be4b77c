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

// A pool for microVMs that keeps devices ready, so that creating a sandbox
// costs one netlink call. The hooks attach per-device state (say, an egress
// policy by interface index) when a device is made, not when it is claimed.
// (Needs root; not run as a test.)
func ExampleNewPool_microVM() {
	pool, err := network.NewPool(network.Options{
		Mode:   network.ModeTap,
		Spares: 8,
		OnCreate: func(a network.Attachment) error {
			log.Printf("device %s (index %d) made", a.HostLink, a.HostIndex)
			return nil
		},
		OnDestroy: func(a network.Attachment) {
			log.Printf("device %s removed", a.HostLink)
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close() // removes the spares; sandboxes stay
	att, err := pool.Setup(context.Background(), "i1a2b3c4d5e6f7g8h9j0")
	if err != nil {
		log.Fatal(err)
	}
	// The VMM opens att.Tap inside att.Netns; the guest always uses the
	// same addresses, and the host reaches it at att.Addr.
	fmt.Println(att.Netns, att.Tap, network.GuestAddr, "reached at", att.Addr)
}
