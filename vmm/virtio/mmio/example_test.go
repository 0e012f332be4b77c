package mmio_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/blk"
	"github.com/cubicle-dev/cubicle/vmm/virtio/mmio"
)

type irqLine struct{ gsi uint32 }

// Trigger would write the VM's irqfd for this GSI.
func (irqLine) Trigger() error { return nil }

// Example shows how the VM puts a block device on its bus: build the device
// model, wrap it in a transport at a base address and interrupt line, route
// bus accesses in [Base, Base+Size) to it, and announce it on the kernel
// command line. Snapshots pair the transport's state with the device's own.
func Example() {
	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	disk := filepath.Join(dir, "rootfs.ext4")
	_ = os.WriteFile(disk, make([]byte, 1<<20), 0o600)

	ram := make([]byte, 64<<20) // the VM's guest RAM mapping, GPA 0
	dev, err := blk.New(blk.Config{Path: disk, Serial: "rootfs"})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer dev.Close()
	tr, err := mmio.New(dev, mmio.Config{
		Base:      0xd0000000,
		IRQ:       5,
		Memory:    virtio.NewFlatMemory(ram),
		Interrupt: irqLine{gsi: 5},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer tr.Close()

	fmt.Println(tr.Cmdline())
	var magic [4]byte
	tr.Read(mmio.RegMagicValue, magic[:]) // what a vCPU's MMIO exit does
	fmt.Printf("%s\n", magic[:])

	// Snapshot: pause, save both halves; restore in reverse on a new VM.
	tr.Pause()
	st, _ := tr.Save()
	ds := dev.Save()
	fmt.Println(st.DeviceType, ds.Capacity)
	// Output:
	// virtio_mmio.device=4K@0xd0000000:5
	// virt
	// block 2048
}
