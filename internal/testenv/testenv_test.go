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
