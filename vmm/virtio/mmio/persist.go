package mmio

import (
	"fmt"

	"github.com/cubicle-dev/cubicle/vmm/virtio"
	"github.com/cubicle-dev/cubicle/vmm/virtio/queue"
)

// QueueState is one queue's part of a transport snapshot.
type QueueState struct {
	queue.State
	Ready bool `json:"ready"`
}

// State is the device-independent snapshot of a virtio-mmio device: what the
// driver negotiated and programmed, and where the device is in each ring.
// Device-specific state (a vsock's CID, a disk's capacity) is saved by the
// device package beside it.
type State struct {
	DeviceType        virtio.DeviceType `json:"device_type"`
	DeviceFeaturesSel uint32            `json:"device_features_sel"`
	DriverFeaturesSel uint32            `json:"driver_features_sel"`
	QueueSel          uint32            `json:"queue_sel"`
	DriverFeatures    uint64            `json:"driver_features"`
	Status            uint32            `json:"status"`
	InterruptStatus   uint32            `json:"interrupt_status"`
	ConfigGeneration  uint32            `json:"config_generation"`
	Queues            []QueueState      `json:"queues"`
}

// Save returns the transport's snapshot. An activated device must be paused
// first (Pause), so that no worker moves the rings meanwhile.
func (t *Transport) Save() (State, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.active != nil && !t.paused {
		return State{}, ErrNotPaused
	}
	st := State{
		DeviceType:        t.dev.Type(),
		DeviceFeaturesSel: t.devFeatSel,
		DriverFeaturesSel: t.drvFeatSel,
		QueueSel:          t.queueSel,
		DriverFeatures:    t.driverFeatures,
		Status:            t.status,
		InterruptStatus:   t.isr.Load(),
		ConfigGeneration:  t.configGen.Load(),
		Queues:            make([]QueueState, len(t.queues)),
	}
	if t.needsReset.Load() {
		st.Status |= virtio.StatusDeviceNeedsReset
	}
	for i, qr := range t.queues {
		st.Queues[i] = QueueState{State: queue.State{Config: qr.cfg}, Ready: qr.ready}
		if t.active != nil && t.active[i] != nil {
			st.Queues[i].State = t.active[i].State()
		}
	}
	return st, nil
}

// Restore loads a snapshot into a transport the driver has not touched (as
// created by New). If the snapshot was of a running device, the device is
// activated on the restored queues and one interrupt is raised, so that the
// driver looks at used rings it may not have seen before the snapshot. The
// device's own state must have been restored first.
func (t *Transport) Restore(st State) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return ErrClosed
	}
	if t.status != 0 || t.active != nil {
		return ErrRestoreBusy
	}
	if st.DeviceType != t.dev.Type() || len(st.Queues) != len(t.maxSizes) {
		return fmt.Errorf("%w: snapshot of %v with %d queues, device %v with %d",
			ErrRestoreMismatch, st.DeviceType, len(st.Queues), t.dev.Type(), len(t.maxSizes))
	}
	if st.DriverFeatures&^t.offered != 0 {
		return fmt.Errorf("%w: snapshot features %#x not all offered (%#x)", ErrRestoreMismatch, st.DriverFeatures, t.offered)
	}
	for i, q := range st.Queues {
		if q.Ready && (q.Size == 0 || q.Size > t.maxSizes[i]) {
			return fmt.Errorf("%w: queue %d size %d, maximum %d", ErrRestoreMismatch, i, q.Size, t.maxSizes[i])
		}
	}
	t.devFeatSel, t.drvFeatSel, t.queueSel = st.DeviceFeaturesSel, st.DriverFeaturesSel, st.QueueSel
	t.driverFeatures = st.DriverFeatures
	t.configGen.Store(st.ConfigGeneration)
	for i, q := range st.Queues {
		t.queues[i] = queueRegs{cfg: q.Config, ready: q.Ready}
	}
	status := st.Status &^ virtio.StatusDeviceNeedsReset
	if st.Status&virtio.StatusDeviceNeedsReset != 0 {
		t.needsReset.Store(true)
	} else if status&virtio.StatusDriverOK != 0 {
		if err := t.activate(st.Queues); err != nil {
			t.resetRegs()
			return fmt.Errorf("mmio: restore %v: %w", t.dev.Type(), err)
		}
	}
	t.status = status
	t.isr.Store(st.InterruptStatus)
	if t.active != nil {
		t.isr.Or(virtio.InterruptUsedBuffer)
		if err := t.cfg.Interrupt.Trigger(); err != nil {
			t.log.Warn("interrupt after restore failed", "err", err)
		}
	}
	return nil
}
