package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// monotonicNow reads CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns, in
// which the learned map's deadlines and the flows' last-seen times are.
func monotonicNow() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("policy: read CLOCK_MONOTONIC: %w", err)
	}
	return uint64(ts.Nano()), nil
}

// Learn opens addrs for the sandbox behind ifindex until until: cubicle's
// resolver calls it with the IPv4 addresses of an answer to a name the
// sandbox's allowOut allows, and until = time.Now().Add(ttl), before it
// replies. From the next packet on, the sandbox may open connections to
// them (rule 8 of the package documentation), even with allow_internet_access=false or a matching
// denyOut; connections opened meanwhile keep working after the deadline
// (flows). Hard-denied and closed destinations (private and
// special-purpose ranges, the host's LAN) stay closed however they were
// learned.
//
// Only IPv4 addresses (IPv4-mapped IPv6 ones included) are learned; IPv6
// and invalid ones are ignored, since sandboxes have no IPv6 egress at
// all. A later deadline replaces an earlier one for the same address; an
// earlier one never shortens a later one (Forget closes early). A deadline
// already past opens nothing. Learn returns ErrNotAttached for an unknown
// ifindex and ErrLearnedFull when the sandbox or the shared map has no
// room left; addresses before the failing one stay learned.
func (m *Manager) Learn(ifindex int, addrs []netip.Addr, until time.Time) error {
	// Deadline in the kernel's clock: its now plus the time left, read
	// together so that the conversion costs no accuracy.
	now, err := monotonicNow()
	if err != nil {
		return err
	}
	ttl := time.Until(until)
	m.mu.Lock()
	defer m.mu.Unlock()
	sb, ok := m.byIf[ifindex]
	if !ok {
		return fmt.Errorf("%w: ifindex %d", ErrNotAttached, ifindex)
	}
	if ttl <= 0 {
		return nil
	}
	deadline := now + uint64(ttl)
	for _, a := range addrs {
		a = a.Unmap()
		if !a.Is4() {
			continue
		}
		old, known := sb.learned[a]
		if known && old >= deadline {
			continue
		}
		if !known && len(sb.learned) >= MaxLearnedPerSandbox {
			m.expireLocked(ifindex, sb, now)
			if len(sb.learned) >= MaxLearnedPerSandbox {
				return fmt.Errorf("%w: ifindex %d has %d", ErrLearnedFull, ifindex, len(sb.learned))
			}
		}
		k := learnKey{Ifindex: uint32(ifindex), Addr: a.As4()}
		err := m.maps[mapLearned].Put(k, deadline)
		if errors.Is(err, unix.E2BIG) {
			// The shared map is full: make room from what has expired
			// everywhere, then try once more.
			for idx, other := range m.byIf {
				m.expireLocked(idx, other, now)
			}
			err = m.maps[mapLearned].Put(k, deadline)
			if errors.Is(err, unix.E2BIG) {
				return fmt.Errorf("%w: shared learned map full: %w", ErrLearnedFull, err)
			}
		}
		if err != nil {
			return fmt.Errorf("policy: learn %v for ifindex %d: %w", a, ifindex, err)
		}
		sb.learned[a] = deadline
	}
	// The program consults learned and flows only for sandboxes with this
	// flag. Set after the entries, which is early enough: the resolver
	// replies only after Learn returns.
	if sb.cfg.Flags&flagLearned == 0 && len(sb.learned) > 0 {
		cfg := sb.cfg
		cfg.Flags |= flagLearned
		if err := m.maps[mapConfig].Put(uint32(ifindex), cfg); err != nil {
			return fmt.Errorf("policy: config of ifindex %d: %w", ifindex, err)
		}
		sb.cfg = cfg
	}
	return nil
}

// Forget closes addrs again for new connections from the sandbox behind
// ifindex, whatever their deadline; flows already open keep passing.
// Addresses that are not learned are ignored. It returns ErrNotAttached
// for an unknown ifindex.
func (m *Manager) Forget(ifindex int, addrs []netip.Addr) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	sb, ok := m.byIf[ifindex]
	if !ok {
		return fmt.Errorf("%w: ifindex %d", ErrNotAttached, ifindex)
	}
	var errs []error
	for _, a := range addrs {
		a = a.Unmap()
		if _, ok := sb.learned[a]; !ok {
			continue
		}
		if err := m.delLearned(ifindex, a); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(sb.learned, a)
	}
	return errors.Join(errs...)
}

// SweepLearned deletes the learned entries whose deadline has passed, the
// flows that have carried no packet for Options.FlowIdleTimeout, and flows
// of interfaces that have no policy. It returns how many entries of both
// kinds it deleted. Expired entries already stop opening anything; the
// sweep only bounds memory, so its caller decides the period: cubicle
// serve calls it every minute.
func (m *Manager) SweepLearned() (removed int, err error) {
	now, err := monotonicNow()
	if err != nil {
		return 0, err
	}
	attached := map[uint32]bool{}
	m.mu.Lock()
	for idx, sb := range m.byIf {
		removed += m.expireLocked(idx, sb, now)
		attached[uint32(idx)] = true
	}
	m.mu.Unlock()
	idle := uint64(m.flowIdle)
	n, err := m.purgeFlows(func(k flowKey, seen uint64) bool {
		// seen may be a packet's time later than now.
		return !attached[k.Ifindex] || now > seen && now-seen > idle
	})
	removed += n
	if err != nil {
		return removed, fmt.Errorf("policy: sweep flows: %w", err)
	}
	return removed, nil
}

// expireLocked deletes sb's learned entries with a deadline at or before
// now and returns how many.
func (m *Manager) expireLocked(ifindex int, sb *sandbox, now uint64) int {
	n := 0
	for a, dl := range sb.learned {
		if dl > now {
			continue
		}
		if err := m.delLearned(ifindex, a); err != nil {
			m.log.Warn("delete expired learned address", "ifindex", ifindex, "addr", a, "err", err)
			continue
		}
		delete(sb.learned, a)
		n++
	}
	return n
}

func (m *Manager) delLearned(ifindex int, a netip.Addr) error {
	err := m.maps[mapLearned].Delete(learnKey{Ifindex: uint32(ifindex), Addr: a.As4()})
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("policy: forget %v for ifindex %d: %w", a, ifindex, err)
	}
	return nil
}

// reconcileLearnedLocked adopts the learned entries of attached interfaces
// that have not expired and deletes the rest, and deletes the flows of
// interfaces without policy.
func (m *Manager) reconcileLearnedLocked() error {
	now, err := monotonicNow()
	if err != nil {
		return err
	}
	var k learnKey
	var dl uint64
	var stale []learnKey
	it := m.maps[mapLearned].Iterate()
	for it.Next(&k, &dl) {
		sb, ok := m.byIf[int(k.Ifindex)]
		if !ok || dl <= now {
			stale = append(stale, k)
			continue
		}
		sb.learned[netip.AddrFrom4(k.Addr)] = dl
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("policy: reconcile %s: %w", mapLearned, err)
	}
	for _, k := range stale {
		_ = m.maps[mapLearned].Delete(k)
	}
	if _, err := m.purgeFlows(func(k flowKey, _ uint64) bool { _, ok := m.byIf[int(k.Ifindex)]; return !ok }); err != nil {
		return fmt.Errorf("policy: reconcile %s: %w", mapFlows, err)
	}
	return nil
}

// purgeFlows deletes the flows for which match is true and returns how
// many it deleted. It needs no lock: the kernel map is safe for concurrent
// use, and a flow the LRU evicts meanwhile is simply not counted. The keys
// are collected first, because deleting the current key restarts a
// hash map walk from the beginning.
func (m *Manager) purgeFlows(match func(k flowKey, lastSeen uint64) bool) (int, error) {
	flows := m.maps[mapFlows]
	var k flowKey
	var seen uint64
	var del []flowKey
	it := flows.Iterate()
	for it.Next(&k, &seen) {
		if match(k, seen) {
			del = append(del, k)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("walk %s: %w", mapFlows, err)
	}
	n := 0
	for _, k := range del {
		err := flows.Delete(k)
		if err == nil {
			n++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, fmt.Errorf("delete flow: %w", err)
		}
	}
	return n, nil
}
