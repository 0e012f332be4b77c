//go:build linux && amd64

package vmm

import (
	"fmt"
	"math/bits"
	"sync"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"github.com/cubicle-dev/cubicle/vmm/memory"
	"github.com/cubicle-dev/cubicle/vmm/snapshot"
)

// Diff snapshots (Config.TrackDirty), as Firecracker takes them: KVM logs
// the guest's writes to every memory slot (KVM_MEM_LOG_DIRTY_PAGES), so
// a snapshot after the first needs to write only the pages changed since
// its base, a full memory file.
//
// What changed since the base is the union of:
//   - KVM's dirty log (guest writes), harvested with KVM_GET_DIRTY_LOG and
//     reset with KVM_CLEAR_DIRTY_LOG where manual dirty-log protection
//     exists (KVM_GET_DIRTY_LOG resets it otherwise);
//   - what the VMM itself wrote from host threads, which KVM never sees:
//     every slice of guest memory the VMM hands out (memory.Memory.Slice:
//     device buffers, boot structures) and every WriteAt is recorded when
//     it happens. Devices keep their rings' slices from queue setup on, so
//     the pages of each active virtio used ring (the only ring the device
//     writes) count as dirty at every diff snapshot, however long ago the
//     slice was taken. This over-approximates by a page or two per queue
//     and never misses a device write;
//   - on a VM restored from base + diff, the diff's pages (they differ
//     from the base although nothing wrote them since).
//
// Every diff is cumulative against the same base: pages found dirty stay
// in the set until the next full snapshot makes a new base. A diff thus
// always applies to its base alone (never to another diff), and its
// state file names the base by content (memory.ContentID), so a restore
// onto any other memory file is refused (snapshot.ErrWrongBase).
type dirtyTracker struct {
	manual bool // KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled

	mu sync.Mutex
	// baseID is the ContentID of the base memory file; hasBase is false
	// until a full snapshot or a restore gives one.
	baseID  uint64
	hasBase bool
	// since is the set of pages (one bit per page of the mapping) that
	// differ, or may differ, from the base.
	since []uint64
	// scratch is a per-slot bitmap for KVM_GET_DIRTY_LOG.
	scratch []uint64
}

// harvestLocked adds KVM's and the VMM's dirty pages to since and
// resets both logs. The VM is paused.
func (vm *VM) harvestLocked(t *dirtyTracker) error {
	for i, r := range vm.mem.Regions() {
		words := kvm.DirtyBitmapWords(r.Size)
		if cap(t.scratch) < words {
			t.scratch = make([]uint64, words)
		}
		bm := t.scratch[:words]
		clear(bm)
		if err := vm.kvm.GetDirtyLog(uint32(i), bm); err != nil {
			return err
		}
		if t.manual {
			if err := vm.kvm.ClearDirtyLog(uint32(i), 0, uint32(r.Size/memory.PageSize), bm); err != nil {
				return err
			}
		}
		orPages(t.since, bm, r.Offset/memory.PageSize)
	}
	for _, d := range vm.VirtioDevices() {
		if err := d.markUsedRings(vm.mem); err != nil {
			return err
		}
	}
	vm.mem.TakeWriteLog(t.since)
	return nil
}

// orPages ORs src (bit i: page i of a slot) into dst at page first.
func orPages(dst, src []uint64, first uint64) {
	if first%64 == 0 {
		for i, w := range src {
			if j := first/64 + uint64(i); j < uint64(len(dst)) {
				dst[j] |= w
			}
		}
		return
	}
	for i, w := range src {
		for ; w != 0; w &= w - 1 {
			p := first + uint64(i)*64 + uint64(bits.TrailingZeros64(w))
			if p/64 < uint64(len(dst)) {
				dst[p/64] |= 1 << (p % 64)
			}
		}
	}
}

// markUsedRings records the used rings of the device's active queues as
// written by the VMM (see dirtyTracker). The device is paused.
func (d *VirtioDevice) markUsedRings(mem *memory.Memory) error {
	st, err := d.tr.Save()
	if err != nil {
		return fmt.Errorf("vmm: device %s: %w", d.name, err)
	}
	for _, q := range st.Queues {
		if !q.Ready || q.Size == 0 {
			continue
		}
		// flags, idx, ring[size] of 8-byte elements, avail_event.
		if err := mem.MarkDirty(q.DeviceAddr, 6+8*uint64(q.Size)); err != nil {
			return fmt.Errorf("vmm: device %s used ring: %w", d.name, err)
		}
	}
	return nil
}

// resetBase starts tracking against a new base: the logs are emptied and
// since cleared. The VM is paused (or not yet running).
func (vm *VM) resetBase(t *dirtyTracker, id uint64) error {
	t.hasBase = false
	if err := vm.harvestLocked(t); err != nil {
		return err
	}
	clear(t.since)
	t.baseID, t.hasBase = id, true
	return nil
}

// SnapshotDiff saves a paused VM like Snapshot, but its memory file holds
// only the pages that changed since the base (the last full Snapshot of
// this VM, or the snapshot it was restored from): a sparse file as long
// as guest RAM with those pages at their offsets and holes elsewhere. The
// state file is marked as a diff and names the base by content. It needs
// a VM created or restored with Config.TrackDirty. It returns the number
// of pages written. Restore the result with RestoreDiff onto the base, or
// fold it into a full snapshot with snapshot.Merge.
func (vm *VM) SnapshotDiff(statePath, memPath string) (int, error) {
	t := vm.dirty
	if t == nil {
		return 0, fmt.Errorf("%w: SnapshotDiff needs a VM with Config.TrackDirty", ErrState)
	}
	st, err := vm.captureState()
	if err != nil {
		return 0, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.hasBase {
		return 0, fmt.Errorf("%w: SnapshotDiff before any full snapshot or restore gave it a base", ErrState)
	}
	if err := vm.harvestLocked(t); err != nil {
		return 0, err
	}
	n, err := vm.mem.DumpPages(memPath, t.since)
	if err != nil {
		return 0, err
	}
	st.Diff = &snapshot.Diff{BaseID: t.baseID, Pages: uint64(n)}
	if err := snapshot.WriteFile(statePath, st); err != nil {
		return 0, err
	}
	return n, nil
}

// RestoreDiff restores a diff snapshot: the base memory file is mapped
// MAP_PRIVATE as Restore maps a full one (and never modified), the diff's
// pages are copied over this VM's private copy, and the state applied. A
// base whose contents are not the diff's base is refused with an error
// wrapping snapshot.ErrWrongBase; checking reads the base's data extents.
// With cfg.TrackDirty the restored VM's diffs are against the same base.
func RestoreDiff(cfg Config, statePath, baseMemPath, diffMemPath string) (*VM, error) {
	st, err := snapshot.ReadFile(statePath)
	if err != nil {
		return nil, err
	}
	if st.Diff == nil {
		return nil, fmt.Errorf("%w: %s is a full snapshot: restore it with Restore", ErrIncompatible, statePath)
	}
	if err := snapshot.CheckBase(st, baseMemPath); err != nil {
		return nil, err
	}
	if err := checkRestorable(st, true); err != nil {
		return nil, err
	}
	p, err := Prepare(cfg, baseMemPath, st.MemSize, len(st.VCPUs))
	if err != nil {
		return nil, err
	}
	vm, err := p.restore(st, true, func(vm *VM) error {
		applied, err := vm.mem.ApplyDiff(diffMemPath, st.Diff.Pages)
		if err != nil {
			return err
		}
		if t := vm.dirty; t != nil {
			t.mu.Lock()
			defer t.mu.Unlock()
			if err := vm.resetBase(t, st.Diff.BaseID); err != nil {
				return err
			}
			copy(t.since, applied)
		}
		return nil
	})
	if err != nil {
		p.Close()
		return nil, err
	}
	return vm, nil
}
