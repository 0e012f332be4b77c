package network

// Concurrency: Pool.mu guards alloc, devs, ready and closed. It is held only
// for bookkeeping, never while devices are made or removed and never while
// a hook runs, so sandboxes are set up in parallel and hooks may call back
// into the Pool. It is the only lock; nothing else is ordered against it.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Options configures a Pool. Zero fields take the defaults.
type Options struct {
	// Prefix is the range sandbox /30s are carved from (DefaultPrefix).
	Prefix netip.Prefix
	// NetnsDir is where namespaces are bind-mounted (DefaultNetnsDir).
	NetnsDir string
	// LinkPrefix, lower-case letters, starts every host-end link name and
	// every namespace name (DefaultLinkPrefix). Distinct pools on one host
	// need distinct link prefixes (and disjoint address prefixes).
	LinkPrefix string
	// Mode is the device the sandboxes use: ModeVeth (gVisor) or ModeTap
	// (microVMs).
	Mode Mode
	// Spares is how many sets of devices the Pool keeps made ahead of
	// Setup, so that Setup only has to claim one. Each holds a /30 of
	// Prefix. Zero makes every sandbox's devices in Setup.
	Spares int
	// OnCreate, if set, runs for every set of devices the Pool makes,
	// once they exist and before anyone can use them: for a spare (whose
	// Attachment then has an empty ID) off the create path, otherwise in
	// Setup. What belongs to a device for its whole life is attached here
	// (the egress policy and DNS resolver: egress.Enforcer.PoolOptions),
	// keyed by HostIndex or HostLink, never by ID. If it fails, the devices are removed and
	// the error is returned by Setup (or logged, for a spare).
	OnCreate func(Attachment) error
	// OnDestroy, if set, runs before a set of devices whose OnCreate
	// succeeded is removed (by Teardown, by Close for spares, or by
	// NewPool for spares left by an earlier Pool), to undo OnCreate.
	OnDestroy func(Attachment)
	// Logger receives device-level events (slog.Default()).
	Logger *slog.Logger
}

// Attachment is one sandbox's network: its namespace and its addresses.
type Attachment struct {
	ID string
	// Netns is the path of the bind-mounted network namespace, for
	// setns(2) or an OCI spec's network namespace path.
	Netns string
	// HostLink is the name of the host end of the veth, HostIndex its
	// interface index.
	HostLink  string
	HostIndex int
	// Subnet is the sandbox's /30; Gateway (.1) is the host end's address
	// and Addr (.2) the sandbox's.
	Subnet  netip.Prefix
	Gateway netip.Addr
	Addr    netip.Addr
	// Tap is the tap device in Netns for the sandbox's VMM (ModeTap; ""
	// otherwise). The guest has GuestAddr in GuestSubnet, with
	// GuestGateway as gateway and DNS server; the namespace translates
	// GuestAddr to and from Addr. The Guest fields are zero without a tap.
	Tap          string
	GuestSubnet  netip.Prefix
	GuestAddr    netip.Addr
	GuestGateway netip.Addr
}

// Pool allocates sandbox subnets and creates and removes their devices.
// All methods are safe for concurrent use; calls for one sandbox ID must
// not overlap.
type Pool struct {
	prefix     netip.Prefix
	netnsDir   string
	linkPrefix string
	mode       Mode
	spares     int
	onCreate   func(Attachment) error
	onDestroy  func(Attachment)
	log        *slog.Logger

	mu    sync.Mutex
	alloc *allocator
	// devs holds what the Pool knows of every slot whose devices exist:
	// attached, spare, or being made once the host end is there.
	devs map[int]device
	// ready are the slots of spares that may be claimed, oldest first.
	ready []int
	// closed is set by Close: no more spares are made.
	closed bool

	// wake asks the filler to top the spares up (capacity 1: one pending
	// request stands for any number).
	wake chan struct{}
	// stop ends the filler; filled is closed once it has returned and
	// every spare it was making is in ready or removed. Both are nil
	// without spares.
	stop      chan struct{}
	filled    chan struct{}
	closeOnce sync.Once
}

// device is the state of one slot's devices that its index does not give.
type device struct {
	ifindex int
	// legacyNetns, if set, is where the namespace is mounted instead of
	// the slot's path: sandboxes set up before namespaces were named by
	// slot kept their ID-named mount.
	legacyNetns string
}

var (
	// validID matches the IDs a Pool accepts: they become link aliases
	// and once became file names. It never matches spareAlias.
	validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	// validLinkPrefix matches LinkPrefix values.
	validLinkPrefix = regexp.MustCompile(`^[a-z]+$`)
)

func (opts Options) withDefaults() Options {
	if !opts.Prefix.IsValid() {
		opts.Prefix = DefaultPrefix
	}
	if opts.NetnsDir == "" {
		opts.NetnsDir = DefaultNetnsDir
	}
	if opts.LinkPrefix == "" {
		opts.LinkPrefix = DefaultLinkPrefix
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	return opts
}

// Check says whether NewPool would accept opts as given (zero fields take
// their defaults), without touching the host: a server checks its flags
// with it before it does anything. Overlaps with the host's networks are
// NewPool's to find.
func (opts Options) Check() error {
	opts = opts.withDefaults()
	if opts.Mode != ModeVeth && opts.Mode != ModeTap {
		return fmt.Errorf("%w: unknown mode %v", ErrBadOptions, opts.Mode)
	}
	if opts.Spares < 0 {
		return fmt.Errorf("%w: %d spares", ErrBadOptions, opts.Spares)
	}
	alloc, err := newAllocator(opts.Prefix)
	if err != nil {
		return err
	}
	if !validLinkPrefix.MatchString(opts.LinkPrefix) {
		return fmt.Errorf("%w: link prefix %q must be lower-case letters, so that the slot index after it parses back", ErrBadPrefix, opts.LinkPrefix)
	}
	if n := len(opts.LinkPrefix) + len(strconv.Itoa(alloc.slots-1)); n > ifNameMax {
		return fmt.Errorf("%w: link prefix %q with up to %d slots makes %d-character names; Linux allows %d",
			ErrBadPrefix, opts.LinkPrefix, alloc.slots, n, ifNameMax)
	}
	return nil
}

// NewPool makes a pool over opts.Prefix. It refuses, with an *OverlapError,
// a prefix that overlaps any address or route of the host. It adopts the
// host-end links an earlier Pool with the same LinkPrefix left (a server
// restart), so their addresses are not handed out again, and removes that
// Pool's spares and any devices it left half made. With opts.Spares it
// starts making spares in the background; Close stops that.
func NewPool(opts Options) (*Pool, error) {
	opts = opts.withDefaults()
	if err := opts.Check(); err != nil {
		return nil, err
	}
	alloc, err := newAllocator(opts.Prefix)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(opts.NetnsDir, 0o755); err != nil {
		return nil, fmt.Errorf("network: create netns dir: %w", err)
	}
	p := &Pool{
		prefix:     opts.Prefix,
		netnsDir:   opts.NetnsDir,
		linkPrefix: opts.LinkPrefix,
		mode:       opts.Mode,
		spares:     opts.Spares,
		onCreate:   opts.OnCreate,
		onDestroy:  opts.OnDestroy,
		log:        opts.Logger.With("component", "network"),
		alloc:      alloc,
		devs:       make(map[int]device),
		wake:       make(chan struct{}, 1),
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("network: netlink: %w", err)
	}
	defer h.Close()
	ours, stale, err := p.adopt(h)
	if err != nil {
		return nil, err
	}
	used, err := hostNets(h, ours)
	if err != nil {
		return nil, err
	}
	if err := checkOverlap(p.prefix, used); err != nil {
		return nil, err
	}
	// Only now that the pool is known to be usable: remove what the
	// earlier Pool left unfinished.
	if err := p.removeStale(stale); err != nil {
		return nil, err
	}
	if p.spares > 0 {
		p.stop = make(chan struct{})
		p.filled = make(chan struct{})
		go p.fill()
	}
	return p, nil
}

// staleLink is a host end of the pool that belongs to no sandbox.
type staleLink struct {
	idx     int
	ifindex int
	// spare is set for a finished spare, whose OnCreate had run.
	spare bool
}

// adopt restores the allocations of host-end links left by an earlier Pool.
// It returns the interface indices of all the pool's links, and the links
// that belong to no sandbox: spares, and links whose alias was never set
// (their sandbox never started, and nobody can name it to tear it down).
func (p *Pool) adopt(h *netlink.Handle) (map[int]bool, []staleLink, error) {
	links, err := h.LinkList()
	if err != nil {
		return nil, nil, fmt.Errorf("network: list links: %w", err)
	}
	ours := make(map[int]bool)
	var stale []staleLink
	for _, l := range links {
		a := l.Attrs()
		idx, ok := p.slotOf(a.Name)
		if !ok || l.Type() != "veth" {
			continue
		}
		ours[a.Index] = true
		if !validID.MatchString(a.Alias) {
			stale = append(stale, staleLink{idx: idx, ifindex: a.Index, spare: a.Alias == spareAlias})
			continue
		}
		if err := p.alloc.restore(a.Alias, idx); err != nil {
			return nil, nil, fmt.Errorf("network: adopt link %s: %w", a.Name, err)
		}
		// The address must be the one the slot gives: otherwise the
		// prefix was changed while sandboxes ran, and addresses computed
		// from it would be wrong.
		want := p.alloc.subnet(idx).Addr().Next()
		addrs, err := h.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return nil, nil, fmt.Errorf("network: addresses of %s: %w", a.Name, err)
		}
		for _, ad := range addrs {
			if got, ok := netip.AddrFromSlice(ad.IP); ok && got.Unmap() != want {
				return nil, nil, fmt.Errorf("%w: link %s of sandbox %s has address %v, but prefix %v puts it at %v; was the prefix changed while sandboxes ran?",
					ErrBadPrefix, a.Name, a.Alias, got.Unmap(), p.prefix, want)
			}
		}
		d := device{ifindex: a.Index}
		if !exists(p.slotNetns(idx)) && exists(p.legacyNetns(a.Alias)) {
			d.legacyNetns = p.legacyNetns(a.Alias)
		}
		p.devs[idx] = d
		p.log.Debug("adopted sandbox link", "link", a.Name, "sandbox", a.Alias)
	}
	return ours, stale, nil
}

// removeStale removes the links adopt found unowned, with their namespaces,
// and namespace mounts of slots that have no link (a Pool stopped between
// mounting a namespace and making its veth).
func (p *Pool) removeStale(stale []staleLink) error {
	for _, s := range stale {
		a := p.attachment("", s.idx)
		a.HostIndex = s.ifindex
		if s.spare {
			p.log.Info("removing spare left by an earlier pool", "link", a.HostLink)
		} else {
			p.log.Warn("removing orphaned sandbox link", "link", a.HostLink)
		}
		if err := p.destroy(a, s.spare); err != nil {
			return fmt.Errorf("network: remove stale devices: %w", err)
		}
	}
	ents, err := os.ReadDir(p.netnsDir)
	if err != nil {
		return fmt.Errorf("network: read %s: %w", p.netnsDir, err)
	}
	for _, e := range ents {
		idx, ok := p.slotOf(e.Name())
		if !ok {
			continue
		}
		if _, used := p.alloc.byIndex[idx]; used {
			continue
		}
		path := filepath.Join(p.netnsDir, e.Name())
		p.log.Warn("removing orphaned network namespace", "netns", path)
		if err := removeNetns(path); err != nil {
			return fmt.Errorf("network: remove stale devices: %w", err)
		}
	}
	return nil
}

// slotOf parses a host-end link name (or a namespace's name) back into its
// slot index.
func (p *Pool) slotOf(name string) (int, bool) {
	digits, ok := strings.CutPrefix(name, p.linkPrefix)
	if !ok || digits == "" || (len(digits) > 1 && digits[0] == '0') {
		return 0, false
	}
	idx, err := strconv.Atoi(digits)
	if err != nil || idx < 0 || digits != strconv.Itoa(idx) {
		// Atoi accepts a sign: "+1" is not a name the pool makes.
		return 0, false
	}
	return idx, true
}

// Prefix is the pool's address range.
func (p *Pool) Prefix() netip.Prefix { return p.prefix }

// Mode is the device the pool's sandboxes use.
func (p *Pool) Mode() Mode { return p.mode }

// NetnsPath is where the namespace of sandbox id is mounted, or "" if id
// has no attachment.
func (p *Pool) NetnsPath(id string) string {
	a, ok := p.Lookup(id)
	if !ok {
		return ""
	}
	return a.Netns
}

// slotNetns is where the namespace of slot idx is mounted: named like its
// host-end link, so a spare's path stays valid when it is claimed.
func (p *Pool) slotNetns(idx int) string {
	return filepath.Join(p.netnsDir, p.linkPrefix+strconv.Itoa(idx))
}

// legacyNetns is where namespaces were mounted before they were named by
// slot. Sandboxes started then keep theirs until Teardown.
func (p *Pool) legacyNetns(id string) string {
	return filepath.Join(p.netnsDir, p.linkPrefix+"-"+id)
}

// attachment describes slot idx given to id ("" for a spare). The caller
// holds p.mu or is the only user of p.
func (p *Pool) attachment(id string, idx int) Attachment {
	subnet := p.alloc.subnet(idx)
	gw := subnet.Addr().Next()
	d := p.devs[idx]
	a := Attachment{
		ID:        id,
		Netns:     p.slotNetns(idx),
		HostLink:  p.linkPrefix + strconv.Itoa(idx),
		HostIndex: d.ifindex,
		Subnet:    subnet,
		Gateway:   gw,
		Addr:      gw.Next(),
	}
	if d.legacyNetns != "" {
		a.Netns = d.legacyNetns
	}
	if p.mode == ModeTap {
		a.Tap = TapName
		a.GuestSubnet = GuestSubnet
		a.GuestAddr = GuestAddr
		a.GuestGateway = GuestGateway
	}
	return a
}

// Lookup reports the attachment of sandbox id, if it has one.
func (p *Pool) Lookup(id string) (Attachment, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	idx, ok := p.alloc.lookup(id)
	if !ok {
		return Attachment{}, false
	}
	return p.attachment(id, idx), true
}

// List reports every attachment of the pool, ordered by ID. Spares are not
// attachments.
func (p *Pool) List() []Attachment {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Attachment, 0, len(p.alloc.byID))
	for id, idx := range p.alloc.byID {
		out = append(out, p.attachment(id, idx))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Setup gives sandbox id a subnet and its devices: a network namespace
// mounted at Attachment.Netns with lo up, a veth pair whose host end has
// the gateway address and whose other end, eth0 in the namespace, has the
// sandbox's address and a default route via the gateway; in ModeTap also
// tap0 and the address translation to it. It claims a spare if one is
// ready and otherwise makes the devices (and runs OnCreate). On error
// nothing is left behind.
func (p *Pool) Setup(ctx context.Context, id string) (Attachment, error) {
	if !validID.MatchString(id) {
		return Attachment{}, fmt.Errorf("%w: %q", ErrBadID, id)
	}
	if err := ctx.Err(); err != nil {
		return Attachment{}, err
	}
	defer p.refill()
	a, claimed, err := p.claim(id)
	if err != nil || claimed {
		return a, err
	}

	p.mu.Lock()
	idx, err := p.alloc.alloc(id)
	if err == nil {
		a = p.attachment(id, idx)
	}
	p.mu.Unlock()
	if err != nil {
		return Attachment{}, err
	}
	a, err = p.create(a, id)
	if err != nil {
		return Attachment{}, fmt.Errorf("network: set up sandbox %s: %w", id, err)
	}
	p.log.Debug("network attached", "sandbox", id, "link", a.HostLink, "addr", a.Addr)
	return a, nil
}

// create makes a's devices, with alias on the host end, and runs OnCreate.
// On failure it removes them again and releases a's slot (the slot stays
// taken if removing failed: its devices may still exist).
func (p *Pool) create(a Attachment, alias string) (Attachment, error) {
	idx := p.slotIndex(a)
	err := onFreshThread(func() error {
		ifindex, err := p.build(a, alias)
		a.HostIndex = ifindex
		return err
	})
	if a.HostIndex != 0 {
		// Recorded even on failure, so that Lookup during the cleanup
		// below sees the device.
		p.mu.Lock()
		p.devs[idx] = device{ifindex: a.HostIndex}
		p.mu.Unlock()
	}
	if err == nil && p.onCreate != nil {
		if err = p.onCreate(a); err != nil {
			err = fmt.Errorf("OnCreate: %w", err)
		}
	}
	if err == nil {
		return a, nil
	}
	// OnCreate failed or never ran: OnDestroy has nothing to undo.
	if derr := p.destroy(a, false); derr != nil {
		p.log.Error("cleaning up failed network setup", "link", a.HostLink, "err", derr)
		return Attachment{}, err
	}
	p.forget(a)
	return Attachment{}, err
}

// slotIndex is the slot of a's subnet.
func (p *Pool) slotIndex(a Attachment) int {
	return int((addrToUint(a.Subnet.Addr()) - p.alloc.base) >> slotBits)
}

// forget drops the bookkeeping of a's slot, whose devices are gone.
func (p *Pool) forget(a Attachment) {
	idx := p.slotIndex(a)
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.devs, idx)
	if a.ID != "" {
		p.alloc.free(a.ID)
	} else {
		p.alloc.release(idx)
	}
}

// Teardown runs OnDestroy, removes sandbox id's devices and namespace and
// the host's connection tracking of its address, and frees its subnet.
// Tearing down a sandbox that has nothing left is not an error.
func (p *Pool) Teardown(ctx context.Context, id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("%w: %q", ErrBadID, id)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	a, attached := p.Lookup(id)
	if !attached {
		// A namespace mounted under the sandbox's ID by an older version
		// may outlive its link.
		if err := removeNetns(p.legacyNetns(id)); err != nil {
			return fmt.Errorf("network: tear down sandbox %s: %w", id, err)
		}
		return nil
	}
	if err := p.destroy(a, true); err != nil {
		// Keep the subnet reserved: its devices may still exist.
		return fmt.Errorf("network: tear down sandbox %s: %w", id, err)
	}
	p.forget(a)
	p.refill()
	p.log.Debug("network detached", "sandbox", id, "link", a.HostLink)
	return nil
}

// Devices lists what of the pool exists on the host: host-end links and
// namespace mount points, attached, spare or neither. With no attachments
// left and the pool closed it should be empty; anything it reports then has
// leaked. (Taps live inside the namespaces and go with them.)
func (p *Pool) Devices() ([]string, error) {
	var out []string
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("network: list links: %w", err)
	}
	for _, l := range links {
		if _, ok := p.slotOf(l.Attrs().Name); ok {
			out = append(out, "link "+l.Attrs().Name)
		}
	}
	ents, err := os.ReadDir(p.netnsDir)
	if err != nil {
		return nil, fmt.Errorf("network: read %s: %w", p.netnsDir, err)
	}
	for _, e := range ents {
		if _, ok := p.slotOf(e.Name()); ok || strings.HasPrefix(e.Name(), p.linkPrefix+"-") {
			out = append(out, "netns "+filepath.Join(p.netnsDir, e.Name()))
		}
	}
	return out, nil
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}
