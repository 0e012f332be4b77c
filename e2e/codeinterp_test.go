package e2e

import (
	"context"
	"os/exec"
	"testing"
	"time"
)

// TestCodeInterpreter drives the code-interpreter-v1 template with the real
// @e2b/code-interpreter SDK. The template is built into the server's data
// dir first (a no-op when serve already did; the first build on a machine
// runs apt in a chroot, later ones come from the cache): serve reads
// templates from the registry per request, so it needs no restart.
func TestCodeInterpreter(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	build := exec.CommandContext(ctx, srv.bin, "template", "build-code-interpreter", "--data-dir", srv.dataDir)
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("cubicle template build-code-interpreter: %v\n%s", err, out)
	}
	runNode(t, "codeinterp.test.mjs")
}
