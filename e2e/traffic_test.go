package e2e

import "testing"

// TestTrafficToken checks network.allowPublicTraffic with the real SDK: the
// proxy demands the traffic access token on sandbox ports, not on envd's.
func TestTrafficToken(t *testing.T) {
	runNode(t, "traffic.test.mjs")
}
