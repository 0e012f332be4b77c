package orchestrator

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/internal/testenv"
	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/dns"
	"github.com/cubicle-dev/cubicle/network/dns/dnstest"
	"github.com/cubicle-dev/cubicle/network/egress"
	"github.com/cubicle-dev/cubicle/network/policy"
	"github.com/cubicle-dev/cubicle/store"
)

// egressKit is egress enforcement as cubicle serve wires it: the eBPF
// policy (pinned under a test root), an Enforcer whose resolver forwards
// to a DNS server on loopback that answers every A query with
// upstreamAnswer, and the Enforcer's hooks on the world's pools, watched
// by a log of every prepare and release.
type egressKit struct {
	name     string
	prefix   netip.Prefix
	upstream netip.AddrPort
	pm       *policy.Manager
	enf      *egress.Enforcer
	devices  deviceLog
}

const egressPinRoot = "/sys/fs/bpf/cubicle-test"

var upstreamAnswer = netip.MustParseAddr("198.51.100.7")

// newEgressWorld is newWorld with egress enforcement.
func newEgressWorld(t *testing.T, subnet string) *world {
	t.Helper()
	testenv.RequireRoot(t, "starts gVisor sandboxes and enforces egress: namespaces, eBPF, port 53, cgroups")
	k := &egressKit{name: fmt.Sprintf("orch%d", os.Getpid()), prefix: netip.MustParsePrefix(subnet)}
	k.upstream = startUpstream(t)
	t.Cleanup(func() {
		k.stop()
		os.RemoveAll(filepath.Join(egressPinRoot, k.name))
		os.Remove(egressPinRoot) // only once empty
	})
	k.start(t)
	dataDir := t.TempDir()
	st, err := store.Open(dataDir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	w := &world{dataDir: dataDir, st: st, evicted: make(chan string, 64), egress: k}
	w.rt = w.runtime(t, subnet)
	w.tmpls = templates{
		"tiny": {ID: "tiny", Alias: "tiny", RootFS: minimalRootFS(t), CPUCount: 1, MemoryMB: 256, DiskSizeMB: 512},
		// The runtime refuses it after its devices were claimed.
		"broken": {ID: "broken", Alias: "broken", RootFS: "/nonexistent", CPUCount: 1, MemoryMB: 256, DiskSizeMB: 512},
	}
	return w
}

// start loads (or, after stop, adopts) the pinned policy and makes an
// Enforcer over it: a server's start.
func (k *egressKit) start(t *testing.T) {
	t.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	pm, err := policy.New(policy.Options{Name: k.name, PinRoot: egressPinRoot, PoolPrefix: k.prefix, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	enf, err := egress.New(pm, dns.Options{Upstreams: []netip.AddrPort{k.upstream}, Logger: log})
	if err != nil {
		pm.Close()
		t.Fatal(err)
	}
	k.pm, k.enf = pm, enf
}

// stop stops the resolver and lets go of the pinned policy, which stays
// in force: a server's stop.
func (k *egressKit) stop() {
	if k.enf != nil {
		k.enf.Close()
		k.pm.Close()
		k.enf, k.pm = nil, nil
	}
}

// poolOptions adds the Enforcer's hooks to o, each logged once it ran.
func (k *egressKit) poolOptions(o network.Options) network.Options {
	o = k.enf.PoolOptions(o)
	create, destroy := o.OnCreate, o.OnDestroy
	o.OnCreate = func(a network.Attachment) error {
		err := create(a)
		if err == nil {
			k.devices.add(a.HostLink, "prepare")
		}
		return err
	}
	o.OnDestroy = func(a network.Attachment) {
		k.devices.add(a.HostLink, "release")
		destroy(a)
	}
	return o
}

// deviceLog records, per host-end link, each prepare and release of its
// egress enforcement, in order. Links are reused by later devices, so a
// link's log is a sequence of lifetimes.
type deviceLog struct {
	mu     sync.Mutex
	events map[string][]string
}

func (l *deviceLog) add(link, ev string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.events == nil {
		l.events = map[string][]string{}
	}
	l.events[link] = append(l.events[link], ev)
}

// check fails t unless every device was prepared once and released once
// (released only if done), in turn: prepare, release, prepare, ...; it
// returns how many lifetimes it saw.
func (l *deviceLog) check(t *testing.T, done bool) int {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for link, evs := range l.events {
		for i, ev := range evs {
			if want := []string{"prepare", "release"}[i%2]; ev != want {
				t.Errorf("device %s: %v: event %d is a %s, want a %s (a device prepared or released twice)", link, evs, i, ev, want)
				break
			}
		}
		if done && len(evs)%2 != 0 {
			t.Errorf("device %s: %v: never released", link, evs)
		}
		n += (len(evs) + 1) / 2
	}
	return n
}

// startUpstream serves A queries on a loopback address of its own.
func startUpstream(t *testing.T) netip.AddrPort {
	addr := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 78, byte(os.Getpid() >> 8), byte(os.Getpid())}), 53)
	pc, err := net.ListenPacket("udp4", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go dnstest.Serve(pc, func(string) (netip.Addr, bool) { return upstreamAnswer, true }, 300)
	return addr
}

// resolves looks name up inside sandbox in, through its resolver
// configuration, its network and its egress policy, and reports whether
// it got upstreamAnswer.
func resolves(t *testing.T, in Info, name string) bool {
	t.Helper()
	// runFault's error is the exit status, if nothing failed before.
	out, err := runFault(in, "user", "resolve", name)
	switch {
	case strings.Contains(out, "resolved ["+upstreamAnswer.String()+"]"):
		return true
	case strings.Contains(out, "lookup "+name):
		return false
	}
	t.Fatalf("resolving %s in %s: %q, %v; want an answer or a failed lookup", name, in.ID, out, err)
	return false
}

// TestEgressPath drives a sandbox's network through everything that can
// happen to it with enforcement on: every device is prepared once as it is
// made and released once before it goes, on every path (pooled and cold
// creates, a failed create, a kill, a death, a restart, a pool drain); a
// sandbox's policy is in force from its first query, changes live, is
// counted in its metrics, and is restored by a restarted server.
func TestEgressPath(t *testing.T) {
	w := newEgressWorld(t, "100.89.7.0/24")
	k := w.egress
	ctx := context.Background()
	o := w.orchestrator(t, 1)
	t.Cleanup(func() { o.Close(ctx) }) // before the world's: nothing fills a pool as it is cleaned up
	closed, err := egress.Parse(false, []string{"allowed.test"}, nil)
	if err != nil {
		t.Fatal(err)
	}

	// A create with a policy (from the pool or cold: the pool holds one)
	// and one without.
	a, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour, Egress: &closed})
	if err != nil {
		t.Fatal(err)
	}
	b, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !resolves(t, a, "allowed.test") || resolves(t, a, "other.test") {
		t.Fatal("a closed sandbox's resolver does not follow its policy")
	}
	if !resolves(t, b, "other.test") {
		t.Fatal("a sandbox under the default policy cannot resolve")
	}

	// The policy changes live, and the counters are the enforcer's.
	if err := o.SetNetwork(ctx, b.ID, closed, nil); err != nil {
		t.Fatal(err)
	}
	if resolves(t, b, "other.test") || !resolves(t, b, "allowed.test") {
		t.Fatal("a policy set live is not in force")
	}
	ms, err := o.Metrics(ctx, b.ID, time.Time{}, time.Time{})
	if err != nil || len(ms) == 0 {
		t.Fatalf("metrics: %+v %v", ms, err)
	}
	if m := ms[len(ms)-1]; m.Egress.PassedPackets == 0 || m.Egress.PassedBytes == 0 {
		t.Errorf("the DNS queries b sent are not in its metrics: %+v", m.Egress)
	}

	// A create the runtime refuses after the devices were claimed gives
	// them back.
	if _, err := o.Create(ctx, CreateRequest{Template: "broken", Timeout: time.Hour}); err == nil {
		t.Fatal("a create from a template without a root filesystem succeeded")
	}
	// (Its pool keeps trying in the background, failing each time.)
	waitForWithin(t, deathBound, "every claimed device to belong to a runtime sandbox", func() bool {
		list, err := w.rt.List(ctx)
		if err != nil {
			return false
		}
		ids := map[string]bool{}
		for _, s := range list {
			ids[s.ID] = true
		}
		for _, a := range w.net.List() {
			if !ids[a.ID] {
				return false
			}
		}
		return true
	})

	// A kill and a death.
	sb, err := o.Get(b.ID)
	if err != nil {
		t.Fatal(err)
	}
	sb.mu.Lock()
	bNet := sb.net
	sb.mu.Unlock()
	if err := o.Kill(ctx, b.ID); err != nil {
		t.Fatal(err)
	}
	w.waitReleased(t, b.ID)
	if _, err := k.enf.Counters(bNet); !errors.Is(err, policy.ErrNotAttached) {
		t.Errorf("counters of a killed sandbox's device: %v, want ErrNotAttached", err)
	}
	c, err := o.Create(ctx, CreateRequest{Template: "tiny", Timeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := killSentry(t, c.ID); err != nil {
		t.Fatal(err)
	}
	waitForWithin(t, deathBound, "the dead sandbox to be ended", func() bool {
		_, err := o.Get(c.ID)
		return err != nil
	})
	w.waitReleased(t, c.ID)
	k.devices.check(t, false)

	// A restart: the pool's slot is drained, the resolver stops with the
	// server; the policy stays pinned. The new server's resolver serves a
	// again, with a's policy from the store.
	if err := o.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.net.Close(); err != nil {
		t.Fatal(err)
	}
	k.stop()
	k.start(t)
	w.rt = w.runtime(t, "100.89.7.0/24")
	o = w.orchestrator(t, 1)
	t.Cleanup(func() { o.Close(ctx) })
	adopted, err := o.Get(a.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !resolves(t, adopted.Info(), "allowed.test") || resolves(t, adopted.Info(), "other.test") {
		t.Fatal("the restarted server did not restore a's policy")
	}

	// The end: with every sandbox killed and every pool closed, each
	// device was prepared once and released once.
	if err := o.Kill(ctx, a.ID); err != nil {
		t.Fatal(err)
	}
	w.waitReleased(t, a.ID)
	if err := o.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.net.Close(); err != nil {
		t.Fatal(err)
	}
	if left, err := w.net.Devices(); err != nil || len(left) > 0 {
		t.Errorf("devices left: %v %v", left, err)
	}
	// a, b, c, the failed create, and at least the pool's first slot.
	if n := k.devices.check(t, true); n < 5 {
		t.Errorf("%d device lifetimes logged, want at least 5", n)
	}
}

// killSentry kills sandbox id's sentry from outside, as a crash would.
func killSentry(t *testing.T, id string) error {
	p, err := os.FindProcess(sentryPID(t, id))
	if err != nil {
		return err
	}
	return p.Kill()
}
