package testenv

import (
	"os"
	"testing"
)

// TestKVMProblem checks KVMProblem against what the host says: with a
// /dev/kvm it can open, the answer is either "" or names the device.
func TestKVMProblem(t *testing.T) {
	p := KVMProblem()
	_, err := os.Stat(KVMDevice)
	switch {
	case os.IsNotExist(err) && p == "":
		t.Fatalf("no %s, but KVMProblem says it is usable", KVMDevice)
	case p != "":
		t.Logf("KVM is not usable here: %s", p)
	}
}

// TestScale: Scale follows $CUBICLE_TEST_EMULATED.
func TestScale(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want int
	}{{"", 100}, {"0", 100}, {"1", 10}} {
		t.Setenv(EmulatedEnv, tc.env)
		if got := Scale(100, 10); got != tc.want || Emulated() != (tc.want == 10) {
			t.Errorf("%s=%q: Scale(100, 10) = %d, Emulated() = %v; want %d", EmulatedEnv, tc.env, got, Emulated(), tc.want)
		}
	}
}
