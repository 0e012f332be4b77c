package main

import (
	"errors"
	"strings"
	"testing"
)

// TestChooseIsolation: auto is gVisor and says whether microVMs could
// run (until the microVM backend passes the E2B suite), an explicit
// microvm on a host that cannot boot Linux or cannot jail the VMMs is
// refused with the reason, and a bad value is refused.
func TestChooseIsolation(t *testing.T) {
	yes := func() (bool, string) { return true, "" }
	no := func() (bool, string) { return false, "KVM here is PVM" }
	jail := func() error { return nil }
	noJail := func() error { return errors.New("no cgroup v1 memory hierarchy") }
	for _, tc := range []struct {
		flag    string
		canBoot func() (bool, string)
		canJail func() error
		want    string
		why     string // a part of why, or of the error
		wantErr bool
	}{
		{"auto", yes, jail, "gvisor", "--isolation microvm runs sandboxes as microVMs", false},
		{"auto", no, jail, "gvisor", "KVM here is PVM", false},
		{"auto", yes, noJail, "gvisor", "the VMMs cannot be jailed: no cgroup v1 memory hierarchy", false},
		{"microvm", yes, jail, "microvm", "--isolation microvm", false},
		{"microvm", no, jail, "", "cannot run microVMs: KVM here is PVM", true},
		{"microvm", yes, noJail, "", "cannot run microVMs: the VMMs cannot be jailed: no cgroup v1 memory hierarchy", true},
		{"gvisor", yes, noJail, "gvisor", "--isolation gvisor", false},
		{"firecracker", yes, jail, "", "want auto, microvm or gvisor", true},
	} {
		got, why, err := chooseIsolation(tc.flag, tc.canBoot, tc.canJail)
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
