//go:build linux && amd64

package microvm

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	goruntime "runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/cubicle-dev/cubicle/network"
	vnet "github.com/cubicle-dev/cubicle/vmm/virtio/net"
)

// The MAC addresses of every microVM's link: the guest's eth0 and the
// namespace's tap0. The guest's ARP cache is part of the snapshot, so the
// gateway's address must be the same in every namespace a clone is
// restored into; and one guest address per namespace needs no more than
// one MAC either.
var (
	GuestMAC   = net.HardwareAddr{0x02, 0xcb, 0x00, 0x00, 0x00, 0x21}
	GatewayMAC = net.HardwareAddr{0x02, 0xcb, 0x00, 0x00, 0x00, 0x22}
)

// openTap opens the attachment's tap in its namespace, with the fixed
// gateway MAC, for the VMM (network's devices are made persistent, so the
// tap is there; opening it only attaches a queue).
func openTap(a network.Attachment) (*os.File, error) {
	if a.Tap == "" {
		return nil, fmt.Errorf("%w: sandbox %s's network has no tap (the pool is not in tap mode)", ErrInvalidConfig, a.ID)
	}
	var tap *os.File
	err := onFreshThread(func() error {
		ns, err := netns.GetFromPath(a.Netns)
		if err != nil {
			return fmt.Errorf("namespace %s: %w", a.Netns, err)
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			return fmt.Errorf("enter %s: %w", a.Netns, err)
		}
		link, err := netlink.LinkByName(a.Tap)
		if err != nil {
			return fmt.Errorf("find %s: %w", a.Tap, err)
		}
		if err := netlink.LinkSetHardwareAddr(link, GatewayMAC); err != nil {
			return fmt.Errorf("MAC of %s: %w", a.Tap, err)
		}
		f, _, err := vnet.OpenTap(a.Tap)
		if err != nil {
			return err
		}
		tap = f
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("microvm: tap: %w", err)
	}
	return tap, nil
}

// onFreshThread runs fn on an OS thread of its own that is thrown away
// afterwards, so that a namespace fn enters never leaks to another
// goroutine.
func onFreshThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		goruntime.LockOSThread()
		// No UnlockOSThread, on purpose: the thread dies with the goroutine.
		errc <- fn()
	}()
	return <-errc
}

// makeDisk makes a sparse ext4 image of sizeMB at path, for a template's
// first boot (init lays out upper/ and work/ in it).
func makeDisk(path string, sizeMB int) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(sizeMB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", path).CombinedOutput()
	if err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, out)
	}
	return nil
}
