//go:build linux && amd64

package vmmbench

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cubicle-dev/cubicle/vmm"
	"github.com/cubicle-dev/cubicle/vmm/control"
	"github.com/cubicle-dev/cubicle/vmm/jailer"
)

// runTimeout bounds how long one restored guest may take to run.
const runTimeout = 10 * time.Second

// RestoreOnce restores the snapshot into a new VM in this process until
// its vCPU runs guest code: reading and checking the state file, mapping
// the memory file copy-on-write, creating the KVM VM, irqchip, PIT and
// vCPU, setting all state, starting the vCPU thread and the guest's first
// port write after the restore. It returns that time and the VM, which the
// caller stops and closes off the clock (tearing a KVM VM down takes tens
// of milliseconds, mostly in the kernel).
func RestoreOnce(statePath, memPath string) (time.Duration, *vmm.VM, error) {
	start := time.Now()
	vm, err := vmm.Restore(vmm.Config{}, statePath, memPath)
	if err != nil {
		return 0, nil, err
	}
	post := &firstWrite{ch: make(chan struct{})}
	if err := vm.AddPIODevice("post", postPort, 1, post); err != nil {
		return 0, vm, err
	}
	if err := vm.Start(); err != nil {
		return 0, vm, err
	}
	select {
	case <-post.ch:
	case <-vm.Done():
		return 0, vm, fmt.Errorf("vmmbench: restored VM stopped: %w", vm.Wait(context.Background()))
	case <-time.After(runTimeout):
		return 0, vm, errors.New("vmmbench: restored guest did not run")
	}
	return time.Since(start), vm, nil
}

// RestoreLatencies restores the snapshot n times in this process, in
// rounds of parallel restores at once, and returns each restore's time
// from the start of vmm.Restore to the guest's first port write (see
// Restore). A round's VMs are closed before the next round starts, off the
// clock, so that neither their teardown (tens of milliseconds of kernel
// work each) nor a growing number of idle VMs weighs on the restores
// measured.
func RestoreLatencies(statePath, memPath string, n, parallel int) ([]time.Duration, error) {
	if n < 1 || parallel < 1 {
		return nil, fmt.Errorf("vmmbench: n=%d parallel=%d", n, parallel)
	}
	var (
		mu    sync.Mutex
		lat   []time.Duration
		first error
	)
	for len(lat) < n && first == nil {
		var wg sync.WaitGroup
		var vms []*vmm.VM
		for range min(parallel, n-len(lat)) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d, vm, err := RestoreOnce(statePath, memPath)
				mu.Lock()
				defer mu.Unlock()
				if vm != nil {
					vm.Stop()
					vms = append(vms, vm)
				}
				if err != nil {
					first = cmp.Or(first, err)
					return
				}
				lat = append(lat, d)
			}()
		}
		wg.Wait()
		closeAll(vms)
	}
	return lat, first
}

// closeAll closes VMs in parallel and waits.
func closeAll(vms []*vmm.VM) {
	var wg sync.WaitGroup
	for _, vm := range vms {
		wg.Add(1)
		go func() { defer wg.Done(); vm.Close() }()
	}
	wg.Wait()
}

// ProcessConfig describes VMM processes for the cross-process figures.
type ProcessConfig struct {
	// Spawn starts one VMM process (cubicle vmm); its Jail, if set, is a
	// template: each process gets a jail under Jail.Root with the
	// snapshot's directory mounted read-only at /template.
	Spawn control.SpawnConfig
	// StatePath and MemPath are the snapshot on the host.
	StatePath, MemPath string
}

// jailed returns the spawn configuration for process i and the snapshot
// paths as that process sees them.
func (c ProcessConfig) jailed(i int) (control.SpawnConfig, control.Snapshot) {
	sc := c.Spawn
	snap := control.Snapshot{State: c.StatePath, Memory: c.MemPath}
	if sc.Jail == nil {
		return sc, snap
	}
	j := *sc.Jail
	j.Root = filepath.Join(j.Root, fmt.Sprint(i))
	j.Mounts = append(append([]jailer.Mount(nil), j.Mounts...),
		jailer.Mount{Source: filepath.Dir(c.StatePath), Target: "/template", ReadOnly: true})
	sc.Jail = &j
	return sc, control.Snapshot{
		State:  "/template/" + filepath.Base(c.StatePath),
		Memory: "/template/" + filepath.Base(c.MemPath),
	}
}

// ColdRestores measures n times: start a new VMM process, restore the
// snapshot in it (a new VM) and wait until the guest ran. Each process is
// killed, and its teardown finished, before the next measurement.
func ColdRestores(ctx context.Context, c ProcessConfig, n int) ([]time.Duration, error) {
	var lat []time.Duration
	for i := range n {
		sc, snap := c.jailed(i)
		start := time.Now()
		p, err := control.Spawn(sc)
		if err != nil {
			return lat, err
		}
		_, err = p.Restore(ctx, snap, control.RestoreOptions{WaitRunning: true})
		d := time.Since(start)
		p.Kill()
		if err != nil {
			return lat, err
		}
		lat = append(lat, d)
	}
	return lat, nil
}

// PooledRestores measures n restores from a pool of size idle processes
// whose VM and memory slot for the snapshot already exist: take a process,
// restore, wait until the guest ran. Restores go in rounds of parallel at
// once (parallel <= size); before each round the previous round's
// processes are gone and the pool is full again, so that neither teardown
// nor refills compete with the measured restores.
func PooledRestores(ctx context.Context, c ProcessConfig, n, size, parallel int) ([]time.Duration, error) {
	if parallel < 1 || parallel > size {
		return nil, fmt.Errorf("vmmbench: %d restores at once from a pool of %d", parallel, size)
	}
	sc, snap := c.jailed(0)
	if sc.Jail != nil {
		j := *sc.Jail
		j.Root = filepath.Dir(j.Root) // the pool adds /<n>
		sc.Jail = &j
	}
	pool, err := control.NewPool(control.PoolConfig{Size: size, Spawn: sc, Snapshot: snap})
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	var (
		mu      sync.Mutex
		lat     []time.Duration
		first   error
		closers sync.WaitGroup
	)
	defer closers.Wait()
	for len(lat) < n && first == nil {
		closers.Wait() // the last round's teardown is off the clock
		for pool.Ready() < size {
			select {
			case <-ctx.Done():
				return lat, ctx.Err()
			case <-time.After(time.Millisecond):
			}
		}
		var round sync.WaitGroup
		for range min(parallel, n-len(lat)) {
			round.Add(1)
			go func() {
				defer round.Done()
				start := time.Now()
				p, err := pool.Get(ctx)
				if err == nil {
					var prepared bool
					prepared, err = p.Restore(ctx, snap, control.RestoreOptions{WaitRunning: true})
					if err == nil && !prepared {
						err = errors.New("vmmbench: the pooled process did not use its prepared VM")
					}
				}
				d := time.Since(start)
				mu.Lock()
				defer mu.Unlock()
				if p != nil {
					closers.Add(1)
					go func() { defer closers.Done(); p.Kill() }()
				}
				if err != nil {
					first = cmp.Or(first, err)
					return
				}
				lat = append(lat, d)
			}()
		}
		round.Wait()
	}
	return lat, first
}

// CanJail reports whether this process can start jailed VMMs (it must be
// root).
func CanJail() bool { return os.Geteuid() == 0 }
