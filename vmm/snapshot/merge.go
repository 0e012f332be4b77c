//go:build linux && amd64

package snapshot

import (
	"errors"
	"fmt"

	"github.com/cubicle-dev/cubicle/vmm/memory"
)

// ErrWrongBase is returned when a diff snapshot is applied to a memory
// file other than the one it was taken against.
var ErrWrongBase = errors.New("snapshot: diff does not belong to this base memory file")

// CheckBase verifies that the memory file at baseMemPath is the base of
// the diff snapshot st, by its contents (memory.FileID reads the file's
// data extents).
func CheckBase(st *State, baseMemPath string) error {
	if st.Diff == nil {
		return fmt.Errorf("%w: the state file is a full snapshot, not a diff", ErrWrongBase)
	}
	id, err := memory.FileID(baseMemPath)
	if err != nil {
		return err
	}
	if id != st.Diff.BaseID {
		return fmt.Errorf("%w: %s has content ID %#016x, the diff was taken against %#016x",
			ErrWrongBase, baseMemPath, id, st.Diff.BaseID)
	}
	return nil
}

// Merge folds the diff snapshot (diffStatePath, diffMemPath) into its base
// memory file baseMemPath and writes the equivalent full snapshot:
// outMemPath is the base with the diff's pages applied, outStatePath the
// diff's state as a full snapshot of it. Restoring the result equals
// restoring the base plus the diff. The base is checked first
// (ErrWrongBase). Outputs are written atomically.
func Merge(baseMemPath, diffStatePath, diffMemPath, outStatePath, outMemPath string) error {
	st, err := ReadFile(diffStatePath)
	if err != nil {
		return err
	}
	if err := CheckBase(st, baseMemPath); err != nil {
		return err
	}
	id, err := memory.MergeFiles(baseMemPath, diffMemPath, outMemPath)
	if err != nil {
		return err
	}
	st.Diff = nil
	st.MemoryID = id
	return WriteFile(outStatePath, st)
}
