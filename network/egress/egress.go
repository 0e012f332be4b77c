// Package egress binds one sandbox's egress enforcement to its devices:
// the eBPF policy of package network/policy on the host end of its veth,
// and cubicle's resolver (package network/dns) on its gateway address,
// which opens the addresses of allowed domain names in that policy as it
// answers. It also owns the E2B policy itself (Policy, Parse): the one
// parser of API input and the split into the two halves.
//
// Who calls what: a network.Pool made with PoolOptions prepares every set
// of devices once as it is made (under Default, off the create path for
// spares) and releases it once before the devices are removed. The
// orchestrator, which claims a sandbox's devices from that pool, switches
// them to the sandbox's own policy with Apply and reads Counters. No
// runtime sees an Enforcer: a runtime is handed the attachment only, so
// every backend (veth or tap) gets the same enforcement.
//
// Why DNS and not an SNI/Host-checking proxy (E2B's choice): it works for
// every protocol and port, not only HTTP on 80 and TLS on 443; nothing in
// the data path terminates or parses the sandbox's connections; and with
// port 53 closed everywhere but the sandbox's own gateway, the resolver is
// also what keeps DNS from being a tunnel out of a closed sandbox (names it
// may not reach are never forwarded). The cost is the usual one of DNS
// policy: an address shared by an allowed and another name (a CDN) is open
// for both, as long as the allowed name's answer is valid.
package egress

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/cubicle-dev/cubicle/network"
	"github.com/cubicle-dev/cubicle/network/dns"
	"github.com/cubicle-dev/cubicle/network/policy"
)

// Enforcer applies sandboxes' egress policies. Its methods are safe for
// concurrent use; calls for one attachment must not overlap.
type Enforcer struct {
	policy *policy.Manager
	dns    *dns.Resolver

	mu sync.Mutex
	// ifindex maps the resolver's keys (host-end link names) to the
	// policy's (their ifindex) for the prepared attachments.
	ifindex map[string]int
}

// New makes an Enforcer over pm, with a resolver made from resolverOpts
// (its Learner is the Enforcer itself).
func New(pm *policy.Manager, resolverOpts dns.Options) (*Enforcer, error) {
	if pm == nil {
		return nil, errors.New("egress: no policy manager")
	}
	e := &Enforcer{policy: pm, ifindex: map[string]int{}}
	resolverOpts.Learner = e
	r, err := dns.New(resolverOpts)
	if err != nil {
		return nil, fmt.Errorf("egress: %w", err)
	}
	e.dns = r
	return e, nil
}

// PoolOptions returns o with the hooks that put a pool's devices under e:
// OnCreate prepares each set of devices under Default as it is made,
// OnDestroy releases it before it is removed. It is the one place where
// devices are prepared and released, so each is, once.
func (e *Enforcer) PoolOptions(o network.Options) network.Options {
	o.OnCreate = func(a network.Attachment) error { return e.prepare(a, Default) }
	o.OnDestroy = func(a network.Attachment) { _ = e.release(a) }
	return o
}

// prepare puts attachment a under policy p before anything in the sandbox
// runs: the eBPF program on its host end and the resolver on its gateway.
// On error nothing of it is left. Unexported, as release is: the pool's
// hooks (PoolOptions) are the only callers, so that no device is prepared
// or released twice.
func (e *Enforcer) prepare(a network.Attachment, p Policy) error {
	idx, pol, rules, err := plan(a, p)
	if err != nil {
		return err
	}
	if err := e.policy.Attach(idx, pol); err != nil {
		return fmt.Errorf("egress: policy of %s: %w", a.ID, err)
	}
	e.mu.Lock()
	e.ifindex[a.HostLink] = idx
	e.mu.Unlock()
	if err := e.dns.Add(a.HostLink, a.Gateway, rules); err != nil {
		e.forget(a.HostLink)
		_ = e.policy.Detach(idx)
		return fmt.Errorf("egress: resolver of %s: %w", a.ID, err)
	}
	return nil
}

// Prepared reports whether a is under this Enforcer's policy (after a
// server restart the eBPF half survives, pinned, but the resolver does not
// until Apply).
func (e *Enforcer) Prepared(a network.Attachment) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.ifindex[a.HostLink]
	return ok
}

// Apply replaces a's policy live: the next packet and the next query see
// it. An attachment the Enforcer has not prepared (one adopted after a
// restart, whose eBPF policy is still pinned) gets its resolver back.
// p is as Parse makes it; a p that either half refuses (a domain the
// resolver does not take, an IPv6 prefix) is an error, and for a device
// being served the resolver's half, which is checked first, is left as
// it was.
func (e *Enforcer) Apply(a network.Attachment, p Policy) error {
	idx, pol, rules, err := plan(a, p)
	if err != nil {
		return err
	}
	e.mu.Lock()
	_, serving := e.ifindex[a.HostLink]
	e.mu.Unlock()
	if serving {
		// The resolver swaps its rules only once they all compile.
		if err := e.dns.SetRules(a.HostLink, rules); err != nil {
			return fmt.Errorf("egress: resolver of %s: %w", a.ID, err)
		}
	}
	if err := e.policy.Update(idx, pol); errors.Is(err, policy.ErrNotAttached) {
		if serving {
			e.forget(a.HostLink)
			_ = e.dns.Remove(a.HostLink)
		}
		return e.prepare(a, p)
	} else if err != nil {
		return fmt.Errorf("egress: policy of %s: %w", a.ID, err)
	}
	if serving {
		return nil
	}
	e.mu.Lock()
	e.ifindex[a.HostLink] = idx
	e.mu.Unlock()
	if err := e.dns.Add(a.HostLink, a.Gateway, rules); err != nil {
		e.forget(a.HostLink)
		return fmt.Errorf("egress: resolver of %s: %w", a.ID, err)
	}
	return nil
}

// release takes a out of enforcement: resolver, learned addresses, policy.
// Releasing an attachment that has nothing left is not an error (a spare
// or sandbox device of an earlier server, whose policy is pinned).
func (e *Enforcer) release(a network.Attachment) error {
	var errs []error
	if err := e.dns.Remove(a.HostLink); err != nil {
		errs = append(errs, fmt.Errorf("egress: resolver of %s: %w", a.ID, err))
	}
	idx, ok := e.forget(a.HostLink)
	if !ok {
		var err error
		if idx, err = hostIndex(a); err != nil {
			// The device is gone: the policy's reconciliation drops
			// entries of vanished interfaces.
			return errors.Join(errs...)
		}
	}
	if err := e.policy.Detach(idx); err != nil && !errors.Is(err, policy.ErrNotAttached) {
		errs = append(errs, fmt.Errorf("egress: policy of %s: %w", a.ID, err))
	}
	return errors.Join(errs...)
}

// Counters are a's egress counters since it was prepared.
func (e *Enforcer) Counters(a network.Attachment) (Counters, error) {
	idx, err := hostIndex(a)
	if err != nil {
		return Counters{}, err
	}
	c, err := e.policy.Counters(idx)
	if err != nil {
		return Counters{}, fmt.Errorf("egress: counters of %s: %w", a.ID, err)
	}
	return Counters{
		PassedPackets: c.PassedPackets, PassedBytes: c.PassedBytes,
		DroppedPackets: c.DroppedPackets, DroppedBytes: c.DroppedBytes,
	}, nil
}

// Close stops the resolver. The eBPF policies stay in force (pinned), so
// sandboxes stay closed while the server restarts; names they resolve in
// that time are refused.
func (e *Enforcer) Close() error { return e.dns.Close() }

// Learn implements dns.Learner: key is a host-end link name.
func (e *Enforcer) Learn(key string, addrs []netip.Addr, until time.Time) error {
	idx, err := e.lookup(key)
	if err != nil {
		return err
	}
	return e.policy.Learn(idx, addrs, until)
}

// Forget implements dns.Learner.
func (e *Enforcer) Forget(key string, addrs []netip.Addr) error {
	idx, err := e.lookup(key)
	if err != nil {
		return err
	}
	return e.policy.Forget(idx, addrs)
}

func (e *Enforcer) lookup(key string) (int, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	idx, ok := e.ifindex[key]
	if !ok {
		return 0, fmt.Errorf("egress: %s: %w", key, policy.ErrNotAttached)
	}
	return idx, nil
}

func (e *Enforcer) forget(key string) (int, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	idx, ok := e.ifindex[key]
	delete(e.ifindex, key)
	return idx, ok
}

// plan is what applying p to a takes: a's host-end ifindex and p split
// into its kernel half and its resolver half.
func plan(a network.Attachment, p Policy) (int, policy.Policy, dns.Rules, error) {
	idx, err := hostIndex(a)
	if err != nil {
		return 0, policy.Policy{}, dns.Rules{}, err
	}
	pol, rules := split(p)
	return idx, pol, rules, nil
}

// hostIndex is the ifindex of a's host end.
func hostIndex(a network.Attachment) (int, error) {
	if a.HostIndex > 0 {
		return a.HostIndex, nil
	}
	l, err := netlink.LinkByName(a.HostLink)
	if err != nil {
		return 0, fmt.Errorf("egress: device of %s: %w", a.ID, err)
	}
	return l.Attrs().Index, nil
}
