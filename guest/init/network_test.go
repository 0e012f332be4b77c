package guestinit

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// inNewNetns runs f on a thread moved into a network namespace of its own,
// which disappears with the thread afterwards.
func inNewNetns(t *testing.T, f func() error) error {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("creating a network namespace needs root")
	}
	done := make(chan error, 1)
	go func() {
		// The thread is never unlocked: it ends with the goroutine, and
		// the namespace with it.
		runtime.LockOSThread()
		ns, err := netns.New()
		if err != nil {
			done <- errSkip{err}
			return
		}
		defer ns.Close()
		done <- f()
	}()
	err := <-done
	if s, ok := err.(errSkip); ok {
		t.Skipf("cannot create a network namespace: %v", s.err)
	}
	return err
}

type errSkip struct{ err error }

func (e errSkip) Error() string { return e.err.Error() }

// TestSetupNetwork configures a namespace the test made, with one end of
// a veth pair standing in for the guest's virtio-net eth0, from the
// contract's command line; twice, since it must be idempotent. Needs root;
// run it under `heavy`.
func TestSetupNetwork(t *testing.T) {
	p, err := ParseCmdline(contractCmdline)
	if err != nil {
		t.Fatal(err)
	}
	var lo, eth netlink.Link
	var addrs []netlink.Addr
	var routes []netlink.Route
	err = inNewNetns(t, func() error {
		// A veth pair (this kernel may lack the dummy driver) whose other
		// end stays down, as a tap would until the VMM opens it.
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: GuestLink}, PeerName: "host0"}); err != nil {
			return err
		}
		for range 2 {
			if err := SetupNetwork(p, GuestLink); err != nil {
				return err
			}
		}
		var err error
		if lo, err = netlink.LinkByName("lo"); err != nil {
			return err
		}
		if eth, err = netlink.LinkByName(GuestLink); err != nil {
			return err
		}
		if addrs, err = netlink.AddrList(eth, netlink.FAMILY_V4); err != nil {
			return err
		}
		routes, err = netlink.RouteList(eth, netlink.FAMILY_V4)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if lo.Attrs().Flags&net.FlagUp == 0 || eth.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("lo flags %v, eth0 flags %v: both must be up", lo.Attrs().Flags, eth.Attrs().Flags)
	}
	if len(addrs) != 1 || addrs[0].IPNet.String() != "169.254.0.21/30" {
		t.Errorf("eth0 addresses %v, want only 169.254.0.21/30", addrs)
	}
	var def bool
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.Equal(net.ParseIP("169.254.0.22")) {
			def = true
		}
	}
	if !def {
		t.Errorf("no default route via 169.254.0.22 in %v", routes)
	}
}

// TestSetupNetworkErrors: a missing eth0 is a clear error, and without
// cubicle.ip only lo is set up (no eth0 needed).
func TestSetupNetworkErrors(t *testing.T) {
	p, err := ParseCmdline(contractCmdline)
	if err != nil {
		t.Fatal(err)
	}
	var missing, loOnly error
	err = inNewNetns(t, func() error {
		missing = SetupNetwork(p, GuestLink)
		loOnly = SetupNetwork(Params{MemoryMiB: 1, Hostname: DefaultHostname}, GuestLink)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if missing == nil {
		t.Error("SetupNetwork without an eth0 succeeded")
	}
	if loOnly != nil {
		t.Errorf("SetupNetwork without cubicle.ip: %v", loOnly)
	}
}

// TestWriteResolvConf: the template's resolv.conf, a symlink as
// systemd-resolved leaves it included, is replaced by a file naming the
// gateway, and the symlink's target is left alone.
func TestWriteResolvConf(t *testing.T) {
	root := t.TempDir()
	etc := filepath.Join(root, "etc")
	os.MkdirAll(etc, 0o755)
	target := filepath.Join(root, "stub-resolv.conf")
	os.WriteFile(target, []byte("nameserver 127.0.0.53\n"), 0o644)
	if err := os.Symlink(target, filepath.Join(etc, "resolv.conf")); err != nil {
		t.Fatal(err)
	}
	gw := netip.MustParseAddr("169.254.0.22")
	if err := writeResolvConf(root, gw); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(filepath.Join(etc, "resolv.conf"))
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
		t.Fatalf("resolv.conf: %v, %v", fi, err)
	}
	b, _ := os.ReadFile(filepath.Join(etc, "resolv.conf"))
	if string(b) != string(resolvConf(gw)) {
		t.Fatalf("resolv.conf %q", b)
	}
	if b, _ := os.ReadFile(target); string(b) != "nameserver 127.0.0.53\n" {
		t.Fatalf("the symlink's target was changed: %q", b)
	}
	ents, _ := os.ReadDir(etc)
	if len(ents) != 1 {
		t.Fatalf("etc holds %v, want resolv.conf only", ents)
	}
}
