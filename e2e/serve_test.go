package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/policy"
)

// leftovers lists what a server with this link prefix and data dir left in
// the kernel: eBPF pins, its NAT table, host devices, mounts under dataDir.
func leftovers(t *testing.T, linkPrefix, dataDir string) []string {
	t.Helper()
	var left []string
	if _, err := os.Lstat(filepath.Join(policy.DefaultPinRoot, linkPrefix)); err == nil {
		ents, _ := os.ReadDir(filepath.Join(policy.DefaultPinRoot, linkPrefix))
		left = append(left, "eBPF pins "+filepath.Join(policy.DefaultPinRoot, linkPrefix)+" ("+strconv.Itoa(len(ents))+" entries)")
	}
	if c, err := nftables.New(); err == nil {
		tables, err := c.ListTables()
		if err != nil {
			t.Fatal(err)
		}
		for _, tb := range tables {
			if tb.Name == linkPrefix {
				left = append(left, "nftables table "+tb.Name)
			}
		}
	}
	links, err := netlink.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	// The pool names devices and namespaces <link prefix><slot>; the fake
	// internet's cbeinet is not the server's.
	ours := regexp.MustCompile("^" + regexp.QuoteMeta(linkPrefix) + "[0-9]+$")
	for _, l := range links {
		if ours.MatchString(l.Attrs().Name) {
			left = append(left, "device "+l.Attrs().Name)
		}
	}
	if ents, err := os.ReadDir(network.DefaultNetnsDir); err == nil {
		for _, e := range ents {
			if ours.MatchString(e.Name()) {
				left = append(left, "namespace "+filepath.Join(network.DefaultNetnsDir, e.Name()))
			}
		}
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dataDir+"/") {
			left = append(left, "mount "+f[4])
		}
	}
	return left
}

// serveOnce runs `cubicle serve` with args until it exits (bounded), and
// returns its combined output and whether it failed.
func serveOnce(t *testing.T, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, srv.bin, append([]string{"serve"}, args...)...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("serve %v still running after 2 minutes; output:\n%s", args, out)
	}
	return string(out), err
}

// TestServeBadFlagLeavesNothing: a first start with a bad link prefix is
// refused at once (no template build: the data dir is fresh), and leaves
// no database (so no API key it never printed), no pins, no devices.
func TestServeBadFlagLeavesNothing(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	out, err := serveOnce(t, "--data-dir", dataDir, "--link-prefix", "rel", "--network-prefix", "100.91.0.0/33")
	if err == nil || !strings.Contains(out, "--network-prefix") {
		t.Fatalf("serve with a bad network prefix: %v, output:\n%s", err, out)
	}
	out, err = serveOnce(t, "--data-dir", dataDir, "--link-prefix", "rel2", "--network-prefix", "100.91.0.0/24",
		"--api-addr", "127.0.0.1:0", "--proxy-addr", "127.0.0.1:0")
	if err == nil || !strings.Contains(out, `"rel2"`) {
		t.Fatalf("serve with --link-prefix rel2: %v, output:\n%s", err, out)
	}
	if _, err := os.Stat(dataDir); !os.IsNotExist(err) {
		t.Errorf("the refused start made its data dir (%v): it did work before checking its flags", err)
	}
	for _, lp := range []string{"rel", "rel2"} {
		if left := leftovers(t, lp, dataDir); len(left) > 0 {
			t.Errorf("the refused start left %v", left)
		}
	}
}

// TestServeStopsClean stops the e2e server with no sandbox left: it exits
// 0 and leaves nothing of itself in the kernel (pins, NAT, devices,
// runsc's null-netns mounts). A start that fails after it made all of
// those undoes them too. The server is started again for the next tests.
func TestServeStopsClean(t *testing.T) {
	srv.killAll()
	if err := srv.stop(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.start(); err != nil {
			t.Fatalf("restarting the e2e server: %v", err)
		}
	})
	if !srv.cmd.ProcessState.Success() {
		t.Errorf("serve exited with %v after SIGTERM; log ends:\n%s", srv.cmd.ProcessState, srv.log.tail(30))
	}
	if left := leftovers(t, e2eLinkPrefix, srv.dataDir); len(left) > 0 {
		t.Errorf("a clean stop with no sandbox left %v", left)
	}

	// 127.0.0.0/24 passes every flag check, and overlaps lo's address: the
	// start fails in the network pool, after the eBPF policy and NAT.
	const lp = "cbf"
	out, err := serveOnce(t, "--data-dir", srv.dataDir, "--api-addr", "127.0.0.1:0", "--proxy-addr", "127.0.0.1:0",
		"--network-prefix", "127.0.0.0/24", "--link-prefix", lp, "--pool-size", "0", "--dns-upstream", fakeNet.dns.String())
	if err == nil || !strings.Contains(out, "overlaps") {
		t.Fatalf("serve over 127.0.0.0/24: %v, want the overlap refused; output:\n%s", err, out)
	}
	if left := leftovers(t, lp, srv.dataDir); len(left) > 0 {
		t.Errorf("a failed start left %v", left)
	}
}
