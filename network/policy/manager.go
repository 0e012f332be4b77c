package policy

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/cubicle-dev/cubicle/network"
)

const (
	// DefaultPinRoot is where a Manager pins its maps, under Options.Name.
	DefaultPinRoot = "/sys/fs/bpf/cubicle"
	// DefaultName names the default Manager's pin directory.
	DefaultName = "default"
	// DefaultMaxSandboxes is the default size of the per-sandbox maps.
	DefaultMaxSandboxes = 16384
	// DefaultMaxRules is the default size of each shared rule trie.
	DefaultMaxRules = 65536
	// DefaultMaxLearned is the default size of the learned map, shared
	// by all sandboxes (not preallocated: memory follows use).
	DefaultMaxLearned = 65536
	// DefaultMaxFlows is the default size of the flows LRU map, shared by
	// all sandboxes. It is preallocated: 88 bytes an entry, 5.5 MiB of
	// kernel memory at this size (memlock in the map's fdinfo, kernel 6.18).
	DefaultMaxFlows = 65536
	// DefaultFlowIdleTimeout is how long a flow may go unused before
	// SweepLearned forgets it.
	DefaultFlowIdleTimeout = time.Hour
	// MaxLearnedPerSandbox bounds one sandbox's learned addresses, so that
	// one sandbox cannot fill the shared learned map.
	MaxLearnedPerSandbox = 4096

	// filterPriority and filterHandle identify our cls_bpf filter at clsact
	// ingress, so that attaching again replaces it.
	filterPriority = 1
	filterHandle   = 1
)

// builtinHard are destinations no policy opens, besides the pool prefix and
// the host addresses.
var builtinHard = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),      // "this network", RFC 791 / RFC 1122 §3.2.1.3
	netip.MustParsePrefix("127.0.0.0/8"),    // loopback, RFC 1122 §3.2.1.3
	netip.MustParsePrefix("169.254.0.0/16"), // link-local incl. cloud metadata 169.254.169.254, RFC 3927
	netip.MustParsePrefix("224.0.0.0/4"),    // multicast, RFC 5771
	netip.MustParsePrefix("240.0.0.0/4"),    // reserved and limited broadcast, RFC 1112 §4 / RFC 919
}

// closedRanges are dropped by default, like the host's networks and
// gateways (Options.HostLAN); only an allowOut entry opens them, and an
// address a domain resolves to there is not opened by the answer. They
// are the private ranges and those of the IANA IPv4 Special-Purpose
// Address Registry (RFC 6890) that are not globally reachable and not
// hard-denied already (0/8, 127/8, 169.254/16 and 240/4, which holds
// 255.255.255.255, are; so is 224/4, not in the registry). Left out, being
// globally reachable by the registry: 192.31.196.0/24 and 192.175.48.0/24
// (AS112 DNS, which only the sandbox's resolver could ask anyway) and
// 192.52.193.0/24 (AMT relays).
var closedRanges = []netip.Prefix{
	netip.MustParsePrefix("10.0.0.0/8"),     // private, RFC 1918
	netip.MustParsePrefix("172.16.0.0/12"),  // private, RFC 1918
	netip.MustParsePrefix("192.168.0.0/16"), // private, RFC 1918
	netip.MustParsePrefix("100.64.0.0/10"),  // shared address space (CGNAT), RFC 6598
	// IETF protocol assignments, RFC 6890 §2.1: DS-Lite, NAT64 discovery,
	// and the PCP and TURN anycast addresses 192.0.0.9 and .10, which are
	// globally reachable by the registry but let a sandbox ask a NAT for
	// port mappings (PCP) or a relay; nothing a sandbox needs.
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.0.2.0/24"),    // documentation, TEST-NET-1, RFC 5737
	netip.MustParsePrefix("192.88.99.0/24"),  // deprecated 6to4 relay anycast, RFC 7526
	netip.MustParsePrefix("198.18.0.0/15"),   // benchmarking, RFC 2544
	netip.MustParsePrefix("198.51.100.0/24"), // documentation, TEST-NET-2, RFC 5737
	netip.MustParsePrefix("203.0.113.0/24"),  // documentation, TEST-NET-3, RFC 5737
}

// maxClosed sizes the closed trie: closedRanges, the host's networks and
// gateways, and the operator's Options.AllowCIDRs.
const maxClosed = 4096

// Values of the closed trie. The longest match decides: an operator's
// AllowCIDRs entry is stored as closedOpen and wins over every closed
// prefix that contains it; closed prefixes inside it are not stored.
const (
	closedOpen   = 0
	closedClosed = 1
)

var (
	// ErrNotAttached is returned for an ifindex with no policy.
	ErrNotAttached = errors.New("policy: interface has no policy attached")
	// ErrAttached is returned by Attach for an ifindex that has one.
	ErrAttached = errors.New("policy: interface already has a policy")
	// ErrLinkAddress is returned by Attach when the host-end link does not
	// carry exactly one IPv4 /30 or /31 from which the gateway and the
	// sandbox address follow.
	ErrLinkAddress = errors.New("policy: host-end link has no usable IPv4 /30 or /31")
	// ErrBadOptions is returned by New for unusable options.
	ErrBadOptions = errors.New("policy: invalid options")
	// ErrLearnedFull is returned by Learn when the sandbox already has
	// MaxLearnedPerSandbox unexpired addresses, or the shared learned map
	// is full of unexpired ones. A resolver should answer SERVFAIL.
	ErrLearnedFull = errors.New("policy: too many learned addresses")
)

// Options configures a Manager. Zero fields take defaults.
type Options struct {
	// Name is the pin directory under PinRoot (DefaultName); distinct
	// Managers on one host need distinct names.
	Name string
	// PinRoot is a directory on a bpf file system (DefaultPinRoot).
	PinRoot string
	// PoolPrefix is the sandbox address pool (network.DefaultPrefix):
	// hard-denied, so sandboxes never reach each other.
	PoolPrefix netip.Prefix
	// HostAddrs are the host's own addresses and networks, hard-denied.
	// SetHostAddrs replaces them later.
	HostAddrs []netip.Prefix
	// HostLAN are the host's connected networks and gateways (HostLAN
	// lists them), closed like the private ranges: only allowOut opens
	// them. FollowHostAddrs keeps them in step with the host.
	HostLAN []netip.Prefix
	// DenyCIDRs are the operator's own ranges, hard-denied like the host's
	// addresses: no policy opens them.
	DenyCIDRs []netip.Prefix
	// AllowCIDRs are ranges the operator takes out of the closed ones
	// (private and special-purpose ranges, the host's networks and
	// gateways): sandboxes reach them as they reach the internet, under
	// their policies. Hard denies (the pool, the host's addresses,
	// metadata, DenyCIDRs…) stay denied inside them.
	AllowCIDRs []netip.Prefix
	// MaxSandboxes and MaxRules size the maps (DefaultMaxSandboxes,
	// DefaultMaxRules). They are fixed once the maps are pinned.
	MaxSandboxes, MaxRules uint32
	// MaxLearned and MaxFlows size the learned and flows maps
	// (DefaultMaxLearned, DefaultMaxFlows), fixed once pinned too. When
	// the flows map is full, the least recently used flow of any sandbox
	// is evicted: its connection keeps working only while its address is
	// still learned.
	MaxLearned, MaxFlows uint32
	// FlowIdleTimeout is how long a flow may carry no packet before
	// SweepLearned deletes it (DefaultFlowIdleTimeout).
	FlowIdleTimeout time.Duration
	// NetNS, if a handle other than 0 and netns.None(), is the network
	// namespace the host-end links and the host addresses live in (tests);
	// by default the caller's.
	NetNS netns.NsHandle
	// Logger receives reconcile events (slog.Default()).
	Logger *slog.Logger
}

// Counters are one sandbox's egress counters, summed over CPUs, since
// Attach. Dropped counts include DroppedIPv6.
type Counters struct {
	PassedPackets, PassedBytes   uint64
	DroppedPackets, DroppedBytes uint64
	DroppedIPv6Packets           uint64
}

// sandbox is the Go side of one attached interface.
type sandbox struct {
	cfg   configValue
	allow []netip.Prefix
	deny  []netip.Prefix
	// learned mirrors the sandbox's learned entries (address → deadline
	// in CLOCK_MONOTONIC ns). Only the Manager writes that map, so the
	// mirror is exact, and Learn, Forget and Detach need no map walk.
	learned map[netip.Addr]uint64
}

func newSandbox(cfg configValue) *sandbox {
	return &sandbox{cfg: cfg, learned: make(map[netip.Addr]uint64)}
}

// Manager owns the egress program and its maps. All methods are safe for
// concurrent use: mu serialises every map change (so Update's
// write-new/swap/delete-old sequence never interleaves with another), while
// the kernel program reads the maps without locks; each of its decisions
// sees one policy ID, old or new, never a mix.
//
// The program itself writes only the counters and flows maps, and the
// Manager walks and deletes flows without mu (see purgeFlows): mu guards
// the maps the Manager alone writes.
type Manager struct {
	log      *slog.Logger
	nl       *netlink.Handle
	ns       netns.NsHandle // the links' namespace (a dup), or netns.None()
	dir      string
	pool     netip.Prefix
	flowIdle time.Duration

	deny []netip.Prefix // Options.DenyCIDRs
	open []netip.Prefix // Options.AllowCIDRs

	// following counts FollowHostAddrs's goroutine, which Close waits for.
	following sync.WaitGroup

	mu       sync.Mutex // guards everything below
	maps     map[string]*ebpf.Map
	prog     *ebpf.Program
	byIf     map[int]*sandbox
	nextID   uint32
	hostAddr []netip.Prefix // last set applied by FollowHostAddrs
	hostLAN  []netip.Prefix // last set applied by FollowHostAddrs
}

var validName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// New loads the maps (reusing pinned ones, so policies and counters survive
// a server restart), loads the program, and reconciles: every interface in
// the pinned config map that still exists gets the new program attached,
// and map entries of interfaces that are gone are deleted.
func New(opts Options) (*Manager, error) {
	if opts.Name == "" {
		opts.Name = DefaultName
	}
	if opts.PinRoot == "" {
		opts.PinRoot = DefaultPinRoot
	}
	if !opts.PoolPrefix.IsValid() {
		opts.PoolPrefix = network.DefaultPrefix
	}
	if opts.MaxSandboxes == 0 {
		opts.MaxSandboxes = DefaultMaxSandboxes
	}
	if opts.MaxRules == 0 {
		opts.MaxRules = DefaultMaxRules
	}
	if opts.MaxLearned == 0 {
		opts.MaxLearned = DefaultMaxLearned
	}
	if opts.MaxFlows == 0 {
		opts.MaxFlows = DefaultMaxFlows
	}
	if opts.FlowIdleTimeout == 0 {
		opts.FlowIdleTimeout = DefaultFlowIdleTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if !validName.MatchString(opts.Name) {
		return nil, fmt.Errorf("%w: name %q", ErrBadOptions, opts.Name)
	}
	if !opts.PoolPrefix.Addr().Is4() {
		return nil, fmt.Errorf("%w: pool prefix %v is not IPv4", ErrBadOptions, opts.PoolPrefix)
	}
	if opts.FlowIdleTimeout < 0 {
		return nil, fmt.Errorf("%w: negative flow idle timeout %v", ErrBadOptions, opts.FlowIdleTimeout)
	}
	deny, err := ipv4Prefixes("deny CIDR", opts.DenyCIDRs)
	if err != nil {
		return nil, err
	}
	open, err := ipv4Prefixes("allow CIDR", opts.AllowCIDRs)
	if err != nil {
		return nil, err
	}
	m := &Manager{
		log:      opts.Logger.With("component", "network/policy"),
		ns:       netns.None(),
		dir:      filepath.Join(opts.PinRoot, opts.Name),
		pool:     opts.PoolPrefix.Masked(),
		flowIdle: opts.FlowIdleTimeout,
		deny:     deny,
		open:     open,
		maps:     make(map[string]*ebpf.Map),
		byIf:     make(map[int]*sandbox),
	}
	// The zero value (fd 0, stdin) means "not set", as for every other
	// field; only netns.None() (-1) said so before.
	if opts.NetNS.IsOpen() && opts.NetNS != 0 {
		// A dup, so that FollowHostAddrs can subscribe there however long
		// the caller keeps its handle.
		fd, derr := unix.FcntlInt(uintptr(opts.NetNS), unix.F_DUPFD_CLOEXEC, 0)
		if derr != nil {
			return nil, fmt.Errorf("policy: dup netns handle: %w", derr)
		}
		m.ns = netns.NsHandle(fd)
		m.nl, err = netlink.NewHandleAt(opts.NetNS)
	} else {
		m.nl, err = netlink.NewHandle(unix.NETLINK_ROUTE)
	}
	if err != nil {
		m.ns.Close()
		return nil, fmt.Errorf("policy: netlink: %w", err)
	}
	if err := m.load(opts); err != nil {
		m.Close()
		return nil, err
	}
	return m, nil
}

// bpfFSMagic is BPF_FS_MAGIC from <linux/magic.h>.
const bpfFSMagic = 0xcafe4a11

// ensureBPFFS mounts the bpf file system at /sys/fs/bpf when a host has not
// (systemd does; minimal hosts and some containers do not), so that the
// default pin root works everywhere. Other pin roots are the caller's to
// provide.
func ensureBPFFS(pinRoot string) error {
	const mnt = "/sys/fs/bpf"
	if pinRoot != mnt && !strings.HasPrefix(pinRoot, mnt+"/") {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(mnt, &st); err == nil && st.Type == bpfFSMagic {
		return nil
	}
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("policy: mount the bpf file system at %s: %w", mnt, err)
	}
	return nil
}

func (m *Manager) load(opts Options) error {
	if err := ensureBPFFS(opts.PinRoot); err != nil {
		return err
	}
	if err := os.MkdirAll(m.dir, 0o700); err != nil {
		return fmt.Errorf("policy: pin dir: %w", err)
	}
	for name, spec := range mapSpecs(opts.MaxSandboxes, opts.MaxRules, opts.MaxLearned, opts.MaxFlows) {
		mp, err := ebpf.NewMapWithOptions(spec, ebpf.MapOptions{PinPath: m.dir})
		if err != nil {
			return fmt.Errorf("policy: map %s: %w", name, err)
		}
		m.maps[name] = mp
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         progName,
		Type:         ebpf.SchedCLS,
		Instructions: program(m.maps),
		// GPL for the socket-lookup helpers' sake; the program is
		// generated here, not distributed as an object.
		License: "GPL",
	})
	if err != nil {
		return fmt.Errorf("policy: load program: %w", err)
	}
	m.prog = prog
	pin := filepath.Join(m.dir, progName)
	_ = os.Remove(pin) // the old program stays loaded while filters use it
	if err := prog.Pin(pin); err != nil {
		return fmt.Errorf("policy: pin program: %w", err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.setHardLocked(opts.HostAddrs); err != nil {
		return err
	}
	if err := m.setClosedLocked(opts.HostLAN); err != nil {
		return err
	}
	if err := m.reconcileLocked(); err != nil {
		return err
	}
	// The closed trie was called "private" and held 64 entries before it
	// held the host's networks too. The program that used it was replaced
	// on every interface by reconcile; the pin is all that is left of it.
	if err := os.Remove(filepath.Join(m.dir, legacyMapPrivate)); err != nil && !errors.Is(err, os.ErrNotExist) {
		m.log.Warn("removing the pin of the former private-range map", "err", err)
	}
	return nil
}

// ipv4Prefixes checks that ps are IPv4 and masks them.
func ipv4Prefixes(what string, ps []netip.Prefix) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(ps))
	for _, p := range ps {
		if !p.IsValid() || !p.Addr().Is4() {
			return nil, fmt.Errorf("%w: %s %v is not an IPv4 prefix", ErrBadOptions, what, p)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// reconcileLocked rebuilds byIf from the pinned maps, re-attaches the new
// program to every interface that still exists and deletes everything else.
func (m *Manager) reconcileLocked() error {
	ids := map[uint32]int{}
	var ifindex uint32
	var cv configValue
	var gone []uint32
	it := m.maps[mapConfig].Iterate()
	for it.Next(&ifindex, &cv) {
		link, err := m.nl.LinkByIndex(int(ifindex))
		if err != nil {
			gone = append(gone, ifindex)
			continue
		}
		if err := m.attachFilter(link); err != nil {
			return err
		}
		m.byIf[int(ifindex)] = newSandbox(cv)
		ids[cv.PolicyID] = int(ifindex)
		m.nextID = max(m.nextID, cv.PolicyID)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("policy: reconcile: %w", err)
	}
	for _, i := range gone {
		m.log.Info("removing policy of vanished interface", "ifindex", i)
		_ = m.maps[mapConfig].Delete(i)
	}
	// Counters of interfaces without config are leftovers too.
	var stale []uint32
	var per []counterValue
	it = m.maps[mapCounters].Iterate()
	for it.Next(&ifindex, &per) {
		if _, ok := m.byIf[int(ifindex)]; !ok {
			stale = append(stale, ifindex)
		}
	}
	for _, i := range stale {
		_ = m.maps[mapCounters].Delete(i)
	}
	// Rule entries: adopt those of live policy IDs, delete the rest (left
	// by a crash in Update or by vanished interfaces).
	for _, name := range []string{mapAllow, mapDeny} {
		var k ruleKey
		var v uint32
		var orphans []ruleKey
		it := m.maps[name].Iterate()
		for it.Next(&k, &v) {
			idx, ok := ids[k.PolicyID]
			if !ok {
				orphans = append(orphans, k)
				continue
			}
			pfx := netip.PrefixFrom(netip.AddrFrom4(k.Addr), int(k.Prefixlen)-32)
			sb := m.byIf[idx]
			if name == mapAllow {
				sb.allow = append(sb.allow, pfx)
			} else {
				sb.deny = append(sb.deny, pfx)
			}
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("policy: reconcile %s: %w", name, err)
		}
		for _, k := range orphans {
			_ = m.maps[name].Delete(k)
		}
	}
	if err := m.reconcileLearnedLocked(); err != nil {
		return err
	}
	if len(m.byIf) > 0 || len(gone) > 0 {
		m.log.Info("reconciled egress policies", "attached", len(m.byIf), "removed", len(gone))
	}
	return nil
}

// SetHostAddrs replaces the host's own addresses in the hard-deny set; the
// next packet sees the new set.
func (m *Manager) SetHostAddrs(addrs []netip.Prefix) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.hostAddr = nil // FollowHostAddrs applies its next listing in any case
	return m.setHardLocked(addrs)
}

func (m *Manager) setHardLocked(hostAddrs []netip.Prefix) error {
	want := map[netip.Prefix]uint32{m.pool: 1}
	for _, p := range append(append(slices.Clone(builtinHard), m.deny...), hostAddrs...) {
		if !p.Addr().Unmap().Is4() {
			continue // IPv6 is dropped wholesale
		}
		want[netip.PrefixFrom(p.Addr().Unmap(), min(p.Bits(), 32)).Masked()] = 1
	}
	return m.syncTrie(mapHard, want)
}

// setClosedLocked makes the closed trie hold closedRanges and lan, less
// what the operator's AllowCIDRs open: those are stored as closedOpen, and
// closed prefixes inside one of them are left out, so that the longest
// match of any address inside an AllowCIDRs entry is an open one.
func (m *Manager) setClosedLocked(lan []netip.Prefix) error {
	want := map[netip.Prefix]uint32{}
	for _, p := range append(append([]netip.Prefix(nil), closedRanges...), lan...) {
		if !p.Addr().Unmap().Is4() {
			continue
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), min(p.Bits(), 32)).Masked()
		if !slices.ContainsFunc(m.open, func(o netip.Prefix) bool { return o.Bits() <= p.Bits() && o.Contains(p.Addr()) }) {
			want[p] = closedClosed
		}
	}
	for _, o := range m.open {
		want[o] = closedOpen
	}
	if len(want) > maxClosed {
		return fmt.Errorf("policy: %d closed ranges (host networks and gateways included), at most %d fit", len(want), maxClosed)
	}
	return m.syncTrie(mapClosed, want)
}

// syncTrie makes an addrKey trie hold exactly want: adds and changes
// first, then deletes, so no moment has fewer denies than both old and new
// sets.
func (m *Manager) syncTrie(name string, want map[netip.Prefix]uint32) error {
	var old []addrKey
	var k addrKey
	var v uint32
	it := m.maps[name].Iterate()
	for it.Next(&k, &v) {
		old = append(old, k)
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("policy: read %s: %w", name, err)
	}
	for p, v := range want {
		k := addrKey{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As4()}
		if err := m.maps[name].Put(k, v); err != nil {
			return fmt.Errorf("policy: %s %v: %w", name, p, err)
		}
	}
	for _, k := range old {
		p := netip.PrefixFrom(netip.AddrFrom4(k.Addr), int(k.Prefixlen))
		if _, ok := want[p]; ok {
			continue
		}
		if err := m.maps[name].Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("policy: %s delete %v: %w", name, p, err)
		}
	}
	return nil
}

// Attach gives the sandbox behind host-end link ifindex policy p and
// attaches the program at the link's clsact ingress. The link must carry
// its /30 (or /31): its own address is the sandbox's gateway and the other
// host address the sandbox's, the only source the sandbox may use.
func (m *Manager) Attach(ifindex int, p Policy) error {
	if err := p.validate(); err != nil {
		return err
	}
	link, err := m.nl.LinkByIndex(ifindex)
	if err != nil {
		return fmt.Errorf("policy: link %d: %w", ifindex, err)
	}
	gw, addr, err := m.linkAddrs(link)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.byIf[ifindex]; ok {
		return fmt.Errorf("%w: ifindex %d", ErrAttached, ifindex)
	}
	sb := newSandbox(configValue{Gateway: gw.As4(), Addr: addr.As4()})
	// Counters first and zeroed, so a reused ifindex starts from nothing.
	zero := make([]counterValue, ebpf.MustPossibleCPU())
	if err := m.maps[mapCounters].Put(uint32(ifindex), zero); err != nil {
		return fmt.Errorf("policy: counters: %w", err)
	}
	if err := m.applyLocked(ifindex, sb, p); err != nil {
		m.removeLocked(ifindex, sb)
		return err
	}
	m.byIf[ifindex] = sb
	if err := m.attachFilter(link); err != nil {
		m.removeLocked(ifindex, sb)
		delete(m.byIf, ifindex)
		return err
	}
	return nil
}

// Update replaces the policy of an attached interface. The change is
// atomic for the program: the new rules are written under a fresh policy
// ID, the config entry is switched to it in one map update, and only then
// are the old rules deleted. It takes effect on the next packet;
// established connections that the new policy denies stop mid-stream,
// except those with a flow (rule 8): learned addresses and flows are kept,
// and the resolver decides what to Forget.
func (m *Manager) Update(ifindex int, p Policy) error {
	if err := p.validate(); err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	sb, ok := m.byIf[ifindex]
	if !ok {
		return fmt.Errorf("%w: ifindex %d", ErrNotAttached, ifindex)
	}
	return m.applyLocked(ifindex, sb, p)
}

// applyLocked writes p under a new policy ID, switches ifindex's config to
// it, and deletes the rules of the old ID.
func (m *Manager) applyLocked(ifindex int, sb *sandbox, p Policy) error {
	oldID, oldAllow, oldDeny := sb.cfg.PolicyID, sb.allow, sb.deny
	id := m.newIDLocked()
	if err := m.putRules(mapAllow, id, p.AllowOut); err != nil {
		m.delRules(mapAllow, id, p.AllowOut)
		return err
	}
	if err := m.putRules(mapDeny, id, p.DenyOut); err != nil {
		m.delRules(mapAllow, id, p.AllowOut)
		m.delRules(mapDeny, id, p.DenyOut)
		return err
	}
	cfg := sb.cfg
	cfg.PolicyID = id
	cfg.Flags &= flagLearned // what was learned stays (Update keeps learned and flows)
	if p.AllowInternet {
		cfg.Flags |= flagInternet
	}
	if err := m.maps[mapConfig].Put(uint32(ifindex), cfg); err != nil {
		m.delRules(mapAllow, id, p.AllowOut)
		m.delRules(mapDeny, id, p.DenyOut)
		return fmt.Errorf("policy: config: %w", err)
	}
	sb.cfg, sb.allow, sb.deny = cfg, p.AllowOut, p.DenyOut
	if oldID != 0 {
		m.delRules(mapAllow, oldID, oldAllow)
		m.delRules(mapDeny, oldID, oldDeny)
	}
	return nil
}

func (m *Manager) newIDLocked() uint32 {
	used := map[uint32]bool{}
	for _, sb := range m.byIf {
		used[sb.cfg.PolicyID] = true
	}
	for {
		m.nextID++
		if m.nextID != 0 && !used[m.nextID] {
			return m.nextID
		}
	}
}

func ruleKeyOf(id uint32, p netip.Prefix) ruleKey {
	return ruleKey{Prefixlen: 32 + uint32(p.Bits()), PolicyID: id, Addr: p.Addr().As4()}
}

func (m *Manager) putRules(name string, id uint32, ps []netip.Prefix) error {
	for _, p := range ps {
		if err := m.maps[name].Put(ruleKeyOf(id, p.Masked()), uint32(1)); err != nil {
			return fmt.Errorf("policy: %s %v: %w", name, p, err)
		}
	}
	return nil
}

func (m *Manager) delRules(name string, id uint32, ps []netip.Prefix) {
	for _, p := range ps {
		err := m.maps[name].Delete(ruleKeyOf(id, p.Masked()))
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			m.log.Warn("delete rule", "map", name, "prefix", p, "err", err)
		}
	}
}

// Detach removes the interface's policy, counters, learned addresses and
// flows, and its filter (when the link still exists; deleting the veth
// removes the filter anyway). Until the link is gone, a detached interface
// drops everything: the program fails closed without a config entry.
func (m *Manager) Detach(ifindex int) error {
	m.mu.Lock()
	sb, ok := m.byIf[ifindex]
	if !ok {
		m.mu.Unlock()
		return fmt.Errorf("%w: ifindex %d", ErrNotAttached, ifindex)
	}
	if link, err := m.nl.LinkByIndex(ifindex); err == nil {
		_ = m.nl.FilterDel(m.filter(link))
	}
	m.removeLocked(ifindex, sb)
	delete(m.byIf, ifindex)
	m.mu.Unlock()
	// The flows map is walked outside mu: it can hold tens of thousands
	// of entries, and Attach for other sandboxes must not wait for that.
	// With the config entry gone the program creates no more flows for
	// ifindex, and Linux does not hand a freed ifindex out again at once,
	// so nothing new can appear under it meanwhile.
	if _, err := m.purgeFlows(func(k flowKey, _ uint64) bool { return k.Ifindex == uint32(ifindex) }); err != nil {
		return fmt.Errorf("policy: detach %d: %w", ifindex, err)
	}
	return nil
}

func (m *Manager) removeLocked(ifindex int, sb *sandbox) {
	_ = m.maps[mapConfig].Delete(uint32(ifindex))
	_ = m.maps[mapCounters].Delete(uint32(ifindex))
	if sb.cfg.PolicyID != 0 {
		m.delRules(mapAllow, sb.cfg.PolicyID, sb.allow)
		m.delRules(mapDeny, sb.cfg.PolicyID, sb.deny)
	}
	for a := range sb.learned {
		m.delLearned(ifindex, a)
	}
	clear(sb.learned)
}

// Counters returns the interface's counters summed over all CPUs.
func (m *Manager) Counters(ifindex int) (Counters, error) {
	m.mu.Lock()
	_, ok := m.byIf[ifindex]
	m.mu.Unlock()
	if !ok {
		return Counters{}, fmt.Errorf("%w: ifindex %d", ErrNotAttached, ifindex)
	}
	var per []counterValue
	if err := m.maps[mapCounters].Lookup(uint32(ifindex), &per); err != nil {
		return Counters{}, fmt.Errorf("policy: counters: %w", err)
	}
	var c Counters
	for _, v := range per {
		c.PassedPackets += v.PassPackets
		c.PassedBytes += v.PassBytes
		c.DroppedPackets += v.DropPackets
		c.DroppedBytes += v.DropBytes
		c.DroppedIPv6Packets += v.DropIPv6Packets
	}
	return c, nil
}

// Close releases the Manager's file descriptors. Pins, map contents and
// attached filters stay: the sandboxes keep their policies, and the next
// New adopts them. Cancel FollowHostAddrs's context first: Close waits for
// its goroutine.
func (m *Manager) Close() error {
	// A refresh of the host's addresses under way uses the netlink
	// handle closed below.
	m.following.Wait()
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, mp := range m.maps {
		mp.Close()
	}
	if m.prog != nil {
		m.prog.Close()
	}
	m.nl.Close()
	if m.ns.IsOpen() {
		m.ns.Close()
		m.ns = netns.None()
	}
	return nil
}

// Remove detaches every interface, unpins the program and maps and closes
// the Manager: nothing of it is left in the kernel.
func (m *Manager) Remove() error {
	m.mu.Lock()
	for idx := range m.byIf {
		if link, err := m.nl.LinkByIndex(idx); err == nil {
			_ = m.nl.FilterDel(m.filter(link))
		}
	}
	m.byIf = map[int]*sandbox{}
	for _, mp := range m.maps {
		_ = mp.Unpin()
	}
	if m.prog != nil {
		_ = m.prog.Unpin()
	}
	m.mu.Unlock()
	err := os.Remove(m.dir)
	m.Close()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("policy: remove pin dir: %w", err)
	}
	return nil
}

func (m *Manager) filter(link netlink.Link) *netlink.BpfFilter {
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: link.Attrs().Index,
			Parent:    netlink.HANDLE_MIN_INGRESS,
			Handle:    filterHandle,
			Protocol:  unix.ETH_P_ALL,
			Priority:  filterPriority,
		},
		Fd:           m.prog.FD(),
		Name:         "cubicle-" + progName,
		DirectAction: true,
	}
}

// attachFilter adds the clsact qdisc if missing and adds or replaces our
// filter, so it is idempotent and also how reconcile swaps programs.
func (m *Manager) attachFilter(link netlink.Link) error {
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: link.Attrs().Index,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := m.nl.QdiscReplace(q); err != nil {
		return fmt.Errorf("policy: clsact on %s: %w", link.Attrs().Name, err)
	}
	if err := m.nl.FilterReplace(m.filter(link)); err != nil {
		return fmt.Errorf("policy: attach filter on %s: %w", link.Attrs().Name, err)
	}
	return nil
}

// linkAddrs derives the gateway (the link's own address) and the
// sandbox's address (the other host of the /30 or /31).
func (m *Manager) linkAddrs(link netlink.Link) (gw, sandbox netip.Addr, err error) {
	addrs, err := addrList(m.nl, link)
	if err != nil {
		return gw, sandbox, fmt.Errorf("policy: addresses of %s: %w", link.Attrs().Name, err)
	}
	if len(addrs) != 1 {
		return gw, sandbox, fmt.Errorf("%w: %s has %d IPv4 addresses", ErrLinkAddress, link.Attrs().Name, len(addrs))
	}
	ones, _ := addrs[0].Mask.Size()
	a, ok := netip.AddrFromSlice(addrs[0].IP.To4())
	if !ok {
		return gw, sandbox, fmt.Errorf("%w: %s", ErrLinkAddress, link.Attrs().Name)
	}
	b := a.As4()
	switch {
	case ones == 31:
		b[3] ^= 1
	case ones == 30 && b[3]&3 == 1:
		b[3]++
	case ones == 30 && b[3]&3 == 2:
		b[3]--
	default:
		return gw, sandbox, fmt.Errorf("%w: %s has %v/%d", ErrLinkAddress, link.Attrs().Name, a, ones)
	}
	return a, netip.AddrFrom4(b), nil
}
