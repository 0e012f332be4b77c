package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/client"
	"github.com/cubicle-dev/cubicle/network/policy"
)

// TestRestartKeepsSandboxes stops cubicle serve with SIGTERM and starts it
// again: running and paused sandboxes are found again with their state,
// files and processes, and keep working; their timeouts still hold.
func TestRestartKeepsSandboxes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := srv.client()
	running, err := c.Create(ctx, "base", client.CreateOptions{Timeout: 5 * time.Minute, Metadata: map[string]string{"restart": "running"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Kill(context.Background(), running.SandboxID)
	paused, err := c.Create(ctx, "base", client.CreateOptions{Timeout: 5 * time.Minute, Metadata: map[string]string{"restart": "paused"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Kill(context.Background(), paused.SandboxID)

	mustRun(t, c, running, "echo before > /tmp/state; nohup sleep 600 >/dev/null 2>&1 &", "")
	// A domain rule lives half in the kernel (pinned) and half in the
	// resolver's memory: both must be back after the restart.
	if _, err := c.Do(ctx, "PUT", "/sandboxes/"+running.SandboxID+"/network",
		map[string]any{"allowOut": []string{"allowed.test"}, "allow_internet_access": false}, nil); err != nil {
		t.Fatal(err)
	}
	mustRun(t, c, paused, "echo paused-state > /tmp/state", "")
	if _, err := c.Do(ctx, "POST", "/sandboxes/"+paused.SandboxID+"/pause", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}

	if err := srv.stop(); err != nil {
		t.Fatal(err)
	}
	// Sandboxes still run: their egress policy stays pinned while the
	// server is down (see TestServeStopsClean for the case with none).
	if _, err := os.Stat(filepath.Join(policy.DefaultPinRoot, e2eLinkPrefix)); err != nil {
		t.Errorf("egress pins gone while sandboxes run: %v", err)
	}
	if err := srv.start(); err != nil {
		t.Fatal(err)
	}
	c = srv.client()

	list, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, s := range list {
		states[s.SandboxID] = s.State
	}
	if states[running.SandboxID] != "running" || states[paused.SandboxID] != "paused" {
		t.Fatalf("after restart: states %v; want %s running and %s paused", states, running.SandboxID, paused.SandboxID)
	}
	// The envd token is unchanged: the same Sandbox value still works.
	mustRun(t, c, running, "cat /tmp/state; pgrep -x sleep >/dev/null && echo sleeper", "before\nsleeper\n")
	mustRun(t, c, running, fmt.Sprintf(`getent ahostsv4 other.test || echo refused
python3 -c "import socket; socket.create_connection(('allowed.test', %d), timeout=5).close(); print('connected')"`, inetHTTPPort), "refused\nconnected\n")
	resumed, err := c.Connect(ctx, paused.SandboxID, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	mustRun(t, c, resumed, "cat /tmp/state", "paused-state\n")
}

func mustRun(t *testing.T, c *client.Client, sb client.Sandbox, cmd, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var out, errOut bytes.Buffer
	code, err := c.Run(ctx, sb, cmd, &out, &errOut)
	if err != nil || code != 0 {
		t.Fatalf("%q: exit %d, %v, stderr %q", cmd, code, err, errOut.String())
	}
	if want != "" && out.String() != want {
		t.Fatalf("%q printed %q, want %q", cmd, out.String(), want)
	}
}
