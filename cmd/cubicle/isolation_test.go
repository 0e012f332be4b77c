package main

import (
	"strings"
	"testing"
)

// TestChooseIsolation: auto is gVisor and says whether microVMs could
// run (until the microVM backend passes the E2B suite), an explicit
// microvm on a host that cannot is refused with the reason, and a bad
// value is refused.
func TestChooseIsolation(t *testing.T) {
	yes := func() (bool, string) { return true, "" }
	no := func() (bool, string) { return false, "KVM here is PVM" }
	for _, tc := range []struct {
		flag    string
		canBoot func() (bool, string)
		want    string
		why     string // a part of why, or of the error
		wantErr bool
	}{
		{"auto", yes, "gvisor", "--isolation microvm runs sandboxes as microVMs", false},
		{"auto", no, "gvisor", "KVM here is PVM", false},
		{"microvm", yes, "microvm", "--isolation microvm", false},
		{"microvm", no, "", "cannot run microVMs: KVM here is PVM", true},
		{"gvisor", yes, "gvisor", "--isolation gvisor", false},
		{"firecracker", yes, "", "want auto, microvm or gvisor", true},
	} {
		got, why, err := chooseIsolation(tc.flag, tc.canBoot)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("%s: got %q, %q, %v", tc.flag, got, why, err)
			continue
		}
		msg := why
		if err != nil {
			msg = err.Error()
		}
		if !strings.Contains(msg, tc.why) {
			t.Errorf("%s: %q lacks %q", tc.flag, msg, tc.why)
		}
	}
}
