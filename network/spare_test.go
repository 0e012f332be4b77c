package network

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// hookLog records the calls of OnCreate and OnDestroy.
type hookLog struct {
	mu                 sync.Mutex
	created, destroyed []Attachment
}

func (h *hookLog) install(o *Options) {
	o.OnCreate = func(a Attachment) error {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.created = append(h.created, a)
		return nil
	}
	o.OnDestroy = func(a Attachment) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.destroyed = append(h.destroyed, a)
	}
}

func (h *hookLog) calls() (created, destroyed []Attachment) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.created), slices.Clone(h.destroyed)
}

// byIndex lists the attachments whose host end had interface index i.
func byIndex(as []Attachment, i int) []Attachment {
	var out []Attachment
	for _, a := range as {
		if a.HostIndex == i {
			out = append(out, a)
		}
	}
	return out
}

// waitSpares waits until p has n spares ready.
func waitSpares(tb testing.TB, p *Pool, n int) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for p.SparesReady() < n {
		if time.Now().After(deadline) {
			tb.Fatalf("%d of %d spares ready after 10s", p.SparesReady(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// abandon stops p's filler and leaves its spares in place, as a server
// that stopped without Close does.
func abandon(p *Pool) {
	p.closeOnce.Do(func() { close(p.stop) })
	<-p.filled
}

// mountNetns mounts a fresh, empty network namespace at path.
func mountNetns(t *testing.T, path string) {
	t.Helper()
	err := onFreshThread(func() error {
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			return err
		}
		if err := os.WriteFile(path, nil, 0o444); err != nil {
			return err
		}
		return unix.Mount("/proc/thread-self/ns/net", path, "", unix.MS_BIND, "")
	})
	if err != nil {
		t.Fatalf("mount a netns at %s: %v", path, err)
	}
	t.Cleanup(func() { removeNetns(path) })
}

func linkAlias(t *testing.T, name string) string {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatalf("link %s: %v", name, err)
	}
	return l.Attrs().Alias
}

func TestPoolSpares(t *testing.T) {
	ctx := context.Background()
	var hooks hookLog
	p, _ := testPool(t, "100.88.253.0/28", func(o *Options) { o.Spares = 2; hooks.install(o) })
	waitSpares(t, p, 2)

	spares, _ := hooks.calls()
	if len(spares) != 2 {
		t.Fatalf("OnCreate ran %d times for 2 spares", len(spares))
	}
	for _, s := range spares {
		if s.ID != "" || s.HostIndex == 0 {
			t.Errorf("OnCreate got spare %+v, want no ID and a host index", s)
		}
		if got := linkAlias(t, s.HostLink); got != spareAlias {
			t.Errorf("spare %s has alias %q, want %q", s.HostLink, got, spareAlias)
		}
		if _, ok := p.slotOf(filepath.Base(s.Netns)); !ok {
			t.Errorf("spare namespace %s is not named by slot", s.Netns)
		}
	}

	a, err := p.Setup(ctx, "sparea")
	if err != nil {
		t.Fatal(err)
	}
	from := byIndex(spares, a.HostIndex)
	if len(from) != 1 || from[0].Netns != a.Netns || from[0].HostLink != a.HostLink || from[0].Addr != a.Addr {
		t.Fatalf("Setup with spares ready made %+v, not one of the spares %+v", a, spares)
	}
	checkHostEnd(t, a)
	checkGuestEnd(t, a)
	serveInNetns(t, a.Netns, "spare "+a.ID)
	if got := fetch(t, a.Addr); got != "spare "+a.ID {
		t.Fatalf("read %q over the claimed veth", got)
	}
	if got, ok := p.Lookup(a.ID); !ok || got != a {
		t.Fatalf("Lookup = %+v, %v; want %+v", got, ok, a)
	}
	if p.NetnsPath(a.ID) != a.Netns {
		t.Fatalf("NetnsPath = %q, want %q", p.NetnsPath(a.ID), a.Netns)
	}

	// The claim set the spare up for its sandbox; the filler replaces it.
	waitSpares(t, p, 2)
	created, _ := hooks.calls()
	if n := len(byIndex(created, a.HostIndex)); n != 1 {
		t.Fatalf("OnCreate ran %d times for the claimed device, want once (as a spare)", n)
	}
	if len(created) != 3 {
		t.Fatalf("OnCreate ran %d times, want 3 (two spares, one refill)", len(created))
	}

	if err := p.Teardown(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	_, destroyed := hooks.calls()
	if len(destroyed) != 1 || destroyed[0].ID != a.ID || destroyed[0].HostIndex != a.HostIndex {
		t.Fatalf("OnDestroy calls %+v, want one for %+v", destroyed, a)
	}

	// Close removes the spares but not the sandboxes.
	waitSpares(t, p, 2)
	b, err := p.Setup(ctx, "spareb")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	left, err := p.Devices()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"link " + b.HostLink, "netns " + b.Netns}
	if !slices.Equal(left, want) {
		t.Fatalf("after Close devices are %v, want %v", left, want)
	}
	if p.SparesReady() != 0 {
		t.Fatalf("%d spares ready after Close", p.SparesReady())
	}
	// Every device OnCreate saw is either b's or was handed to OnDestroy.
	created, destroyed = hooks.calls()
	for _, c := range created {
		if c.HostIndex != b.HostIndex && len(byIndex(destroyed, c.HostIndex)) != 1 {
			t.Errorf("device %s (index %d) made but never destroyed", c.HostLink, c.HostIndex)
		}
	}
	checkGuestEnd(t, b)

	// Without the filler Setup makes devices itself.
	c, err := p.Setup(ctx, "sparec")
	if err != nil {
		t.Fatal(err)
	}
	checkHostEnd(t, c)
	checkGuestEnd(t, c)
	for _, id := range []string{b.ID, c.ID} {
		if err := p.Teardown(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
}

// A server that stops without Close leaves spares; one that dies in Setup
// leaves a link without alias or only a namespace. The next Pool removes all
// of them (and runs OnDestroy for the spares) and keeps the sandboxes.
func TestNewPoolRemovesStale(t *testing.T) {
	ctx := context.Background()
	var hooks hookLog
	p, opts := testPool(t, "100.88.253.32/27", func(o *Options) { o.Spares = 2; hooks.install(o) })
	waitSpares(t, p, 2)
	a, err := p.Setup(ctx, "survivor")
	if err != nil {
		t.Fatal(err)
	}
	waitSpares(t, p, 2)
	abandon(p)
	spares, _ := hooks.calls()
	spares = slices.DeleteFunc(spares, func(s Attachment) bool { return s.HostIndex == a.HostIndex })

	p.mu.Lock()
	orphanIdx, err1 := p.alloc.reserve()
	mountIdx, err2 := p.alloc.reserve()
	orphan := p.attachment("", orphanIdx)
	p.mu.Unlock()
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	// A link made with no alias yet, and its namespace.
	if err := onFreshThread(func() error { _, err := p.build(orphan, ""); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.destroy(orphan, false) })
	mountNetns(t, p.slotNetns(mountIdx))

	var hooks2 hookLog
	opts.Spares = 0
	hooks2.install(&opts)
	p2, err := NewPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	left, err := p2.Devices()
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"link " + a.HostLink, "netns " + a.Netns}
	if !slices.Equal(left, want) {
		t.Fatalf("after restart devices are %v, want only the sandbox's %v", left, want)
	}
	if got, ok := p2.Lookup(a.ID); !ok || got != a {
		t.Fatalf("after restart Lookup = %+v, %v; want %+v", got, ok, a)
	}
	_, destroyed := hooks2.calls()
	if len(destroyed) != len(spares) {
		t.Fatalf("OnDestroy ran for %+v, want the %d spares %+v", destroyed, len(spares), spares)
	}
	for _, s := range spares {
		if d := byIndex(destroyed, s.HostIndex); len(d) != 1 || d[0].ID != "" {
			t.Errorf("OnDestroy calls for spare %s: %+v", s.HostLink, d)
		}
	}
	if err := p2.Teardown(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	if left, err := p2.Devices(); err != nil || len(left) > 0 {
		t.Fatalf("devices left: %v %v", left, err)
	}
	if mounts := mountsUnder(t, opts.NetnsDir); len(mounts) > 0 {
		t.Fatalf("netns mounts left: %v", mounts)
	}
}

// A sandbox set up by an older version has its namespace under its ID. A
// new Pool finds it there, and Teardown removes it.
func TestLegacyNetns(t *testing.T) {
	ctx := context.Background()
	p, opts := testPool(t, "100.88.253.64/28")
	a, err := p.Setup(ctx, "legacy")
	if err != nil {
		t.Fatal(err)
	}
	old := filepath.Join(opts.NetnsDir, opts.LinkPrefix+"-"+a.ID)
	if err := os.WriteFile(old, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(a.Netns, old, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	if err := removeNetns(a.Netns); err != nil {
		t.Fatal(err)
	}

	p2, err := NewPool(opts)
	if err != nil {
		t.Fatal(err)
	}
	got, ok := p2.Lookup(a.ID)
	if !ok || got.Netns != old || p2.NetnsPath(a.ID) != old {
		t.Fatalf("Lookup = %+v, %v (NetnsPath %q); want the namespace at %s", got, ok, p2.NetnsPath(a.ID), old)
	}
	checkGuestEnd(t, got)
	if err := p2.Teardown(ctx, a.ID); err != nil {
		t.Fatal(err)
	}

	// A namespace left under an ID without any link goes too.
	ghost := filepath.Join(opts.NetnsDir, opts.LinkPrefix+"-ghost")
	mountNetns(t, ghost)
	if err := p2.Teardown(ctx, "ghost"); err != nil {
		t.Fatal(err)
	}
	if left, err := p2.Devices(); err != nil || len(left) > 0 {
		t.Fatalf("devices left: %v %v", left, err)
	}
	if mounts := mountsUnder(t, opts.NetnsDir); len(mounts) > 0 {
		t.Fatalf("netns mounts left: %v", mounts)
	}
	if p2.NetnsPath(a.ID) != "" {
		t.Fatalf("NetnsPath of a torn-down sandbox = %q, want empty", p2.NetnsPath(a.ID))
	}
}

func TestSetupOnCreateFails(t *testing.T) {
	for _, tc := range []struct {
		name   string
		spares int
	}{{"cold", 0}, {"spares", 1}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			refused := errors.New("hook refused")
			var (
				mu        sync.Mutex
				tries     int
				destroyed int
			)
			p, _ := testPool(t, "100.88.253.80/28", func(o *Options) {
				o.Spares = tc.spares
				o.OnCreate = func(Attachment) error {
					mu.Lock()
					defer mu.Unlock()
					tries++
					return refused
				}
				o.OnDestroy = func(Attachment) {
					mu.Lock()
					defer mu.Unlock()
					destroyed++
				}
			})
			for range 2 { // the ID stays free for another try
				if _, err := p.Setup(ctx, "refused"); !errors.Is(err, refused) {
					t.Fatalf("Setup: err %v, want the hook's error", err)
				}
				if _, ok := p.Lookup("refused"); ok {
					t.Fatal("failed Setup left an attachment")
				}
			}
			if err := p.Close(); err != nil {
				t.Fatal(err)
			}
			if left, err := p.Devices(); err != nil || len(left) > 0 {
				t.Fatalf("devices left after refused creates: %v %v", left, err)
			}
			mu.Lock()
			defer mu.Unlock()
			if tries < 2 || destroyed != 0 {
				t.Fatalf("OnCreate ran %d times, OnDestroy %d; want ≥2 and 0 (nothing was created)", tries, destroyed)
			}
		})
	}
}

// A spare whose link someone removed cannot be claimed; Setup makes the
// sandbox's devices instead and the spare's namespace goes.
func TestSetupSpareVanished(t *testing.T) {
	ctx := context.Background()
	var hooks hookLog
	p, _ := testPool(t, "100.88.253.96/28", func(o *Options) { o.Spares = 1; hooks.install(o) })
	waitSpares(t, p, 1)
	spares, _ := hooks.calls()
	if err := netlink.LinkDel(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Index: spares[0].HostIndex}}); err != nil {
		t.Fatal(err)
	}
	a, err := p.Setup(ctx, "afterloss")
	if err != nil {
		t.Fatal(err)
	}
	checkHostEnd(t, a)
	checkGuestEnd(t, a)
	if a.HostIndex == spares[0].HostIndex {
		t.Fatalf("Setup handed out the removed spare %+v", a)
	}
	if _, err := os.Stat(spares[0].Netns); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("namespace of the lost spare: %v, want it removed", err)
	}
	if err := p.Teardown(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
}

func TestNewPoolRejectsOptions(t *testing.T) {
	requireRoot(t)
	for _, o := range []Options{
		{Mode: Mode(7)},
		{Spares: -1},
	} {
		o.Prefix = netip.MustParsePrefix("100.88.248.0/28")
		o.NetnsDir = t.TempDir()
		o.LinkPrefix = "cbtest"
		if p, err := NewPool(o); !errors.Is(err, ErrBadOptions) {
			if p != nil {
				p.Close()
			}
			t.Errorf("NewPool(%+v): err %v, want ErrBadOptions", o, err)
		}
	}
}

func TestSlotOf(t *testing.T) {
	p := &Pool{linkPrefix: "cbtest"}
	for _, tc := range []struct {
		name string
		idx  int
		ok   bool
	}{
		{"cbtest0", 0, true},
		{"cbtest17", 17, true},
		{"cbtest017", 0, false},
		{"cbtest+1", 0, false},
		{"cbtest-1", 0, false},
		{"cbtest", 0, false},
		{"cbtestx1", 0, false},
		{"cbtest-sandbox", 0, false},
		{"other1", 0, false},
		{"cbtest99999999999999999999", 0, false},
	} {
		idx, ok := p.slotOf(tc.name)
		if ok != tc.ok || idx != tc.idx {
			t.Errorf("slotOf(%q) = %d, %v; want %d, %v", tc.name, idx, ok, tc.idx, tc.ok)
		}
	}
}

// FuzzSlotOf checks that slotOf accepts exactly the names the pool makes:
// names of links and namespaces on the host are anyone's to choose.
func FuzzSlotOf(f *testing.F) {
	for _, s := range []string{"cbtest0", "cbtest12", "cbtest012", "cbtest+1", "cbtest-1", "cbtest", "cbtest1x", "cbtest99999999999999999999"} {
		f.Add(s)
	}
	p := &Pool{linkPrefix: "cbtest"}
	f.Fuzz(func(t *testing.T, name string) {
		idx, ok := p.slotOf(name)
		if ok && (idx < 0 || "cbtest"+strconv.Itoa(idx) != name) {
			t.Fatalf("slotOf(%q) = %d: not a name the pool makes", name, idx)
		}
		if !ok && idx != 0 {
			t.Fatalf("slotOf(%q) failed but returned %d", name, idx)
		}
	})
}
