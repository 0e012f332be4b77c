// Package egress binds one sandbox's egress enforcement to its devices:
// the eBPF policy of package network/policy on the host end of its veth,
// and cubicle's resolver (package network/dns) on its gateway address,
// which opens the addresses of allowed domain names in that policy as it
// answers. Runtimes hand an Enforcer their attachments and E2B policies;
// it keeps the two halves in step, so that no runtime has to know how
// domain rules are enforced.
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
	"github.com/cubicle-dev/cubicle/runtime"
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

// Prepare puts attachment a under policy e before anything in the sandbox
// runs: the eBPF program on its host end and the resolver on its gateway.
// On error nothing of it is left.
func (e *Enforcer) Prepare(a network.Attachment, eg runtime.Egress) error {
	idx, pol, rules, err := plan(a, eg)
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

// Prepared reports whether a is under an Enforcer's policy (after a server
// restart the eBPF half survives, pinned, but the resolver does not).
func (e *Enforcer) Prepared(a network.Attachment) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.ifindex[a.HostLink]
	return ok
}

// Apply replaces a's policy live: the next packet and the next query see
// it. An attachment the Enforcer has not prepared (one adopted after a
// restart, whose eBPF policy is still pinned) gets its resolver back.
func (e *Enforcer) Apply(a network.Attachment, eg runtime.Egress) error {
	idx, pol, rules, err := plan(a, eg)
	if err != nil {
		return err
	}
	if err := e.policy.Update(idx, pol); errors.Is(err, policy.ErrNotAttached) {
		return e.Prepare(a, eg)
	} else if err != nil {
		return fmt.Errorf("egress: policy of %s: %w", a.ID, err)
	}
	e.mu.Lock()
	_, serving := e.ifindex[a.HostLink]
	e.ifindex[a.HostLink] = idx
	e.mu.Unlock()
	if !serving {
		if err := e.dns.Add(a.HostLink, a.Gateway, rules); err != nil {
			return fmt.Errorf("egress: resolver of %s: %w", a.ID, err)
		}
		return nil
	}
	if err := e.dns.SetRules(a.HostLink, rules); err != nil {
		return fmt.Errorf("egress: resolver of %s: %w", a.ID, err)
	}
	return nil
}

// Release takes a out of enforcement: resolver, learned addresses, policy.
// Releasing an attachment that has nothing left is not an error.
func (e *Enforcer) Release(a network.Attachment) error {
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
func (e *Enforcer) Counters(a network.Attachment) (runtime.EgressCounters, error) {
	idx, err := hostIndex(a)
	if err != nil {
		return runtime.EgressCounters{}, err
	}
	c, err := e.policy.Counters(idx)
	if err != nil {
		return runtime.EgressCounters{}, fmt.Errorf("egress: counters of %s: %w", a.ID, err)
	}
	return runtime.EgressCounters{
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

// plan is what applying eg to a takes: a's host-end ifindex and eg split
// into its kernel half and its resolver half.
func plan(a network.Attachment, eg runtime.Egress) (int, policy.Policy, dns.Rules, error) {
	idx, err := hostIndex(a)
	if err != nil {
		return 0, policy.Policy{}, dns.Rules{}, err
	}
	pol, rules, err := split(eg)
	return idx, pol, rules, err
}

// split turns an E2B policy into its kernel half and its resolver half.
func split(eg runtime.Egress) (policy.Policy, dns.Rules, error) {
	pol := policy.Policy{AllowInternet: eg.AllowInternet, AllowOut: eg.AllowOut, DenyOut: eg.DenyOut}
	rules := dns.Rules{Open: eg.AllowInternet}
	for _, d := range eg.DenyOut {
		if d.Bits() == 0 {
			rules.Open = false // E2B's way of saying allow_internet_access=false
		}
	}
	for _, d := range eg.AllowDomains {
		n, err := dns.ParseDomain(d)
		if err != nil {
			return policy.Policy{}, dns.Rules{}, fmt.Errorf("egress: %w", err)
		}
		rules.Domains = append(rules.Domains, n)
	}
	return pol, rules, nil
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
