package vsock

import (
	"encoding/json"
	"fmt"
)

// SaveState returns Save's State encoded as JSON, for a VM that keeps
// device state as bytes (devices.Stateful).
func (d *Device) SaveState() ([]byte, error) { return json.Marshal(d.Save()) }

// RestoreState decodes what SaveState returned and calls Restore.
func (d *Device) RestoreState(data []byte) error {
	var st State
	if err := json.Unmarshal(data, &st); err != nil {
		return fmt.Errorf("%w: %w", ErrSnapshotMismatch, err)
	}
	return d.Restore(st)
}
