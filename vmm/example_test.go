//go:build linux && amd64

package vmm_test

import (
	"context"
	"log"
	"os"

	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/boot"
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
