package guestinit

import (
	"strings"
	"testing"
)

// TestRunRefusesOutsidePID1: `cubicle init` run by hand does nothing to the
// machine it runs on (no mounts, no pivot_root, no power-off).
func TestRunRefusesOutsidePID1(t *testing.T) {
	if err := Run(); err == nil || !strings.Contains(err.Error(), "PID 1") {
		t.Fatalf("Run outside PID 1: %v", err)
	}
}
