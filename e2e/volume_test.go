package e2e

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/cubicle-dev/cubicle/client"
)

// TestSDKVolumes: volumes with the SDK's Volume class and volumeMounts
// (volume.test.mjs), with a second key to check the owner wall.
func TestSDKVolumes(t *testing.T) {
	t.Setenv("CUBICLE_E2E_OTHER_API_KEY", newAPIKey(t, "e2e-volumes-other"))
	runNode(t, "volume.test.mjs")
}

// TestVolumesSurviveRestart: a sandbox's volume mounts are part of what a
// restarted server adopts: the paused sandbox resumes with its volume, the
// volume still cannot be deleted under it, and it can once it is killed.
func TestVolumesSurviveRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	key := srv.apiKey
	code, _, body := apiCall(t, key, "POST", "/volumes", `{"name":"restart-vol"}`)
	if code != http.StatusCreated {
		t.Fatalf("create volume: %d %s", code, body)
	}
	var vol struct{ VolumeID, Token string }
	if err := json.Unmarshal(body, &vol); err != nil {
		t.Fatal(err)
	}
	defer apiCall(t, key, "DELETE", "/volumes/"+vol.VolumeID, "")
	c := srv.client()
	var sb client.Sandbox
	if _, err := c.Do(ctx, "POST", "/v2/sandboxes", map[string]any{"templateID": "base", "timeout": 300,
		"volumeMounts": []map[string]string{{"name": "restart-vol", "path": "/vol"}}}, &sb); err != nil {
		t.Fatal(err)
	}
	defer c.Kill(context.Background(), sb.SandboxID)
	mustRun(t, c, sb, "echo before-restart > /vol/f", "")
	if _, err := c.Do(ctx, "POST", "/sandboxes/"+sb.SandboxID+"/pause", map[string]any{}, nil); err != nil {
		t.Fatal(err)
	}

	if err := srv.stop(); err != nil {
		t.Fatal(err)
	}
	if err := srv.start(); err != nil {
		t.Fatal(err)
	}
	c = srv.client()

	if code, _, body := apiCall(t, key, "DELETE", "/volumes/"+vol.VolumeID, ""); code != http.StatusConflict {
		t.Fatalf("delete under a paused, adopted sandbox: %d %s", code, body)
	}
	code, _, body = apiCall(t, key, "GET", "/sandboxes/"+sb.SandboxID, "")
	if code != 200 || !strings.Contains(string(body), `"volumeMounts":[{"name":"restart-vol","path":"/vol"}]`) {
		t.Fatalf("sandbox after restart: %d %s", code, body)
	}
	resumed, err := c.Connect(ctx, sb.SandboxID, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	mustRun(t, c, resumed, "cat /vol/f; echo after > /vol/g", "before-restart\n")
	if err := c.Kill(ctx, sb.SandboxID); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.apiURL+"/volumecontent/"+vol.VolumeID+"/file?path=/g", nil)
	req.Header.Set("Authorization", "Bearer "+vol.Token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(got) != "after\n" {
		t.Fatalf("content after the sandbox was killed: %d %q", resp.StatusCode, got)
	}
	if code, _, body := apiCall(t, key, "DELETE", "/volumes/"+vol.VolumeID, ""); code != http.StatusNoContent {
		t.Fatalf("delete once unmounted: %d %s", code, body)
	}
}
