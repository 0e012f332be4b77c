package oci_test

import (
	"context"
	"fmt"
	"log"

	"github.com/cubicle-dev/cubicle/template/oci"
)

// A template build from an image: resolve the reference, then unpack it,
// once per image, into the cache that builds share.
func Example() {
	ctx := context.Background()
	img, err := oci.Resolve(ctx, "docker.io/library/python:3.12-slim", oci.Options{})
	if err != nil {
		log.Fatal(err) // errors.Is(err, oci.ErrNotFound) and friends say which 4xx
	}
	cache := oci.Cache{Dir: "/var/lib/cubicle/images"}
	rootfs, cfg, err := cache.Unpacked(ctx, img)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(rootfs, cfg.Digest, cfg.Env, cfg.WorkingDir, cfg.User, cfg.Entrypoint, cfg.Cmd)
}
