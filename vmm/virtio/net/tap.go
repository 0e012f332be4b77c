package net

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// tapFlags are the TUNSETIFF flags every cubicle tap uses
// (include/uapi/linux/if_tun.h): an Ethernet device, no packet-info prefix,
// and a virtio_net_hdr in front of every frame, which the device passes
// through between guest and kernel unchanged.
const tapFlags = unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR

// OpenTap attaches to (or creates) the tap device name in the calling
// thread's network namespace, and returns it non-blocking, with a 12-byte
// vnet header (sizeof(struct virtio_net_hdr_v1)), together with the
// interface's actual name.
func OpenTap(name string) (*os.File, string, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, "", fmt.Errorf("net: open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, "", fmt.Errorf("net: tap name %q: %w", name, err)
	}
	ifr.SetUint16(tapFlags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, "", fmt.Errorf("net: TUNSETIFF %q: %w", name, err)
	}
	f, err := setupTap(fd)
	if err != nil {
		return nil, "", err
	}
	return f, ifr.Name(), nil
}

// setupTap sets the vnet header size on fd and wraps it in a pollable
// *os.File. It takes ownership of fd.
func setupTap(fd int) (*os.File, error) {
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETHDRSZ, NetHdrSize); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("net: TUNSETVNETHDRSZ: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("net: tap non-blocking: %w", err)
	}
	return os.NewFile(uintptr(fd), "tap"), nil
}

// adoptTap takes a tap opened elsewhere (say, by the network package before
// the VMM was jailed): it duplicates its descriptor so that the copy is
// registered with the Go poller, sets it up, and closes f.
func adoptTap(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("net: tap: %w", err)
	}
	nfd := -1
	cerr := rc.Control(func(fd uintptr) {
		nfd, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	})
	f.Close()
	if cerr != nil {
		return nil, fmt.Errorf("net: tap: %w", cerr)
	}
	if err != nil {
		return nil, fmt.Errorf("net: dup tap: %w", err)
	}
	return setupTap(nfd)
}

// tapOffloads maps the negotiated guest receive offloads to TUNSETOFFLOAD
// flags: what the guest can take is what the kernel may hand us
// (include/uapi/linux/if_tun.h TUN_F_*; virtio 1.2 §5.1.3).
func tapOffloads(features uint64) int {
	var f int
	has := func(bit uint) bool { return features&(1<<bit) != 0 }
	if has(FeatureGuestCsum) {
		f |= unix.TUN_F_CSUM
	}
	if has(FeatureGuestTSO4) {
		f |= unix.TUN_F_TSO4
	}
	if has(FeatureGuestTSO6) {
		f |= unix.TUN_F_TSO6
	}
	if has(FeatureGuestECN) {
		f |= unix.TUN_F_TSO_ECN
	}
	if has(FeatureGuestUFO) {
		f |= unix.TUN_F_UFO
	}
	return f
}
