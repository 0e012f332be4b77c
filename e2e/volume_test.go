package e2e

import "testing"

// TestSDKVolumes: volumes with the SDK's Volume class and volumeMounts
// (volume.test.mjs), with a second key to check the owner wall.
func TestSDKVolumes(t *testing.T) {
	t.Setenv("CUBICLE_E2E_OTHER_API_KEY", newAPIKey(t, "e2e-volumes-other"))
	runNode(t, "volume.test.mjs")
}
