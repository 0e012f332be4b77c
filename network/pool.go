package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	goruntime "runtime"
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
	// Logger receives device-level events (slog.Default()).
	Logger *slog.Logger
}

// Attachment is one sandbox's network: its namespace and its addresses.
type Attachment struct {
	ID string
	// Netns is the path of the bind-mounted network namespace, for
	// setns(2) or an OCI spec's network namespace path.
	Netns string
	// HostLink is the name of the host end of the veth.
	HostLink string
	// Subnet is the sandbox's /30; Gateway (.1) is the host end's address
	// and Addr (.2) the sandbox's.
	Subnet  netip.Prefix
	Gateway netip.Addr
	Addr    netip.Addr
}

// Pool allocates sandbox subnets and creates and removes their devices.
// All methods are safe for concurrent use; calls for one sandbox ID must
// not overlap.
type Pool struct {
	prefix     netip.Prefix
	netnsDir   string
	linkPrefix string
	log        *slog.Logger

	// mu guards alloc. It is held only for bookkeeping, never while devices
	// are created or removed, so sandboxes are set up in parallel.
	mu    sync.Mutex
	alloc *allocator
}

var (
	// validID matches the IDs a Pool accepts: they become part of file
	// names and link aliases.
	validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	// validLinkPrefix matches LinkPrefix values.
	validLinkPrefix = regexp.MustCompile(`^[a-z]+$`)
)

// NewPool makes a pool over opts.Prefix. It refuses, with an *OverlapError,
// a prefix that overlaps any address or route of the host. It adopts the
// host-end links an earlier Pool with the same LinkPrefix left (a server
// restart), so their addresses are not handed out again.
func NewPool(opts Options) (*Pool, error) {
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
	alloc, err := newAllocator(opts.Prefix)
	if err != nil {
		return nil, err
	}
	if n := len(opts.LinkPrefix) + len(strconv.Itoa(alloc.slots-1)); n > ifNameMax {
		return nil, fmt.Errorf("%w: link prefix %q with up to %d slots makes %d-character names; Linux allows %d",
			ErrBadPrefix, opts.LinkPrefix, alloc.slots, n, ifNameMax)
	}
	if !validLinkPrefix.MatchString(opts.LinkPrefix) {
		return nil, fmt.Errorf("%w: link prefix %q must be lower-case letters, so that the slot index after it parses back", ErrBadPrefix, opts.LinkPrefix)
	}
	if err := os.MkdirAll(opts.NetnsDir, 0o755); err != nil {
		return nil, fmt.Errorf("network: create netns dir: %w", err)
	}
	p := &Pool{
		prefix:     opts.Prefix,
		netnsDir:   opts.NetnsDir,
		linkPrefix: opts.LinkPrefix,
		log:        opts.Logger.With("component", "network"),
		alloc:      alloc,
	}
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("network: netlink: %w", err)
	}
	defer h.Close()
	ours, err := p.adopt(h)
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
	return p, nil
}

// adopt restores the allocations of host-end links left by an earlier Pool
// and returns the indices of all the pool's links.
func (p *Pool) adopt(h *netlink.Handle) (map[int]bool, error) {
	links, err := h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("network: list links: %w", err)
	}
	ours := make(map[int]bool)
	for _, l := range links {
		a := l.Attrs()
		idx, ok := p.slotOf(a.Name)
		if !ok || l.Type() != "veth" {
			continue
		}
		ours[a.Index] = true
		if !validID.MatchString(a.Alias) {
			// The link was made but its alias never set: its sandbox
			// never started, and nobody can name it to tear it down.
			p.log.Warn("removing orphaned sandbox link", "link", a.Name)
			if err := h.LinkDel(l); err != nil && !isNotFound(err) {
				return nil, fmt.Errorf("network: remove orphaned link %s: %w", a.Name, err)
			}
			continue
		}
		if err := p.alloc.restore(a.Alias, idx); err != nil {
			return nil, fmt.Errorf("network: adopt link %s: %w", a.Name, err)
		}
		// The address must be the one the slot gives: otherwise the
		// prefix was changed while sandboxes ran, and addresses computed
		// from it would be wrong.
		want := p.attachment(a.Alias, idx).Gateway
		addrs, err := h.AddrList(l, netlink.FAMILY_V4)
		if err != nil {
			return nil, fmt.Errorf("network: addresses of %s: %w", a.Name, err)
		}
		for _, ad := range addrs {
			if got, ok := netip.AddrFromSlice(ad.IP); ok && got.Unmap() != want {
				return nil, fmt.Errorf("%w: link %s of sandbox %s has address %v, but prefix %v puts it at %v; was the prefix changed while sandboxes ran?",
					ErrBadPrefix, a.Name, a.Alias, got.Unmap(), p.prefix, want)
			}
		}
		p.log.Debug("adopted sandbox link", "link", a.Name, "sandbox", a.Alias)
	}
	return ours, nil
}

// slotOf parses a host-end link name back into its slot index.
func (p *Pool) slotOf(name string) (int, bool) {
	digits, ok := strings.CutPrefix(name, p.linkPrefix)
	if !ok || digits == "" || (len(digits) > 1 && digits[0] == '0') {
		return 0, false
	}
	idx, err := strconv.Atoi(digits)
	if err != nil || idx < 0 {
		return 0, false
	}
	return idx, true
}

// Prefix is the pool's address range.
func (p *Pool) Prefix() netip.Prefix { return p.prefix }

// NetnsPath is where the namespace of sandbox id is (or would be) mounted.
func (p *Pool) NetnsPath(id string) string {
	return filepath.Join(p.netnsDir, p.linkPrefix+"-"+id)
}

// attachment describes slot idx given to id.
func (p *Pool) attachment(id string, idx int) Attachment {
	subnet := p.alloc.subnet(idx)
	gw := subnet.Addr().Next()
	return Attachment{
		ID:       id,
		Netns:    p.NetnsPath(id),
		HostLink: p.linkPrefix + strconv.Itoa(idx),
		Subnet:   subnet,
		Gateway:  gw,
		Addr:     gw.Next(),
	}
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

// List reports every attachment of the pool, ordered by ID.
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

// Setup gives sandbox id a subnet and creates its devices: a network
// namespace mounted at NetnsPath(id) with lo up, a veth pair whose host end
// has the gateway address and whose other end, eth0 in the namespace, has
// the sandbox's address and a default route via the gateway. On error
// nothing is left behind.
func (p *Pool) Setup(ctx context.Context, id string) (Attachment, error) {
	if !validID.MatchString(id) {
		return Attachment{}, fmt.Errorf("%w: %q", ErrBadID, id)
	}
	if err := ctx.Err(); err != nil {
		return Attachment{}, err
	}
	p.mu.Lock()
	idx, err := p.alloc.alloc(id)
	var a Attachment
	if err == nil {
		a = p.attachment(id, idx)
	}
	p.mu.Unlock()
	if err != nil {
		return Attachment{}, err
	}
	if err := onFreshThread(func() error { return p.build(a) }); err != nil {
		if terr := p.Teardown(context.WithoutCancel(ctx), id); terr != nil {
			p.log.Error("cleaning up failed network setup", "sandbox", id, "err", terr)
		}
		return Attachment{}, fmt.Errorf("network: set up sandbox %s: %w", id, err)
	}
	p.log.Debug("network attached", "sandbox", id, "link", a.HostLink, "addr", a.Addr)
	return a, nil
}

// onFreshThread runs fn on an OS thread of its own that is thrown away
// afterwards. fn may move the thread into another namespace: a goroutine
// that exits while locked to its thread takes the thread with it, so no
// other goroutine ever runs in that namespace by accident.
func onFreshThread(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		goruntime.LockOSThread()
		// No UnlockOSThread, on purpose: see above.
		errc <- fn()
	}()
	return <-errc
}

// build creates a's namespace and devices. It runs on a throwaway thread
// and moves that thread into the new namespace.
func (p *Pool) build(a Attachment) error {
	// A netlink socket acts in the namespace it was opened in, whatever
	// the thread does later: open the host's before leaving it.
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	defer host.Close()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("unshare netns: %w", err)
	}
	guest, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink in netns: %w", err)
	}
	defer guest.Close()

	// Pin the namespace with a bind mount so it outlives this thread and
	// can be found by path (by runsc, by `ip netns`, after a restart).
	f, err := os.OpenFile(a.Netns, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return fmt.Errorf("create netns mount point: %w", err)
	}
	f.Close()
	const self = "/proc/thread-self/ns/net"
	if err := unix.Mount(self, a.Netns, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mount netns at %s: %w", a.Netns, err)
	}
	nsfd, err := unix.Open(self, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer unix.Close(nsfd)

	// A fresh namespace has lo down; gVisor's netstack copies the
	// namespace's links and needs a working loopback.
	lo, err := guest.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := guest.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}

	// The peer is created straight inside the namespace, so its name never
	// has to be unique on the host. The alias records the owner for adopt.
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: a.HostLink, Alias: a.ID},
		PeerName:      GuestLink,
		PeerNamespace: netlink.NsFd(nsfd),
	}
	if err := host.LinkAdd(veth); err != nil {
		return fmt.Errorf("create veth %s: %w", a.HostLink, err)
	}
	hl, err := host.LinkByName(a.HostLink)
	if err != nil {
		return fmt.Errorf("find %s: %w", a.HostLink, err)
	}
	if hl.Attrs().Alias != a.ID {
		// Older kernels ignore IFLA_IFALIAS on creation.
		if err := host.LinkSetAlias(hl, a.ID); err != nil {
			return fmt.Errorf("set alias of %s: %w", a.HostLink, err)
		}
	}
	if err := host.AddrAdd(hl, &netlink.Addr{IPNet: prefixIPNet(a.Gateway, a.Subnet.Bits())}); err != nil {
		return fmt.Errorf("address %s: %w", a.HostLink, err)
	}
	if err := host.LinkSetUp(hl); err != nil {
		return fmt.Errorf("set %s up: %w", a.HostLink, err)
	}

	gl, err := guest.LinkByName(GuestLink)
	if err != nil {
		return fmt.Errorf("find %s in netns: %w", GuestLink, err)
	}
	if err := guest.AddrAdd(gl, &netlink.Addr{IPNet: prefixIPNet(a.Addr, a.Subnet.Bits())}); err != nil {
		return fmt.Errorf("address %s in netns: %w", GuestLink, err)
	}
	if err := guest.LinkSetUp(gl); err != nil {
		return fmt.Errorf("set %s up in netns: %w", GuestLink, err)
	}
	if err := guest.RouteAdd(&netlink.Route{LinkIndex: gl.Attrs().Index, Gw: a.Gateway.AsSlice()}); err != nil {
		return fmt.Errorf("default route in netns: %w", err)
	}
	return nil
}

// Teardown removes sandbox id's devices and namespace and frees its
// subnet. Tearing down a sandbox that has nothing left is not an error.
func (p *Pool) Teardown(ctx context.Context, id string) error {
	if !validID.MatchString(id) {
		return fmt.Errorf("%w: %q", ErrBadID, id)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	a, attached := p.Lookup(id)
	var errs []error
	if attached {
		// Deleting one end of a veth deletes the other, inside the netns.
		err := netlink.LinkDel(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a.HostLink}})
		if err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("delete %s: %w", a.HostLink, err))
		}
	}
	if err := removeNetns(p.NetnsPath(id)); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		// Keep the subnet reserved: its devices may still exist.
		return fmt.Errorf("network: tear down sandbox %s: %w", id, err)
	}
	if attached {
		p.mu.Lock()
		p.alloc.free(id)
		p.mu.Unlock()
		p.log.Debug("network detached", "sandbox", id, "link", a.HostLink)
	}
	return nil
}

// removeNetns unmounts and removes a namespace mount point. The namespace
// itself goes away once no process is left in it.
func removeNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// Devices lists what of the pool exists on the host: host-end links and
// namespace mount points, attached or not. With no attachments left it
// should be empty; anything it reports then has leaked.
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
		if strings.HasPrefix(e.Name(), p.linkPrefix+"-") {
			out = append(out, "netns "+filepath.Join(p.netnsDir, e.Name()))
		}
	}
	return out, nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}
