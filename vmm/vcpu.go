//go:build linux && amd64

package vmm

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/cubicle-dev/cubicle/vmm/kvm"
	"golang.org/x/sys/unix"
)

// vcpuRunner owns one vCPU: its goroutine, locked to an OS thread, is the
// only caller of KVM_RUN and the only reader of the kvm_run area.
type vcpuRunner struct {
	vm    *VM
	cpu   *kvm.VCPU
	index int
	// setup applies the vCPU's initial state on its thread before the
	// first KVM_RUN. Set before Start, read only by the vCPU thread.
	setup func(*kvm.VCPU) error
	// tid is the OS thread id while the thread runs (0 before and after);
	// written by the vCPU thread, read by kickers holding vm.mu.
	tid atomic.Int32

	// Guarded by vm.mu.
	parked bool     // waiting in the paused state
	exited bool     // the thread has left its loop
	jobs   []func() // work to run on the vCPU thread while parked
}

// run is the vCPU thread: apply the initial state, report it to Start,
// then run the guest until the VM stops. The goroutine never unlocks its
// OS thread, so the thread exits with it.
func (r *vcpuRunner) run(results chan<- error, wg *sync.WaitGroup) {
	defer wg.Done()
	runtime.LockOSThread()
	r.tid.Store(int32(unix.Gettid()))
	vm := r.vm
	var err error
	if r.setup == nil {
		err = fmt.Errorf("vmm: vCPU %d has no initial state", r.index)
	} else if err = r.setup(r.cpu); err != nil {
		err = fmt.Errorf("vmm: vCPU %d initial state: %w", r.index, err)
	}
	results <- err
	vm.mu.Lock()
	for err == nil && vm.st == stateCreated {
		vm.cond.Wait() // until Start has heard from every vCPU
	}
	vm.mu.Unlock()
	if err == nil {
		r.loop()
	}
	vm.mu.Lock()
	r.exited = true
	// Kicks are sent under mu: none can reach this thread's id after
	// this, when the thread is gone and its id may be reused.
	r.tid.Store(0)
	vm.cond.Broadcast()
	vm.mu.Unlock()
}

// loop runs the guest and handles exits until the VM stops.
func (r *vcpuRunner) loop() {
	vm := r.vm
	// completed is false while KVM still has to apply the result of an
	// MMIO or port I/O exit; the next KVM_RUN does that, even with
	// immediate_exit set. Parking or stopping waits for it.
	completed := true
	for {
		vm.mu.Lock()
		if vm.st != stateRunning && completed {
			if vm.st == stateStopped {
				vm.mu.Unlock()
				return
			}
			r.park()
			vm.mu.Unlock()
			continue
		}
		if vm.st == stateRunning {
			r.cpu.SetImmediateExit(false)
		}
		// Otherwise immediate_exit is set (whoever changed the state set
		// it under mu) and this KVM_RUN only completes the pending access.
		vm.mu.Unlock()

		err := r.cpu.Run()
		completed = true
		switch {
		case errors.Is(err, kvm.ErrInterrupted):
		case err != nil:
			r.stop(&ExitError{VCPU: r.index, Reason: r.cpu.ExitReason(), Detail: err.Error(), Err: ErrUnexpectedExit})
		default:
			vm.firstExitOnce.Do(func() { close(vm.firstExit) })
			var stop bool
			var why error
			completed, stop, why = r.handleExit()
			if stop {
				r.stop(why)
			}
		}
	}
}

// park waits, with vm.mu held, while the VM is paused, running jobs that
// need the vCPU thread.
func (r *vcpuRunner) park() {
	vm := r.vm
	r.parked = true
	vm.cond.Broadcast()
	for vm.st == statePaused {
		if len(r.jobs) > 0 {
			job := r.jobs[0]
			r.jobs = r.jobs[1:]
			vm.mu.Unlock()
			job()
			vm.mu.Lock()
			continue
		}
		vm.cond.Wait()
	}
	r.parked = false
}

// stop ends the VM because of this vCPU (reason nil: a clean guest
// shutdown).
func (r *vcpuRunner) stop(reason error) {
	r.vm.mu.Lock()
	r.vm.stopLocked(reason)
	r.vm.mu.Unlock()
}

// allOnes is what reads from unclaimed ports and addresses return, as on a
// PC bus where nothing answers.
const allOnes = 0xff

// handleExit handles the exit KVM_RUN returned. It reports whether the
// exit needs no completion by KVM, and whether the VM must stop because of
// it and why (nil for a clean guest shutdown).
func (r *vcpuRunner) handleExit() (completed, stop bool, why error) {
	vm := r.vm
	reason := r.cpu.ExitReason()
	switch reason {
	case kvm.ExitIO:
		e, err := r.cpu.IO()
		if err != nil {
			return true, true, r.exitError(reason, ErrUnexpectedExit, err.Error())
		}
		for i := range e.Count {
			d := e.Data[i*e.Size : (i+1)*e.Size]
			if e.Out {
				if !vm.pio.Write(uint64(e.Port), d) {
					vm.log.Debug("vmm: write to unclaimed port", "port", e.Port, "size", e.Size)
				}
			} else if !vm.pio.Read(uint64(e.Port), d) {
				fill(d, allOnes)
			}
		}
		return false, false, nil
	case kvm.ExitMMIO:
		e, err := r.cpu.MMIO()
		if err != nil {
			return true, true, r.exitError(reason, ErrUnexpectedExit, err.Error())
		}
		if e.Write {
			if !vm.mmio.Write(e.Addr, e.Data) {
				vm.log.Debug("vmm: write to unclaimed MMIO", "addr", e.Addr, "size", len(e.Data))
			}
		} else if !vm.mmio.Read(e.Addr, e.Data) {
			vm.log.Debug("vmm: read from unclaimed MMIO", "addr", e.Addr, "size", len(e.Data))
			fill(e.Data, allOnes)
		}
		return false, false, nil
	case kvm.ExitIRQWindowOpen, kvm.ExitIntr:
		return true, false, nil
	case kvm.ExitHLT:
		return true, true, r.exitError(reason, ErrHalted, "")
	case kvm.ExitShutdown:
		return true, true, r.exitError(reason, ErrTripleFault, "")
	case kvm.ExitSystemEvent:
		typ, data := r.cpu.SystemEvent()
		switch typ {
		case kvm.SystemEventShutdown, kvm.SystemEventReset:
			vm.log.Debug("vmm: guest system event", "type", typ)
			return true, true, nil
		case kvm.SystemEventCrash:
			return true, true, r.exitError(reason, ErrGuestCrash, fmt.Sprintf("data %#x", data))
		}
		return true, true, r.exitError(reason, ErrUnexpectedExit, fmt.Sprintf("system event type %d data %#x", typ, data))
	case kvm.ExitFailEntry:
		hw, cpu := r.cpu.FailEntry()
		return true, true, r.exitError(reason, ErrEntryFailed, fmt.Sprintf("hardware entry failure reason %#x on host CPU %d", hw, cpu))
	case kvm.ExitInternalError:
		sub, data := r.cpu.InternalError()
		return true, true, r.exitError(reason, ErrInternal, fmt.Sprintf("suberror %d data %#x", sub, data))
	case kvm.ExitUnknown:
		return true, true, r.exitError(reason, ErrUnexpectedExit, fmt.Sprintf("hardware exit reason %#x", r.cpu.HardwareExitReason()))
	}
	return true, true, r.exitError(reason, ErrUnexpectedExit, "")
}

// exitError builds the diagnostic for a fatal exit, with the registers.
func (r *vcpuRunner) exitError(reason kvm.ExitReason, kind error, detail string) *ExitError {
	e := &ExitError{VCPU: r.index, Reason: reason, Detail: detail, Err: kind}
	if regs, err := r.cpu.GetRegs(); err == nil {
		e.Regs = regs
	}
	if sregs, err := r.cpu.GetSregs(); err == nil {
		e.Sregs = sregs
	}
	r.vm.log.Error("vmm: vCPU stopped the VM", "err", e)
	return e
}

func fill(b []byte, v byte) {
	for i := range b {
		b[i] = v
	}
}

// onEachVCPU runs f on every vCPU's own thread and waits for all. The VM
// must be paused (so every thread is parked and takes jobs).
func (vm *VM) onEachVCPU(f func(r *vcpuRunner) error) error {
	errs := make([]error, len(vm.runners))
	var wg sync.WaitGroup
	vm.mu.Lock()
	if vm.st != statePaused || !vm.allParkedLocked() {
		vm.mu.Unlock()
		return fmt.Errorf("%w: vCPUs are not all paused (VM %v)", ErrState, vm.st)
	}
	for i, r := range vm.runners {
		if r.exited {
			vm.mu.Unlock()
			return fmt.Errorf("%w: vCPU %d has exited", ErrState, i)
		}
		wg.Add(1)
		r.jobs = append(r.jobs, func() {
			defer wg.Done()
			errs[i] = f(r)
		})
	}
	vm.cond.Broadcast()
	vm.mu.Unlock()
	wg.Wait()
	return errors.Join(errs...)
}
