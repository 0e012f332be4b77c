//go:build linux && amd64

package vmm_test

import (
	"context"
	"log"
	"os"

	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/boot"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	"github.com/cubicle-dev/cubicle/vmm/virtio/rng"
	"github.com/cubicle-dev/cubicle/vmm/virtio/vsock"
)

// Boot a kernel with a serial console, snapshot it, and start a clone from
// the snapshot.
func Example() {
	vm, err := vmm.New(vmm.Config{MemoryBytes: 256 << 20, VCPUs: 2, Console: os.Stdout})
	if err != nil {
		log.Fatal(err)
	}
	defer vm.Close()
	if err := vm.LoadKernelFile("vmlinux", "console=ttyS0 reboot=k panic=1", boot.ProtocolLinux64); err != nil {
		log.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		log.Fatal(err)
	}

	ctx := context.Background()
	if err := vm.Pause(ctx); err != nil {
		log.Fatal(err)
	}
	if err := vm.Snapshot("vm.state", "vm.mem"); err != nil {
		log.Fatal(err)
	}

	clone, err := vmm.Restore(vmm.Config{Console: os.Stdout}, "vm.state", "vm.mem")
	if err != nil {
		log.Fatal(err)
	}
	defer clone.Close()
	if err := clone.Start(); err != nil {
		log.Fatal(err)
	}
	// Wait returns nil when the guest reboots (i8042 reset), ErrStopped
	// after Stop, or an *ExitError describing a fatal vCPU exit.
	if err := clone.Wait(ctx); err != nil {
		log.Print(err)
	}
}

// Give a VM a root disk, entropy and a vsock channel, then boot it; a
// clone restored from its snapshot gets its own disk and vsock socket
// under the same names.
func ExampleVM_AddVirtio() {
	vm, err := vmm.New(vmm.Config{MemoryBytes: 256 << 20, Console: os.Stdout})
	if err != nil {
		log.Fatal(err)
	}
	defer vm.Close()
	if _, err := vm.AddBlock("vda", blk.Config{Path: "rootfs.ext4"}); err != nil {
		log.Fatal(err)
	}
	if _, err := vm.AddRNG("rng0", rng.Config{}); err != nil {
		log.Fatal(err)
	}
	if _, err := vm.AddVsock("vsock0", vsock.Config{GuestCID: 3, UDSPath: "/run/sandbox/v.sock"}); err != nil {
		log.Fatal(err)
	}
	// The command line gets virtio_mmio.device=4K@0xd0000000:5 and so on.
	if err := vm.LoadKernelFile("vmlinux", "console=ttyS0 root=/dev/vda", boot.ProtocolPVH); err != nil {
		log.Fatal(err)
	}
	if err := vm.Start(); err != nil {
		log.Fatal(err)
	}

	clone, err := vmm.Restore(vmm.Config{}, "vm.state", "vm.mem")
	if err != nil {
		log.Fatal(err)
	}
	defer clone.Close()
	for _, add := range []func() error{
		func() error { _, err := clone.AddBlock("vda", blk.Config{Path: "clone.ext4"}); return err },
		func() error { _, err := clone.AddRNG("rng0", rng.Config{}); return err },
		func() error {
			_, err := clone.AddVsock("vsock0", vsock.Config{GuestCID: 4, UDSPath: "/run/clone/v.sock"})
			return err
		},
	} {
		if err := add(); err != nil {
			log.Fatal(err)
		}
	}
	if err := clone.Start(); err != nil {
		log.Fatal(err)
	}
}
